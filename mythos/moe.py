"""Fine-grained Mixture-of-Experts FFN (DeepSeekMoE, arXiv:2401.06066) with aux-loss-free balancing.

- Many small routed SwiGLU experts, top-k per token, plus always-on shared experts.
- Routing as in DeepSeek-V3 (arXiv:2412.19437, section 2.1.2; `mythos/router.py`): sigmoid (or
  softmax) affinities, optionally group-limited (`n_groups`, `topk_groups`); a per-expert bias is
  added only when *choosing* the experts, the gate weights come from the unbiased affinities
  (sigmoid: normalised over the chosen ones), times `route_scale`. `update_router_bias(load)`
  nudges the bias by `rate * sign(mean_load - load_e)` from the observed per-expert load, so
  overloaded experts become less likely to be chosen; an optional small sequence-level auxiliary
  loss is returned as well (weight `aux_loss_coef`, 0 = off).
- Dispatch is loop-free: token copies are sorted by expert once (argsort), every expert then
  reads a contiguous slice, and all experts run as one grouped matmul
  (`torch.nn.functional.grouped_mm`) — or, on builds without it and for widths the grouped
  kernels cannot take (sizes not a multiple of 16 bytes, e.g. dim=30), one matmul per slice with
  a single host sync for the slice sizes (the grouped kernel path has none). The masked per-expert
  loop is kept only in the tests, as the oracle this is compared against.
- Token copies move by gathers only, forward and backward (`_Dispatch`, `_Combine`): the copies
  are a permutation of (token, slot) pairs, so the gradient of each gather is the gather by the
  inverse permutation (plus a sum over the k slots for the dispatch), not autograd's `index_add_`
  scatter, and the gate weighting is one reduction over the k slots. On CPU this removed the
  top costs of the layer's profile (`index_add_` and `scatter_add_`, docs/performance.md).
- `expert_dispatcher`: a hook through which a parallel runtime runs the experts elsewhere (expert
  parallelism, mythos_platform/train/expert_parallel.py); routing and combining stay here.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .ffn import SwiGLU, swiglu
from .router import RouterSpec, route

_GROUPED_MM = getattr(F, "grouped_mm", None)


def _grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `grouped_mm` accepts x (N, K) @ w (E, K, M), forward and backward.

    The grouped kernels need every operand's leading stride to be a multiple of 16 bytes: x's
    row stride K and w's row stride M in the forward pass, and the same two sizes again in the
    backward pass (grad_x = grad_y @ w^T reads strides M and M, grad_w = x^T @ grad_y reads K
    and M). So K and M must both be multiples of 16 / element size (4 in fp32, 8 in bf16); a
    width like 30 takes the per-slice path instead of failing with "strides should be multiple
    of 16 bytes". Checked from shapes and strides only, so it also works under torch.compile.
    """
    if _GROUPED_MM is None or x.dtype not in (torch.float32, torch.bfloat16) or x.shape[0] == 0:
        return False
    align = 16 // x.element_size()
    K, M = w.shape[-2], w.shape[-1]
    return (K % align == 0 and M % align == 0 and x.stride(-1) == 1 and x.stride(0) == K
            and w.stride(-1) == 1 and w.stride(-2) == M)


class _Groups:
    """Rows per expert (a device tensor); the fallback reads them to the host at most once per forward."""

    def __init__(self, counts: torch.Tensor) -> None:
        self.counts = counts
        self._sizes: list[int] | None = None

    @property
    def sizes(self) -> list[int]:
        if self._sizes is None:
            self._sizes = self.counts.tolist()  # the one host sync of the fallback
        return self._sizes


_GROUPED_MM_DEVICES = ("cuda",)
"""Device types whose experts run through the grouped kernel when the shapes fit. Not the CPU:
there torch's grouped_mm took 118 ms fwd+bwd against 90 ms for one mm per expert written in
place (8,192 rows, 16 experts, 512 -> 1024, 2 threads), and a host read of the sizes costs
nothing. (The tests add "cpu" to run the kernel path too.)"""


