"""Expert parallelism: each MoE layer's routed experts sharded over a group of workers, every
token copy sent to the worker that holds its expert and back by all-to-all.

The scheme of GShard (Lepikhin et al. 2020) and the Switch Transformer (Fedus et al. 2021),
with the uneven (capacity-free, no token dropped) dispatch of DeepSeek-V3 (2024):

    world = edp x ep workers on a 2-D mesh (edp, ep); an expert-parallel group is a row of ep
    consecutive ranks, and ep rank r holds experts [r E/ep, (r+1) E/ep) of every MoE layer.

    every rank routes its own tokens over all E experts (router and bias are replicated)
    -> copies sorted by expert (MoE.forward)          -> rows per destination: counts summed per rank
    -> all-to-all of the counts (E,), then of the rows (uneven splits, read to the host once)
    -> received rows regrouped by local expert        -> the local grouped matmul (MoE.local_experts)
    -> back in arrival order, reverse all-to-all      -> combine with the gates (MoE.forward)

Both all-to-alls are differentiable (their backward is the reverse all-to-all), so the gradient of
an expert weight on its owner sums the contributions of every rank's tokens. Everything else
(attention, router, shared experts, norms) is data-parallel over all ranks as before (FSDP2 or
DDP); the expert weights are left out of that and are DTensors placed (Replicate, Shard(0)) on
the (edp, ep) mesh, which distributed checkpoints (DCP) and the full state dict of the export
understand. `reduce_expert_grads` turns their gradients into the data-parallel mean: a sum over
the edp group (the ranks holding the same experts), divided by the world size.

The router bias stays globally balanced as before: the per-expert load is counted from the
routing, which every rank does for its own tokens over all experts, and the trainer all-reduces
it over all ranks before the bias update (DeepSeek-V3's auxiliary-loss-free balancing).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from mythos.moe import MoE


def expert_mesh(device_type: str, world: int, ep: int) -> DeviceMesh:
    """The (edp, ep) mesh: rows of ep consecutive ranks share one layer's experts between them."""
    if ep < 1 or world % ep:
        raise ValueError(f"expert-parallel degree {ep} must divide the world size {world}")
    return init_device_mesh(device_type, (world // ep, ep), mesh_dim_names=("edp", "ep"))


class ExpertDispatch:
    """The `MoE.expert_dispatcher` of one rank: sends each copy to its expert's rank and back."""

    def __init__(self, mesh: DeviceMesh) -> None:
        self.mesh = mesh
        self.group = mesh.get_group("ep")
        self.ep = mesh.size(1)
        self.ep_rank = mesh.get_local_rank("ep")
        self.edp_group = mesh.get_group("edp")
        self.edp = mesh.size(0)

    @torch._disable_dynamo  # split sizes come to the host; runs eagerly inside a compiled block (imports dynamo lazily)
    def __call__(self, moe: MoE, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        w13, w2 = moe.w13.to_local(), moe.w2.to_local()  # (E/ep, D, 2F), (E/ep, F, D)
        n_local = w13.shape[0]
        # counts[j*L:(j+1)*L] are this rank's copies for rank j's experts; receive theirs for ours
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        sizes = torch.cat([counts.view(self.ep, n_local).sum(1), recv]).tolist()  # the dispatch's host sync
        send_splits, recv_counts = sizes[:self.ep], sizes[self.ep:]
        recv_splits = [sum(recv_counts[i * n_local:(i + 1) * n_local]) for i in range(self.ep)]
        x_recv = all_to_all_single_autograd(x_sorted.contiguous(), recv_splits, send_splits, self.group)
        # rows arrive in blocks (source rank, local expert) of recv's sizes: regroup them by local expert
        block_expert = torch.arange(n_local, device=counts.device).repeat(self.ep)
        row_expert = torch.repeat_interleave(block_expert, recv, output_size=sum(recv_splits))
        order = torch.argsort(row_expert, stable=True)
        local_counts = recv.view(self.ep, n_local).sum(0)
        y = moe.local_experts(x_recv[order], local_counts, w13.to(x_recv.dtype), w2.to(x_recv.dtype))
        y_recv = y[torch.argsort(order)]  # back to arrival order
        return all_to_all_single_autograd(y_recv.contiguous(), send_splits, recv_splits, self.group)


def _shard(full: torch.Tensor, mesh: DeviceMesh, rank: int, ep: int) -> nn.Parameter:
    """This rank's experts of a full (E, ...) weight (equal on every rank) as a DTensor parameter."""
    n = full.shape[0] // ep
    local = full.detach()[rank * n:(rank + 1) * n].clone()
    return nn.Parameter(DTensor.from_local(local, mesh, (Replicate(), Shard(0)), run_check=False,
                                           shape=full.shape, stride=full.stride()))


def apply_expert_parallel(model: nn.Module, degree: int, device_type: str) -> None:
    """Shard the routed experts of every MoE layer in `model` over groups of `degree` ranks and
    install the all-to-all dispatch (degree 1: nothing). The model must hold its full, initialised
    weights, equal on every rank: each rank keeps its slice, so the start equals the
    single-process model's."""
    if degree > 1:
        shard_experts(model, expert_mesh(device_type, dist.get_world_size(), degree))


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> None:
    """`apply_expert_parallel` on a given (edp, ep) mesh."""
    ep = mesh.size(1)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if moe.n_experts % ep:
            raise ValueError(f"expert-parallel degree {ep} must divide n_experts={moe.n_experts}")
        dispatch = ExpertDispatch(mesh)
        moe.w13 = _shard(moe.w13, mesh, dispatch.ep_rank, ep)
        moe.w2 = _shard(moe.w2, mesh, dispatch.ep_rank, ep)
        moe.expert_dispatcher = dispatch


def _dispatched(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE) and isinstance(m.expert_dispatcher, ExpertDispatch)]


def expert_params(model: nn.Module) -> set[nn.Parameter]:
    """The expert-parallel weights: data parallelism (FSDP2, DDP) must leave them alone."""
    return {p for m in _dispatched(model) for p in (m.w13, m.w2)}


def expert_param_names(model: nn.Module) -> list[str]:
    """Their fully qualified names in `model` (what DDP's ignore list takes)."""
    params = expert_params(model)
    return [name for name, p in model.named_parameters() if p in params]


@torch.no_grad()
def reduce_expert_grads(model: nn.Module) -> None:
    """After the backward passes of a step: each expert gradient holds the sum over the tokens of
    its ep group; sum it over the edp group as well and divide by the world size, which makes it
    the mean over all ranks that DDP and FSDP2 give the other gradients. No-op without EP."""
    layers = _dispatched(model)
    if not layers:
        return
    world = dist.get_world_size()
    grads = [p.grad.to_local() for m in layers for p in (m.w13, m.w2) if p.grad is not None]
    if not grads:
        return
    if layers[0].expert_dispatcher.edp > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=layers[0].expert_dispatcher.edp_group)
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()
    torch._foreach_div_(grads, float(world))
