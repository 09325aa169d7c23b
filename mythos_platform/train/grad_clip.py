"""Global gradient-norm clipping (Pascanu et al. 2013) over gradients laid out on different meshes.

With expert parallelism a model's gradients come in three kinds: plain tensors (single device, or
DDP: the same on every rank), DTensors sharded over all ranks (FSDP2) and DTensors of the expert
weights on the (edp, ep) mesh (sharded over ep, replicated over edp). `torch.nn.utils` computes one
norm over a single kind only, so the gradients are grouped by layout, each group's norm is
reduced over its own mesh (a DTensor norm reduces over the sharded dimensions only: a replicated
copy is counted once), and the squares add up to the norm of the whole model.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


def _layout(g: torch.Tensor) -> tuple:
    return (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ("local", g.device)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scale the gradients in place so that their global L2 norm is at most `max_norm` (0: only
    measure it); returns the norm before clipping, a plain scalar tensor equal on every rank."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(_layout(p.grad), []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().cpu() ** 2)
    total = torch.stack(squares).sum().sqrt() if squares else torch.zeros(())
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        if coef < 1.0 or not torch.isfinite(total):
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
    return total
