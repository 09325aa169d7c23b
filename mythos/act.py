"""Adaptive Computation Time halting over loop iterations (Graves 2016, arXiv:1603.08983).

After each iteration t a position emits p_t = sigmoid(w . h_{t+1} + b). Its weight is p_t
while it runs; at the iteration where its cumulative probability would reach the threshold,
or at the last iteration, it takes the remainder 1 - sum(previous weights) and halts. So the
weights of every position sum to exactly 1, whatever the loop count, and the output is
sum_t weight_t * h_{t+1}. The ponder cost N + R (iterations run plus the remainder; only R
carries gradient) is returned for the trainer to add to the loss.

The halting bias starts at `init_bias` (default -4: p ~ 0.018, so a fresh model runs ~50
iterations before halting). OpenMythos (github.com/kyegomez/OpenMythos, `ACTHalting` in
open_mythos/main.py) keeps nn.Linear's default bias (~0), so p starts near 0.5: every token
halts after 2-3 iterations, the loop stops once all have halted, and 16 and 64 loops give
identical logits.
"""

from __future__ import annotations

import torch
from torch import nn


class ACTHalting(nn.Module):
    def __init__(self, dim: int, threshold: float = 0.99, init_bias: float = -4.0) -> None:
        super().__init__()
        self.threshold, self.init_bias = threshold, init_bias
        self.proj = nn.Linear(dim, 1, bias=True)

    def init_weights(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, self.init_bias)

    def halting_prob(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.proj(h).float()).squeeze(-1)  # (B, S)


class ACTState:
    """Running accumulation of ACT weights and the weighted output for one forward pass."""

    def __init__(self, act: ACTHalting, like: torch.Tensor) -> None:
        B, S, _ = like.shape
        self.act = act
        self.cum = like.new_zeros(B, S, dtype=torch.float32)  # sum of weights given so far
        self.running = torch.ones(B, S, dtype=torch.bool, device=like.device)
        self.output = torch.zeros_like(like)
        self.steps = like.new_zeros(B, S, dtype=torch.float32)  # N: iterations run
        self.remainder = like.new_zeros(B, S, dtype=torch.float32)  # R (differentiable)

    def step(self, h: torch.Tensor, last: bool | torch.Tensor, rows: torch.Tensor | slice | None = None) -> None:
        """Account for the state h (B, S, D) after one iteration. `last`: this is the last iteration,
        or a (B,) tensor of the rows at their own last one; with `rows`, h holds only those rows of
        the batch (the rows still looping when their neighbours have stopped). A position halts when
        its cumulative probability would reach the threshold, or at the last iteration, and takes the
        remainder as its weight."""
        pick = (lambda x: x) if rows is None else (lambda x: x[rows])
        running, cum = pick(self.running), pick(self.cum)
        last = torch.as_tensor(last, device=h.device).reshape(-1, 1)  # (B or 1, 1)
        remaining = 1.0 - cum
        p = self.act.halting_prob(h)
        halt = running & (last | (cum + p >= self.act.threshold))
        w = torch.where(halt, remaining, torch.where(running, p, torch.zeros_like(p)))
        new = {"steps": pick(self.steps) + running.float(),
               "remainder": torch.where(halt, remaining, pick(self.remainder)),
               "cum": cum + w,
               "output": pick(self.output) + w.unsqueeze(-1).to(h.dtype) * h,
               "running": running & ~halt}
        for name, value in new.items():
            if rows is None:
                setattr(self, name, value)
            elif isinstance(rows, slice):  # a prefix of the rows, in inference (forward_rows): in place
                getattr(self, name)[rows] = value
            else:
                setattr(self, name, getattr(self, name).index_copy(0, rows, value))

    @property
    def all_halted(self) -> bool:
        return not bool(self.running.any())

    def ponder_cost(self) -> torch.Tensor:
        return (self.steps + self.remainder).mean()
