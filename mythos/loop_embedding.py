"""Sinusoidal loop-index embedding: tells the shared recurrent weights which iteration they run.

The signal for iteration t occupies the first `n` channels (sin/cos pairs at geometric
frequencies, as in Vaswani et al. 2017 but over loop depth); the other channels get zero.
It is a pure function of t, so iterations beyond the trained range still get a distinct,
smoothly continued signal.

Every loop iteration of every forward pass asks for it, so the vectors are computed once per
(n, dim, device, dtype) as a table of rows 0..T-1 (T grows by doubling) and each call is one row
of it: one indexing op where computing the vector took eleven, a twentieth of a decoding step's
operations at batch 1. The table is a constant outside autograd and inference mode, so the same
rows serve training, `no_grad` validation and `inference_mode` serving; callers must not write to it.
"""

from __future__ import annotations

import functools

import torch

_MIN_ROWS = 64


@functools.lru_cache(maxsize=32)
def _table(n: int, dim: int, rows: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(rows, dim): the embedding of iterations 0..rows-1."""
    with torch.inference_mode(False), torch.no_grad():
        out = torch.zeros(rows, dim, device=device, dtype=torch.float32)
        if n:
            freqs = 1.0 / (100.0 ** (torch.arange(0, n, 2, device=device, dtype=torch.float32) / n))
            ang = torch.arange(rows, device=device, dtype=torch.float32)[:, None] * freqs
            out[:, 0:n:2] = torch.sin(ang)
            out[:, 1:n:2] = torch.cos(ang)
        return out.to(dtype)


def loop_index_embedding(t: int, n: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dim,) vector for loop iteration t (0-based); a row of a shared table: read it, never write it."""
    rows = max(_MIN_ROWS, 1 << int(t).bit_length())  # a power of two above t
    return _table(n, dim, rows, torch.device(device), dtype)[t]