class _SlicedMatmul(torch.autograd.Function):
    """x (N, K) rows sorted by group, w (E, K, M), sizes (host ints) -> (N, M): one mm per group,
    each written into its rows of one output (no `cat`), and in the backward pass each expert's
    gradient straight into its slice of grad_w."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        out = x.new_empty(x.shape[0], w.shape[-1])
        for e, rows in _slices(sizes):
            torch.mm(x[rows], w[e], out=out[rows])
        ctx.save_for_backward(x, w)
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.empty_like(x)
            for e, rows in _slices(ctx.sizes):
                torch.mm(grad[rows], w[e].t(), out=grad_x[rows])
        if ctx.needs_input_grad[1]:
            grad_w = torch.empty_like(w)
            for e, n in enumerate(ctx.sizes):
                if n == 0:
                    grad_w[e].zero_()  # an expert without rows
            for e, rows in _slices(ctx.sizes):
                torch.mm(x[rows].t(), grad[rows], out=grad_w[e])
        return grad_x, grad_w, None


def _slices(sizes: list[int]):
    """(group, row slice) of every group with rows."""
    start = 0
    for e, n in enumerate(sizes):
        if n:
            yield e, slice(start, start + n)
        start += n


def _grouped_matmul(x: torch.Tensor, w: torch.Tensor, groups: _Groups) -> torch.Tensor:
    """Rows of x sorted by group; rows of group e multiply w[e]. x (N, K), w (E, K, M) -> (N, M)."""
    if _grouped_mm_fits(x, w) and (x.device.type in _GROUPED_MM_DEVICES or torch.compiler.is_compiling()):
        offs = torch.cumsum(groups.counts, 0, dtype=torch.int32)
        return _GROUPED_MM(x, w.to(x.dtype), offs=offs)
    return _SlicedMatmul.apply(x.contiguous(), w.to(x.dtype), groups.sizes)


def _swiglu_experts(x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    groups = _Groups(counts)
    return _grouped_matmul(swiglu(_grouped_matmul(x_sorted, w13, groups)), w2, groups)


# torch.compiler.disable, applied on the first call: wrapping at import time imports torch._dynamo,
# 1.1 s of every process that imports mythos (each Ray worker, Serve replica, test worker)
_swiglu_experts_eager = torch._disable_dynamo(_swiglu_experts)


def _grouped_mm_traceable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether torch.compile can trace the grouped expert matmuls: its shape function for grouped_mm
    mirrors the CUDA kernel and takes bf16 only, and the per-slice path reads sizes to the host.
    (w2's widths too must be multiples of 8, 16 bytes in bf16, for the second grouped matmul.)"""
    return x.dtype == torch.bfloat16 and _grouped_mm_fits(x, w13) and w2.shape[-1] % 8 == 0 \
        and w2.shape[-2] % 8 == 0


class _Dispatch(torch.autograd.Function):
    """x (N, D) -> its rows in expert order, x[order // k] (N*k, D): each token's k copies. The
    backward pass gathers the gradient back into (token, slot) order and sums over the k slots."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, torch.div(order, k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _sum_slots(grad.index_select(0, inverse).view(inverse.shape[0] // ctx.k, ctx.k, -1)), None, None, None


def _sum_slots(g: torch.Tensor) -> torch.Tensor:
    """(N, k, D) -> (N, D), the sum over the k slots as k - 1 additions of (N, D) slices: on the CPU
    `sum(1)` over the middle dimension took 2.0 ms where adding the two halves took 0.4 (N=4,096, k=2,
    D=512)."""
    if g.shape[1] == 1:
        return g[:, 0]
    out = torch.add(g[:, 0], g[:, 1])
    for j in range(2, g.shape[1]):
        out += g[:, j]
    return out


class _Combine(torch.autograd.Function):
    """Expert outputs y (N*k, D) in expert order and gate weights (N, k) -> out (N, D), the
    gate-weighted sum of each token's k outputs. Both directions gather; nothing scatters."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, gates: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        n, k = gates.shape
        y_tok = y.index_select(0, inverse).view(n, k, -1)  # (N, k, D): token-major
        g = gates.to(y.dtype)
        ctx.save_for_backward(y_tok, g, order)
        ctx.gates_dtype = gates.dtype
        out = y_tok[:, 0] * g[:, :1]
        for j in range(1, k):
            out.addcmul_(y_tok[:, j], g[:, j:j + 1])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y_tok, g, order = ctx.saved_tensors
        grad_y = grad_gates = None
        if ctx.needs_input_grad[0]:  # row i of y is copy order[i] of token order[i] // k: its gradient
            # is that token's gradient times the copy's gate, gathered once and scaled in place
            k = g.shape[1]
            grad_y = grad.index_select(0, torch.div(order, k, rounding_mode="floor"))
            grad_y.mul_(g.reshape(-1).index_select(0, order).unsqueeze(-1))
        if ctx.needs_input_grad[1]:
            grad_gates = torch.einsum("nkd,nd->nk", y_tok, grad).to(ctx.gates_dtype)
        return grad_y, grad_gates, None, None


