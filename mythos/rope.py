"""Rotary position embedding (RoPE), computed from positions on the fly (no buffers to initialise).

`rope_angles` returns the cosines and signed sines at full rotary width, (cos, cos) and (-sin, sin)
over the two halves, once per forward pass; every attention call then rotates with two multiplies
and an add, x * cos + swap_halves(x) * sin, which is bit for bit the textbook
(x1 cos - x2 sin, x1 sin + x2 cos) (a - b equals a + (-b), and addition commutes, in IEEE
arithmetic) in half the operations: a loop iteration of a decoding step calls it twice per layer.
"""

from __future__ import annotations

import torch


def rope_angles(positions: torch.Tensor, rot_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, cos) and (-sin, sin) over the two halves, each (B, S, 1, rot_dim), fp32, for integer
    positions (B, S)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=positions.device, dtype=torch.float32) / rot_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # (B, S, rot/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1)[:, :, None, :], torch.cat((-sin, sin), dim=-1)[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dim of x (B, S, H, rot_dim) by the angles of `rope_angles`
    (computed in fp32, returned in x's dtype)."""
    half = x.shape[-1] // 2
    xf = x if x.dtype == torch.float32 else x.float()
    out = xf * cos + torch.cat((xf[..., half:], xf[..., :half]), dim=-1) * sin
    return out if out.dtype == x.dtype else out.to(x.dtype)
