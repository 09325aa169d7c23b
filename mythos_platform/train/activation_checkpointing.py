"""Activation checkpointing: keep a unit's inputs in the forward pass, recompute its inside in the backward.

Gradient checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost") trades
one extra forward of a unit for the activations it would keep for backward; Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models") count what a transformer
layer keeps, ~34 bytes x sequence x hidden per layer in 16-bit without it, against the layer's
input alone with it. In a looped model the recurrent block is run T times, and truncated
backprop keeps the activations of the last `bptt_depth` iterations: that is the memory that grows.

Modes (`train.activation_checkpointing`):
- none: keep everything.
- block: every transformer block call is a unit: each prelude and coda block, and each core
  layer at each differentiated loop iteration (what is kept: each block's input).
- iteration: each differentiated loop iteration is one unit (the input norm, the core layers,
  the depth-wise LoRA and the injection: `RecurrentBlock.iteration`), so what an iteration keeps
  is its input state; prelude and coda blocks as in `block`. The recomputation of one iteration
  holds that iteration's activations, once, during the backward pass.

How: the unit's callable on the instance (`block.forward`, `core.iteration`) is replaced by one
that runs it under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`. The module tree,
its parameter names and its state_dict keys do not change (checkpoints, DCP and exports stay
compatible; torch's `checkpoint_wrapper` would insert a `_checkpoint_wrapped_module` level that
only its state_dict hooks hide), and FSDP2's `fully_shard` on a block, applied afterwards, keeps
its hooks outside the checkpoint (its pre-backward all-gather precedes the recomputation), as in
torchtitan's order. Non-reentrant checkpointing keeps the autograd graph, so DDP's unused-parameter
search still sees every parameter.

- Under no_grad (inference, validation, the truncated iterations) the unit runs as it is.
- RNG: the checkpoint restores the RNG state for the recomputation (preserve_rng_state), so
  dropout (off by default) and noise draw the same numbers twice.
- Buffers a forward updates (the MoE's expert-load count that the router-bias balancing reads)
  are restored after the recomputation, so a checkpointed step counts what a plain one counts.
- torch.compile (mythos/compile.py, applied afterwards): dynamo does not trace a checkpoint with
  a context_fn, so the checkpointing call runs eagerly; what it calls stays compiled. With
  `iteration` the compiled core layers run compiled inside the checkpointed iteration; with
  `block` the checkpointed block is the compiled unit itself, so it runs eagerly (checked by
  hand: gradients and expert loads equal the plain model's in both).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mythos import Mythos

MODES = ("none", "block", "iteration")


class BuffersRestored:
    """A context manager that undoes on exit what its body did to `module`'s buffers; reusable, as a
    recomputation runs again when a graph is backpropagated twice (retain_graph)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(b, b.detach().clone()) for b in self.module.buffers()]

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buf, value in self.saved:
                buf.copy_(value)
        self.saved = []


class Checkpointed:
    """`fn` run under non-reentrant activation checkpointing whenever autograd records.

    `owner`: the module whose buffers the recomputation must leave as the first run left them."""

    def __init__(self, fn: Callable[..., Any], owner: nn.Module) -> None:
        self.fn, self.owner = fn, owner

    # dynamo cannot trace checkpoint with a context_fn; what `fn` calls stays compiled. The private
    # torch._disable_dynamo (what torch.compiler.disable calls) imports torch._dynamo on the first
    # call, not at import: 0.4 s of every training worker that never compiles
    @torch._disable_dynamo
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.fn(*args, **kwargs)
        return checkpoint(self.fn, *args, use_reentrant=False, context_fn=self._contexts, **kwargs)

    def _contexts(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """(around the first run, around the recomputation)."""
        return contextlib.nullcontext(), BuffersRestored(self.owner)


def checkpoint_method(module: nn.Module, name: str) -> None:
    """Replace `module.<name>` on this instance by its checkpointed self (once)."""
    current = getattr(module, name)
    if not isinstance(current, Checkpointed):
        setattr(module, name, Checkpointed(current, module))


def is_checkpointed(module: nn.Module, name: str = "forward") -> bool:
    return isinstance(getattr(module, name), Checkpointed)


def apply_activation_checkpointing(model: Mythos, mode: str) -> Mythos:
    """Checkpoint `model`'s units in place for `mode` (none | block | iteration); returns it.
    Apply it to the bare model, before compile and before FSDP2 / DDP wrap it."""
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing: got {mode!r}; allowed: {', '.join(MODES)}")
    if mode == "none":
        return model
    for block in (*model.prelude, *model.coda):
        checkpoint_method(block, "forward")
    if mode == "block":
        for layer in model.core.layers:
            checkpoint_method(layer, "forward")
    else:
        checkpoint_method(model.core, "iteration")
    return model