class MoE(nn.Module):
    def __init__(
        self,
        dim: int,
        n_experts: int,
        top_k: int,
        expert_dim: int,
        n_shared_experts: int = 1,
        aux_loss_coef: float = 0.0,
        bias_rate: float = 1e-3,
        score: str = "sigmoid",
        n_groups: int = 1,
        topk_groups: int = 1,
        route_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.dim, self.n_experts, self.top_k, self.expert_dim = dim, n_experts, top_k, expert_dim
        self.aux_loss_coef, self.bias_rate = aux_loss_coef, bias_rate
        self.spec = RouterSpec(top_k, score, n_groups, topk_groups, route_scale)
        self.router = nn.Linear(dim, n_experts, bias=False)
        # (E, D, 2F): gate and up projections of every expert, fused; (E, F, D): down projections
        self.w13 = nn.Parameter(torch.empty(n_experts, dim, 2 * expert_dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, expert_dim, dim))
        self.shared = SwiGLU(dim, n_shared_experts * expert_dim) if n_shared_experts > 0 else None
        self.register_buffer("router_bias", torch.zeros(n_experts, dtype=torch.float32))
        # tokens routed to each expert since the last bias update (telemetry and balancing)
        self.register_buffer("expert_load", torch.zeros(n_experts, dtype=torch.float32), persistent=False)
        self.expert_dispatcher: Callable[[MoE, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        """None: every routed expert runs here. A parallel runtime may install a callable
        (moe, x_sorted, counts) -> rows of the same shape and order, to run the experts elsewhere
        (expert parallelism: mythos_platform/train/expert_parallel.py)."""

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.weight, std=std)
        nn.init.normal_(self.w13, std=std)
        nn.init.normal_(self.w2, std=out_std)
        if self.shared is not None:
            self.shared.init_weights(std, out_std)
        self.router_bias.zero_()
        self.expert_load.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, D) -> chosen experts (N, k), gate weights (N, k), affinities (N, E)."""
        return route(self.router(x), self.router_bias, self.spec)  # the bias only chooses

    def experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Every expert's SwiGLU on its contiguous slice of x_sorted (rows sorted by expert, counts
        (E,) rows per expert): here, or through the installed `expert_dispatcher`."""
        if self.expert_dispatcher is not None:
            return self.expert_dispatcher(self, x_sorted, counts)
        return self.local_experts(x_sorted, counts, self.w13, self.w2)

    def local_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor) -> torch.Tensor:
        """The experts whose weights are w13 (E', D, 2F) and w2 (E', F, D) (all of this layer's, or
        the slice a dispatcher holds) on rows sorted by expert, counts (E',)."""
        run = _swiglu_experts
        if torch.compiler.is_compiling() and not _grouped_mm_traceable(x_sorted, w13, w2):
            run = _swiglu_experts_eager  # one graph break: this part runs eagerly inside a compiled block
        return run(x_sorted, counts, w13, w2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> (output (B, S, D), auxiliary loss (scalar, 0 when disabled))."""
        B, S, D = x.shape
        xf = x.reshape(-1, D)  # (N, D)
        N, k = xf.shape[0], self.top_k
        idx, gates, scores = self.route(xf)
        if N == 1 and not (torch.is_grad_enabled() or self.training or torch.compiler.is_compiling()) \
                and self.expert_dispatcher is None and not self._grouped_kernel(xf):
            out = self._one_token(xf, idx, gates)
            if self.shared is not None:
                out = out + self.shared(xf)
            return out.view(B, S, D), xf.new_zeros((), dtype=torch.float32)
        flat_expert = idx.reshape(-1)  # (N*k,): copy j of token n at n*k + j
        order = torch.argsort(flat_expert, stable=True)  # token copies grouped by expert
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
        # (E,) copies per expert; scatter_add_, not bincount, which reads the max back to the host on CUDA
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, flat_expert, torch.ones_like(flat_expert))
        y = self.experts(_Dispatch.apply(xf, order, inverse, k), counts)  # (N*k, D)
        out = _Combine.apply(y, gates, order, inverse).to(xf.dtype)
        if self.shared is not None:
            out = out + self.shared(xf)
        if self.training:
            self.expert_load += counts.detach().to(self.expert_load.dtype)
        aux = xf.new_zeros((), dtype=torch.float32)
        if self.aux_loss_coef > 0 and self.training:
            # sequence-level balance loss: E * sum_e f_e * P_e (DeepSeek-V3, eq. 17-20)
            probs = scores / scores.sum(-1, keepdim=True)
            frac = counts.to(probs.dtype) * self.n_experts / max(N * k, 1)
            aux = self.aux_loss_coef * (frac.detach() * probs.mean(0)).sum()
        return out.view(B, S, D), aux

    def _grouped_kernel(self, x: torch.Tensor) -> bool:
        """Whether the experts of rows like x run through the grouped kernel (no host sync)."""
        return _grouped_mm_fits(x, self.w13) and x.device.type in _GROUPED_MM_DEVICES

    def _one_token(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """The routed experts of one token (x (1, D), inference): decoding at batch 1, every loop
        iteration. Each chosen expert runs on the token directly: no sort, inverse permutation, counts
        or gathers (about 18 of a decoding iteration's ~150 operations on the CPU). The same matmuls
        and the same gate-weighted sum in the same order as the general path, so the same numbers bit
        for bit (tests/test_moe.py). Its one host read of the chosen experts is the general path's
        read of the group sizes; where the grouped kernel runs instead (CUDA), which reads nothing,
        this path is not taken."""
        g = gates.to(x.dtype)
        out = None
        for j, e in enumerate(idx[0].tolist()):  # one host read, as the general path's group sizes
            y = torch.mm(swiglu(torch.mm(x, self.w13[e].to(x.dtype))), self.w2[e].to(x.dtype))
            out = y * g[:, :1] if out is None else out.addcmul_(y, g[:, j:j + 1])
        return out.to(x.dtype)

    @torch.no_grad()
    def update_router_bias(self, load: torch.Tensor | None = None) -> torch.Tensor:
        """Aux-loss-free balancing step from an observed per-expert load (default: the local
        count since the last update; a distributed trainer passes the all-reduced count so that
        every rank applies the same step). Resets the local count; returns the load used."""
        load = self.expert_load.clone() if load is None else load.to(self.router_bias.device, torch.float32)
        if load.sum() > 0:
            self.router_bias += self.bias_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()
        return load

    def extra_repr(self) -> str:
        s = self.spec
        groups = f", groups={s.topk_groups}/{s.n_groups}" if s.n_groups > 1 else ""
        return (f"experts={self.n_experts}, top_k={self.top_k}, expert_dim={self.expert_dim}, score={s.score}"
                f"{groups}, route_scale={s.route_scale:g}")


def load_imbalance(load: torch.Tensor) -> float:
    """max/mean expert load (1.0 = perfectly balanced)."""
    mean = load.float().mean()
    return float(load.max() / mean) if mean > 0 else math.nan
