"""Token log-probabilities: computed from the model's logits, written in OpenAI's two formats.

    entries = step_logprobs(step.logits, tokens, k=2)   # one TokenLogprob per row
    LogprobText(tokenizer).completions(entries)         # {"tokens", "token_logprobs", "top_logprobs",
                                                        #  "text_offset"} of /v1/completions
    LogprobText(tokenizer).chat(entries)                # {"content": [{"token", "logprob", "bytes",
                                                        #  "top_logprobs"}]} of /v1/chat/completions

The values are the model's own distribution: log-softmax of the logits in float32, before
temperature, top-k and top-p (what the token was sampled from is a transformation of it). A token
string is the token decoded alone; a byte-level token that is only part of a UTF-8 character is
written `bytes:\\xNN` (OpenAI's convention), a special token by its name (`<|endoftext|>`), so the
strings of different tokens differ and `top_logprobs` keys do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


MIN_LOGPROB = -9999.0
"""Floor of reported values (vLLM's): JSON has no -Infinity for a token of probability 0."""


@dataclass
class TokenLogprob:
    token: int
    logprob: float | None
    """log p(token | everything before it); None for a first prompt token with nothing before it."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The k most likely tokens at this position (id, logprob), most likely first."""


def step_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """logits (B, V) and the chosen token per row -> one TokenLogprob per row with the top k."""
    logp = logits.float().log_softmax(-1).clamp(min=MIN_LOGPROB)  # (B, V)
    chosen = logp.gather(-1, torch.tensor(list(tokens), device=logp.device)[:, None])[:, 0].tolist()
    top_v, top_i = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
    return [TokenLogprob(t, c, list(zip(i, v))) for t, c, i, v in zip(tokens, chosen, top_i.tolist(), top_v.tolist())]


def prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], first: int, k: int) -> list[TokenLogprob]:
    """One row's prompt scored: logits (P', V) at the prompt's positions (P' >= len(prompt), the prompt
    right-aligned, as the left-padded prefill computes them) -> a TokenLogprob for each prompt token
    from index `first` on (the tokens before it were put there by the server: not echoed)."""
    n = len(prompt)
    rows = logits[logits.shape[0] - n:]  # (n, V): rows[j] predicts prompt[j + 1]
    out = [TokenLogprob(prompt[0], None)] if first == 0 else []
    start = max(first, 1)
    if start < n:
        out += step_logprobs(rows[start - 1: n - 1], prompt[start:], k)
    return out


class LogprobText:
    """Token strings and text offsets for one choice; keeps the running offset between stream chunks."""

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        """The choice's tokens so far (echoed prompt, then generated): text_offset is where each token
        starts in the choice's text."""
        specials = {"eos_id": "<|endoftext|>", "pad_id": "<|pad|>", "bos_id": "<|bos|>"}
        self.special = {getattr(tokenizer, a): name for a, name in specials.items()
                        if getattr(tokenizer, a, None) is not None}
        self.byte_level = getattr(tokenizer, "kind", None) == "byte"

    def token_str(self, token: int) -> str:
        if token in self.special:
            return self.special[token]
        if self.byte_level and 0 <= token < 256:
            try:
                return bytes([token]).decode("utf-8")
            except UnicodeDecodeError:
                return f"bytes:\\x{token:02x}"
        return self.tok.decode([token]) or f"<|token_{token}|>"

    def token_bytes(self, token: int) -> list[int] | None:
        if self.byte_level:
            return [token] if 0 <= token < 256 else None
        text = self.tok.decode([token])
        return list(text.encode("utf-8")) if text else None

    def _advance(self, token: int) -> int:
        """Characters of text before `token`; a character split over byte tokens starts where its first
        byte does (a trailing incomplete character is not counted)."""
        at = len(self.tok.decode(self.ids).rstrip("\ufffd"))
        self.ids.append(token)
        return at

    def completions(self, entries: Sequence[TokenLogprob]) -> dict[str, list]:
        """The `logprobs` object of a /v1/completions choice (or of one stream chunk)."""
        strs = [self.token_str(e.token) for e in entries]
        return {"tokens": strs,
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [None if e.logprob is None else {self.token_str(t): v for t, v in e.top}
                                 for e in entries],
                "text_offset": [self._advance(e.token) for e in entries]}

    def chat(self, entries: Sequence[TokenLogprob]) -> dict[str, list]:
        """The `logprobs` object of a /v1/chat/completions choice (or of one stream chunk)."""
        def item(token: int, logprob: float) -> dict[str, Any]:
            return {"token": self.token_str(token), "logprob": logprob, "bytes": self.token_bytes(token)}
        return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]}
                            for e in entries]}
