"""LTI-stable input injection: h' = A * h + B * e + update.

A = exp(-Delta) per channel with Delta = DT_MIN + (DT_MAX - DT_MIN) * sigmoid(decay_logit), so
Delta lies in [DT_MIN, DT_MAX] for *every* parameter value and A in
[exp(-DT_MAX), exp(-DT_MIN)] = [1.1e-7, 0.9922]: strictly inside (0, 1), so the spectral
radius of the diagonal A is below 1 by construction. A is computed in fp32 whatever the
parameter dtype, and its upper end 0.9922 is representable below 1.0 in bf16 too (the largest
bf16 below 1 is 0.99609), so a bf16 cast never rounds it up to 1. OpenMythos
(github.com/kyegomez/OpenMythos, `LTIInjection.get_A`) writes the zero-order-hold form of
Parcae (Prairie et al. 2026, "Parcae: Scaling Laws for Stable Looped Language Models",
arXiv:2604.12946) as A = exp(-exp(clamp(x, -20, 20))) with x = log_dt + log_A, which rounds
to exactly 1.0 in fp32 once x <= -20 (exp(-2e-9) == 1.0), where the clamp also makes its
gradient 0; here the sigmoid saturates only for |x| beyond ~90, far outside any trained value.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DT_MIN = 1.0 / 128
DT_MAX = 16.0


def decay_logit_for(a: float) -> float:
    """The decay_logit that gives A = a."""
    frac = (-math.log(a) - DT_MIN) / (DT_MAX - DT_MIN)
    frac = min(max(frac, 1e-6), 1 - 1e-6)
    return math.log(frac / (1 - frac))


class LTIInjection(nn.Module):
    def __init__(self, dim: int, init_decay: float = 0.5) -> None:
        super().__init__()
        self.init_decay = init_decay
        self.decay_logit = nn.Parameter(torch.empty(dim))
        self.b = nn.Parameter(torch.empty(dim))
        self._kept: tuple[tuple, tuple[torch.Tensor, torch.Tensor]] | None = None

    def init_weights(self) -> None:
        nn.init.constant_(self.decay_logit, decay_logit_for(self.init_decay))
        nn.init.ones_(self.b)

    def decay(self) -> torch.Tensor:
        """A, fp32, shape (dim,), every entry in (0, 1)."""
        delta = DT_MIN + (DT_MAX - DT_MIN) * torch.sigmoid(self.decay_logit.float())
        return torch.exp(-delta)

    def coefficients(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) in `dtype`. Under inference mode (generation, serving), where every loop iteration of
        every decoding step asks for them and nothing trains, they are kept until a parameter changes
        (its version counter: an optimizer step, `load_state_dict`): six operations fewer per iteration.
        With autograd or in `no_grad` (validation of a sharded training run, whose parameters FSDP
        fills in place) they are computed on every call."""
        if not torch.is_inference_mode_enabled() or self.b.is_inference():  # (inference tensors keep no version)
            return self.decay().to(dtype), self.b.to(dtype)
        key = (dtype, self.decay_logit.data_ptr(), self.decay_logit._version, self.b.data_ptr(), self.b._version)
        if self._kept is None or self._kept[0] != key:
            self._kept = (key, (self.decay().to(dtype), self.b.to(dtype)))
        return self._kept[1]

    def forward(self, h: torch.Tensor, e: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        a, b = self.coefficients(h.dtype)
        return a * h + b * e + update
