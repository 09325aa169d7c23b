"""Dense SwiGLU feed-forward network: w2(silu(x w1) * (x w3)), with w1 and w3 fused into one matmul.

`swiglu` is the activation on the fused projection h = x [w1 w3] (..., 2F) -> silu(h1) * h3
(..., F). In eager mode it is one autograd node that saves what autograd's own graph saves (h and silu(h1)) but writes both
halves of its gradient into one (..., 2F) tensor, where autograd's graph for `chunk` + `silu` +
`mul` joins the two gradient halves with a `cat`, a copy of the whole projection,
which made the fused SwiGLU slower on CPU than three separate linears (docs/performance.md).
Under torch.compile the plain expression is traced instead (the compiler fuses it itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _SwiGLUAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(h, act)
        return act * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, act = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        grad_h = torch.empty_like(h)
        grad_gate, grad_up = grad_h.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        return grad_h


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """silu(first half) * second half of the last dimension: (..., 2F) -> (..., F)."""
    if torch.compiler.is_compiling() or not h.requires_grad:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return _SwiGLUAct.apply(h)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.w13.weight, std=std)
        nn.init.normal_(self.w2.weight, std=out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))
