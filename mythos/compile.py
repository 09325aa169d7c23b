"""Compiled loop body: torch.compile of the transformer blocks the recurrent loop runs.

Each core layer (`model.core.layers[j]`, a `TransformerBlock`) is compiled in place with
`nn.Module.compile`, so the module tree and the state_dict keys do not change (wrapping it in
`torch.compile(module)` would insert an `_orig_mod.` level). Compilation is lazy: the first call
traces and compiles, later calls reuse the graph.

Why the loop count never recompiles: the loop itself, the loop index t, the loop-index embedding,
the depth-wise LoRA, the injection and the exit test stay outside the compiled block (plain Python
in `RecurrentBlock`); the block sees only tensors of the same shapes at every iteration. So one
graph serves every iteration of every loop count, for every core layer and every model built from
the same config (torch.compile guards on the code, the tensors' shapes and dtypes and the module's
type and flags, not on the module instance). What does make new graphs, once each:
- autograd on or off (the iterations truncated backprop runs under no_grad, inference), and
  train or eval mode;
- a new sequence length or batch size: the first change recompiles with those sizes symbolic
  (torch's automatic dynamic shapes), and the graph then serves every size;
- with MoDA, the depth axis (t + 1 entries) grows with t: the same, once;
- with a KV cache, the prefill (the cache slot is empty) and the decode steps.
MoE blocks in fp32 break the graph once around the routed experts' matmuls, which run eagerly
(`mythos.moe`: compile traces grouped_mm in bf16 only): two graphs around the experts.

What it buys is measured in docs/performance.md (`benchmarks/model_bench.py --compile-size`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

MODES = ("auto", "on", "off")


def compile_wanted(mode: str, device: torch.device) -> bool:
    """Whether `mode` compiles on `device`. auto: on CUDA only; on a CPU the measured gain of a train
    step is 0.97-1.07x and decoding is slower, while every new process pays seconds of compiling
    (docs/performance.md)."""
    if mode not in MODES:
        raise ValueError(f"compile: got {mode!r}; allowed: {', '.join(MODES)}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def compile_loop_body(model: nn.Module, **options: Any) -> list[nn.Module]:
    """Compile every core layer of a Mythos model in place (options go to torch.compile); returns them.

    A layer whose `forward` an instance-level wrapper has replaced that runs `wrapper.fn` (activation
    checkpointing per block: mythos_platform/train/activation_checkpointing.py) gets `fn` compiled
    instead, inside the wrapper: torch.compile does not trace into a checkpoint with a context_fn
    (it would run the whole block eagerly), and so the recomputation in the backward pass runs
    compiled too."""
    layers = list(model.core.layers)
    for layer in layers:
        wrapper = layer.__dict__.get("forward")
        if wrapper is not None and callable(getattr(wrapper, "fn", None)):
            wrapper.fn = torch.compile(wrapper.fn, **options)
        else:
            layer.compile(**options)
    return layers


def is_compiled(module: nn.Module) -> bool:
    """Whether `module` was compiled in place (`nn.Module.compile`, or inside its forward's wrapper)."""
    inner = getattr(module.__dict__.get("forward"), "fn", None)
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(inner, "_torchdynamo_orig_callable")


def apply_compile(model: nn.Module, mode: str, device: torch.device, **options: Any) -> bool:
    """Compile the loop body of a (bare, unwrapped) Mythos model when `mode` asks for it on
    `device` (auto | on | off); returns whether it did. Apply before FSDP2 / DDP wrap the model."""
    if not compile_wanted(mode, device):
        return False
    compile_loop_body(model, **options)
    return True
