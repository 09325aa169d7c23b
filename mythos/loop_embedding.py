"""Sinusoidal loop-index embedding: tells the shared recurrent weights which iteration they run.

The signal for iteration t occupies the first `n` channels (sin/cos pairs at geometric
frequencies, as in Vaswani et al. 2017 but over loop depth); the other channels get zero.
It is a pure function of t, so iterations beyond the trained range still get a distinct,
smoothly continued signal.
"""

from __future__ import annotations

import torch


def loop_index_embedding(t: int, n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dim,) vector for loop iteration t (0-based)."""
    out = torch.zeros(dim, device=device, dtype=torch.float32)
    if n:
        freqs = 1.0 / (100.0 ** (torch.arange(0, n, 2, device=device, dtype=torch.float32) / n))
        ang = t * freqs
        out[0:n:2] = torch.sin(ang)
        out[1:n:2] = torch.cos(ang)
    return out.to(dtype)
