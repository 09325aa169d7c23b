"""The two OpenAI response formats, whole bodies and stream chunks: text completions and chat completions.

    fmt = CompletionFormat(model_id, tokenizer, logprobs=True, echo=["prompt text"])
    fmt.begin()                                   # chunks sent before any token (echo text; chat: the role)
    fmt.piece(0, "text", entries, None)           # one stream chunk of choice 0 (finish_reason when done)
    fmt.body(texts, reasons, entries, usage, mythos)   # the whole non-streaming response

Each format keeps, per choice, the token strings and text offsets of the logprobs it has sent
(`logprobs.LogprobText`), so stream chunks continue where the last one stopped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Sequence

from .logprobs import LogprobText, TokenLogprob


class CompletionFormat:
    """`/v1/completions`: choices with `text`; `logprobs` as tokens/token_logprobs/top_logprobs/text_offset."""

    object = chunk_object = "text_completion"

    def __init__(self, model: str, tokenizer: Any, logprobs: bool, echo: Sequence[str] | None = None,
                 n_choices: int = 1) -> None:
        self.id = f"cmpl-{uuid.uuid4().hex[:24]}"
        self.model, self.echo = model, list(echo) if echo is not None else None
        self.lp = [LogprobText(tokenizer) for _ in range(n_choices)] if logprobs else None

    def _logprobs(self, i: int, entries: Sequence[TokenLogprob]) -> dict | None:
        return self.lp[i].completions(entries) if self.lp is not None else None

    def _choice(self, i: int, text: str, reason: str | None, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
        return {"text": text, "index": i, "logprobs": self._logprobs(i, entries), "finish_reason": reason}

    def chunk(self, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object, "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}

    def begin(self) -> list[dict[str, Any]]:
        """With echo, the prompts' text comes first (their logprobs come with the first tokens)."""
        if not self.echo:
            return []
        return [self.chunk([{"text": t, "index": i, "logprobs": None, "finish_reason": None}])
                for i, t in enumerate(self.echo)]

    def piece(self, i: int, text: str, entries: Sequence[TokenLogprob], reason: str | None) -> dict[str, Any]:
        return self.chunk([self._choice(i, text, reason, entries)])

    def body(self, texts: Sequence[str], reasons: Sequence[str], entries: Sequence[Sequence[TokenLogprob]],
             usage: dict, mythos: dict) -> dict[str, Any]:
        echo = self.echo or [""] * len(texts)
        choices = [self._choice(i, echo[i] + t, r, e) for i, (t, r, e) in enumerate(zip(texts, reasons, entries))]
        return {"id": self.id, "object": self.object, "created": int(time.time()), "model": self.model,
                "choices": choices, "usage": usage, "mythos": mythos}


class ChatFormat(CompletionFormat):
    """`/v1/chat/completions`: an assistant `message` (stream: `delta`s, the role first); `logprobs` as
    {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, model: str, tokenizer: Any, logprobs: bool) -> None:
        super().__init__(model, tokenizer, logprobs)
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def _logprobs(self, i: int, entries: Sequence[TokenLogprob]) -> dict | None:
        return self.lp[i].chat(entries) if self.lp is not None else None

    def begin(self) -> list[dict[str, Any]]:
        return [self.chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])]

    def piece(self, i: int, text: str, entries: Sequence[TokenLogprob], reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return self.chunk([{"index": i, "delta": delta, "logprobs": self._logprobs(i, entries),
                            "finish_reason": reason}])

    def body(self, texts: Sequence[str], reasons: Sequence[str], entries: Sequence[Sequence[TokenLogprob]],
             usage: dict, mythos: dict) -> dict[str, Any]:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": self._logprobs(i, e),
                    "finish_reason": r} for i, (t, r, e) in enumerate(zip(texts, reasons, entries))]
        return {"id": self.id, "object": self.object, "created": int(time.time()), "model": self.model,
                "choices": choices, "usage": usage, "mythos": mythos}
