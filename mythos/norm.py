"""RMSNorm (a thin wrapper so every norm in the model is built one way)."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.RMSNorm):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps=eps)

    def init_weights(self, gain: float = 1.0) -> None:
        nn.init.constant_(self.weight, gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)
