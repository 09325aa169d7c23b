"""Wrap the single-device model for data parallelism: FSDP2 (fully_shard per block) or DDP.

The model code knows nothing of this (torchtitan's layout: parallelisms are applied outside the
model): it is built on the meta device, each transformer block and then the root are sharded with
`fully_shard` on a 1-D device mesh, and only then are the parameters allocated and initialised.
gloo on CPU, NCCL + bf16 mixed precision on GPU (the process group itself is set up by Ray
Train's TorchTrainer). With expert parallelism the routed experts are sharded first
(expert_parallel.py) and left out of FSDP2 / DDP; docs/parallelism.md draws the layout.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from mythos import Mythos, MythosConfig
from mythos.compile import apply_compile

from .activation_checkpointing import apply_activation_checkpointing
from .expert_parallel import apply_expert_parallel, expert_param_names, expert_params


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def use_bf16(mixed_precision: str, device: torch.device) -> bool:
    """"auto" means bf16 on CUDA and fp32 on CPU."""
    return mixed_precision == "bf16" or (mixed_precision == "auto" and device.type == "cuda")


def blocks(model: Mythos) -> list[nn.Module]:
    return [*model.prelude, *model.core.layers, *model.coda]


def build_model(cfg: MythosConfig, parallelism: str, device: torch.device, bf16: bool, seed: int,
                prepare: Callable[[Mythos], None] | None = None, activation_checkpointing: str = "none",
                expert_parallel: int = 1, compile: str = "off") -> nn.Module:
    """The model, initialised identically on every rank and wrapped for `parallelism`.

    `prepare` changes the bare, initialised model before it is wrapped (load weights, initialise
    rows, register a parametrization); it runs identically on every rank. Without it, FSDP2 builds
    on the meta device and initialises after sharding; with it, the model is built and prepared
    whole, then sharded (fine for the sizes that need a `prepare` today). `activation_checkpointing`:
    none | block | iteration (activation_checkpointing.py), applied before the wrapping.
    `expert_parallel` > 1: the routed experts sharded over groups of that many ranks
    (expert_parallel.py), sliced from the whole model and left out of FSDP2 / DDP. `compile`:
    auto | on | off, torch.compile of the loop body's blocks in place (mythos/compile.py)."""
    world = world_size()
    whole = prepare is not None or expert_parallel > 1
    if parallelism == "fsdp" and world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not whole:
            with torch.device("meta"):
                model = Mythos(cfg)
        else:
            torch.manual_seed(seed)
            model = Mythos(cfg).to(device)
            if prepare is not None:
                prepare(model)
        apply_expert_parallel(model, expert_parallel, device.type)
        apply_activation_checkpointing(model, activation_checkpointing)
        apply_compile(model, compile, device)
        mesh = init_device_mesh(device.type, (world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=mp, ignored_params=expert_params(block) or None)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        if not whole:
            model.to_empty(device=device)
            torch.manual_seed(seed)
            model.init_weights()
        return model
    torch.manual_seed(seed)
    model = Mythos(cfg).to(device)
    if prepare is not None:
        prepare(model)
    apply_expert_parallel(model, expert_parallel, device.type)
    apply_activation_checkpointing(model, activation_checkpointing)
    apply_compile(model, compile, device)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        DDP._set_params_and_buffers_to_ignore_for_model(model, expert_param_names(model))

        # buffers (router bias, expert load) are kept in step by the trainer, not broadcast before
        # each forward (they are equal on every rank when DDP copies rank 0's once, at wrapping);
        # the graph changes with the sampled loop count (e.g. one loop never calls the ACT head)
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False,
                    find_unused_parameters=True)
    return model


def unwrap(model: nn.Module) -> Mythos:
    """The Mythos module inside a DDP wrapper (FSDP2 modifies the module in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, Mythos) else model  # type: ignore


def autocast(device: torch.device, bf16: bool, fsdp: bool):
    """bf16 autocast for DDP/single-device runs; FSDP2's policy casts parameters itself."""
    if bf16 and not fsdp:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _comm_device() -> torch.device:
    """NCCL reduces CUDA tensors only; gloo takes CPU tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        out = t.detach().to(_comm_device(), torch.float32, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / world_size()).to(t.device)
    return t


def all_reduce_min(value: int) -> int:
    if world_size() > 1:
        t = torch.tensor([value], dtype=torch.int64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())
    return value


def all_reduce_sum_(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    if world_size() > 1 and tensors:
        flat = torch.cat([t.reshape(-1).float() for t in tensors]).to(_comm_device())
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(tensors[0].device)
        out, i = [], 0
        for t in tensors:
            out.append(flat[i:i + t.numel()].view_as(t))
            i += t.numel()
        return out
    return tensors


def no_sync(model: nn.Module, active: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if active and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
