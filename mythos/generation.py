"""Autoregressive generation with the per-layer, per-loop KV cache.

`stream` yields one step at a time (a token per sequence); `generate` collects them. Prompts
of different lengths are left-padded; positions restart at 0 at each row's first real token
and pad keys are masked, so a row's output does not depend on its batch neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .kv_cache import KVCache
from .model import Mythos
from .stop import StopTracker


@dataclass
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 1.0
    """0 means greedy decoding (argmax); top_k/top_p then must stay at their defaults."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = off)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with probability >= top_p (1 = off)."""
    stop_tokens: Sequence[int] = ()
    seed: int | None = None
    n_loops: int | None = None
    exit_threshold: float | None = None
    share_loop_cache: bool = False

    def validate(self, max_seq_len: int, prompt_len: int) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            raise ValueError("temperature=0 means greedy decoding; top_k and top_p only apply when sampling "
                             "(temperature > 0)")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n_loops is not None and (not isinstance(self.n_loops, int) or self.n_loops < 1):
            raise ValueError(f"n_loops must be an int >= 1, got {self.n_loops!r}")
        if self.exit_threshold is not None and self.exit_threshold < 0:
            raise ValueError(f"exit_threshold must be >= 0, got {self.exit_threshold}")
        if prompt_len < 1:
            raise ValueError("prompt is empty: need at least one token")
        if prompt_len > max_seq_len:
            raise ValueError(f"prompt has {prompt_len} tokens, more than max_seq_len={max_seq_len}")
        if prompt_len + self.max_new_tokens > max_seq_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({self.max_new_tokens}) exceeds "
                f"max_seq_len={max_seq_len}; lower max_new_tokens to at most {max_seq_len - prompt_len}"
            )


@dataclass
class GenerationStep:
    tokens: torch.Tensor
    """(B,) the token chosen for each sequence at this step (pad for finished ones)."""
    finished: torch.Tensor
    """(B,) bool: the sequence ended at or before this step."""
    loops_used: int
    logits: torch.Tensor | None = None
    """(B, V) the logits `tokens` were chosen from (before temperature, top-k and top-p)."""
    prompt_logits: torch.Tensor | None = None
    """(B, P, V) at the first step of `stream(..., prompt_logits=True)`: the logits at every position of
    the left-padded prompt batch (row i's prompt starts at column P - len(prompt_i))."""


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """Generated tokens per sequence (prompt excluded, stop token excluded)."""
    finish_reasons: list[str]
    """"stop" (a stop token) or "length" (max_new_tokens)."""
    loops_used: list[int] = field(default_factory=list)
    """Loop iterations run at each step (prefill first)."""


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= params.top_p  # keep the first token always
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    pad = torch.zeros(len(prompts), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.long, device=device)
        pad[i] = width - len(p)
    return ids, pad


@torch.inference_mode()
def stream(
    model: Mythos,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    pad_id: int = 0,
    prompt_logits: bool = False,
) -> Iterator[GenerationStep]:
    """Yield one GenerationStep per generated position until every sequence has finished. With
    `prompt_logits` the first step also carries the logits at every prompt position (for scoring the
    prompt: the prefill computes them in the same pass)."""
    if not prompts:
        raise ValueError("prompts is empty: need at least one prompt")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("prompt is empty: need at least one token")
    cfg = model.cfg
    params.validate(cfg.max_seq_len, max(len(p) for p in prompts))
    device = next(model.parameters()).device
    n_loops = params.n_loops or cfg.n_loops
    ids, pad = _left_pad(prompts, pad_id, device)
    B, P = ids.shape
    cache = KVCache(B, P + params.max_new_tokens, share_loops=params.share_loop_cache)
    if bool(pad.any()):
        cache.set_padding(pad)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    stop = torch.tensor(sorted(set(params.stop_tokens)), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    was_training = model.training
    model.eval()
    try:
        out = model(ids, n_loops=n_loops, cache=cache, exit_threshold=params.exit_threshold,
                    last_logits_only=not prompt_logits)
        first_logits = out.logits if prompt_logits else None
        for _ in range(params.max_new_tokens):
            tok = sample_next(out.logits[:, -1], params, generator)
            tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
            if stop.numel():
                finished = finished | torch.isin(tok, stop)
            yield GenerationStep(tok, finished.clone(), out.loops_used, out.logits[:, -1], first_logits)
            first_logits = None
            if bool(finished.all()) or cache.length >= cache.capacity:
                return
            out = model(tok[:, None], n_loops=n_loops, cache=cache, exit_threshold=params.exit_threshold,
                        last_logits_only=True)
    finally:
        model.train(was_training)


def generate(
    model: Mythos,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    pad_id: int = 0,
    **overrides,
) -> GenerationResult:
    """Generate for a batch of token-id prompts. `overrides` set SamplingParams fields."""
    params = params or SamplingParams()
    if overrides:
        params = SamplingParams(**{**params.__dict__, **overrides})
    rows = [StopTracker(stop_tokens=params.stop_tokens) for _ in prompts]
    loops: list[int] = []
    for step in stream(model, prompts, params, pad_id):
        loops.append(step.loops_used)
        for row, t in zip(rows, step.tokens.tolist()):
            row.add(t)  # a finished row ignores the pad tokens that follow
    return GenerationResult([r.tokens for r in rows], [r.finish_reason for r in rows], loops)
