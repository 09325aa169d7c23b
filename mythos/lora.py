"""Depth-wise LoRA: a low-rank delta that differs per loop iteration (after Bae et al. 2024,
"Relaxed Recursive Transformers", arXiv:2410.20672).

delta_t(u) = up(scale_t * down(u)): the down (dim -> r) and up (r -> dim) projections are
shared, each iteration t has its own scale vector of length r. Iterations t >= the trained
range (`n_scales`, the training loop maximum) reuse the last trained scale, so depth
extrapolation is well defined. `up` starts at zero: a fresh model's LoRA delta is exactly 0.
"""

from __future__ import annotations

import torch
from torch import nn


class DepthLoRA(nn.Module):
    def __init__(self, dim: int, rank: int, n_scales: int) -> None:
        super().__init__()
        self.rank, self.n_scales = rank, n_scales
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        self.scale = nn.Parameter(torch.empty(n_scales, rank))

    def init_weights(self, std: float) -> None:
        nn.init.normal_(self.down.weight, std=std)
        nn.init.zeros_(self.up.weight)
        nn.init.ones_(self.scale)

    def scale_index(self, t: int) -> int:
        """Iterations past the trained range reuse the last trained scale."""
        return min(t, self.n_scales - 1)

    def forward(self, u: torch.Tensor, t: int) -> torch.Tensor:
        return self.up(self.down(u) * self.scale[self.scale_index(t)])
