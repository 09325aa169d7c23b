"""When a generated sequence stops: stop tokens, and stop strings matched on the decoded text.

The one implementation behind `mythos.generation.generate` (stop tokens), the serving engine
(`mythos_platform.serve.engine`: EOS and stop strings, streamed) and the lm-eval adapter
(`evals.lm_model`: the end-of-text token and `until` sequences).

- A stop token ends the sequence; it is not part of the output (neither its id nor its text).
- A stop string is matched on the decoded text, not on token ids: with byte-level or BPE tokens
  one may start inside a token and end several tokens later. The output ends just before it.
- When several stop strings occur, the one that starts first wins.
- While streaming, text that could still turn into a stop string (a suffix that is a proper
  prefix of one) is held back until later tokens decide, and so is an incomplete UTF-8
  character at the end (decoded as U+FFFD); `flush` releases what is held once the sequence
  ends for another reason (the token budget).

    tracker = StopTracker(tokenizer.decode, stop_strings=["\\n\\n"], stop_tokens=[eos_id])
    for token in tokens:
        new_text, stopped = tracker.add(token)   # send new_text; stop when stopped
    tail = tracker.flush()                       # budget reached: the held-back rest
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

REPLACEMENT = "\ufffd"
"""What a decoder gives for an incomplete UTF-8 sequence (errors="replace")."""


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index in `text` of the earliest occurrence of any stop string at or after `start`; -1 if none."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


def partial_stop_len(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of some stop string
    (0 if none): the text a stream must hold back, since the next tokens may complete a stop."""
    longest = max((len(s) for s in stops if s), default=1)
    for k in range(min(len(text) - start, longest - 1), 0, -1):
        tail = text[len(text) - k:]
        if any(len(s) > k and s.startswith(tail) for s in stops):
            return k
    return 0


class StopTracker:
    """One generated sequence: its tokens, its text, and whether a stop token or string ended it.

    `add(token)` returns (new text that is safe to send, stopped). Without a `decode` function
    only stop tokens apply and no text is produced.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str] | None = None,
                 stop_strings: Iterable[str] = (), stop_tokens: Iterable[int] = ()) -> None:
        self.decode = decode
        self.stop_strings = [s for s in stop_strings if s]
        if self.stop_strings and decode is None:
            raise ValueError("stop strings are matched on decoded text: give a decode function")
        self.stop_tokens = frozenset(int(t) for t in stop_tokens)
        self.tokens: list[int] = []
        """The generated tokens, a stop token excluded."""
        self.stopped = False
        """A stop token or stop string ended the sequence."""
        self._text = ""
        """The decoded tokens, or after a stop string the text before it."""
        self._sent = 0
        """Characters of the text already returned."""

    @property
    def finish_reason(self) -> str:
        """'stop' (a stop token or string) or 'length' (the sequence ran out of budget)."""
        return "stop" if self.stopped else "length"

    @property
    def text(self) -> str:
        """All the text: up to a stop string, or everything decoded so far."""
        return self._text

    def add(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if token in self.stop_tokens:
            self.stopped = True
            return self.flush(), True
        self.tokens.append(token)
        if self.decode is None:
            return "", False
        text = self._text = self.decode(self.tokens)
        end = find_stop(text, self.stop_strings, self._sent)
        if end >= 0:
            out, self._sent, self._text, self.stopped = text[self._sent:end], end, text[:end], True
            return out, True
        safe = len(text)
        while safe > self._sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        safe -= partial_stop_len(text[:safe], self.stop_strings, self._sent)
        out, self._sent = text[self._sent:safe], safe
        return out, False

    def flush(self) -> str:
        """The text not returned yet (held back as a possible stop string or incomplete character)."""
        out, self._sent = self._text[self._sent:], len(self._text)
        return out
