"""Exact parameter counts (on the meta device), FLOPs per token and KV-cache size of a config.

FLOPs count matrix multiplies (2 per multiply-add), the way MFU is usually defined (Kaplan et
al. 2020; PaLM appendix B): every weight a token passes through, once per loop iteration for
the recurrent block and only the top-k routed experts, plus attention scores and values over
the keys a token sees, plus the LM head. A training step is forward + backward where the
backward costs 2x the forward of what is under autograd: with truncated backprop the first
n_loops - bptt_depth iterations are forward only.

MoDA (`cfg.moda`): iteration t's core layers also attend to t + 1 depth entries per token, and
each iteration writes one entry per core layer (a linear of the core, counted with it). The KV cache
does not grow: depth entries are a transient working set of one forward pass
(`moda_depth_numbers_per_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import MythosConfig
from .model import Mythos
from .moe import MoE


@dataclass(frozen=True)
class ParamCount:
    total: int
    """Every parameter (tied embeddings once)."""
    active: int
    """Parameters a token passes through in one pass: routed experts count top_k / n_experts."""
    embedding: int
    prelude_coda: int
    core: int
    core_active: int


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def meta_model(cfg: MythosConfig) -> Mythos:
    with torch.device("meta"):
        return Mythos(cfg)


def parameter_counts(cfg: MythosConfig, model: Mythos | None = None) -> ParamCount:
    model = model if model is not None else meta_model(cfg)
    total = _numel(model)
    routed = sum(m.w13.numel() + m.w2.numel() for m in model.moe_layers())
    inactive = 0
    if cfg.use_moe:
        inactive = routed - routed * cfg.top_k // cfg.n_experts
    core = _numel(model.core)
    embedding = model.tok_emb.weight.numel() + (0 if cfg.tie_embeddings else model.lm_head.weight.numel())
    pc = _numel(model.prelude) + _numel(model.coda)
    return ParamCount(total, total - inactive, embedding, pc, core, core - inactive)


def _linear_flops(m: nn.Module) -> int:
    """2 x weights a token multiplies by in this module (routed experts at top_k / n_experts)."""
    n = 0
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            n += mod.weight.numel()
        elif isinstance(mod, MoE):
            n += (mod.w13.numel() + mod.w2.numel()) * mod.top_k // mod.n_experts
    return 2 * n


def _attention_flops(cfg: MythosConfig, ctx: float) -> float:
    """Scores + weighted values for one token attending to ctx keys, one layer."""
    if cfg.attn_type == "mla":
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    else:
        qk = v = cfg.head_dim
    return 2.0 * cfg.n_heads * (qk + v) * ctx


@dataclass(frozen=True)
class Flops:
    forward: float
    """FLOPs per token of one forward pass."""
    train_step: float
    """FLOPs per token of forward + backward (truncated backprop counted)."""
    per_loop: float
    """FLOPs per token of one recurrent iteration (forward), without MoDA's depth attention."""
    depth_attention: float = 0.0
    """MoDA: FLOPs per token of attending to depth entries, all iterations of the forward pass (in
    `forward`; iteration t reads t + 1 entries per core layer)."""


def flops_per_token(
    cfg: MythosConfig,
    n_loops: int | None = None,
    seq_len: int | None = None,
    bptt_depth: int | None = None,
    model: Mythos | None = None,
) -> Flops:
    """FLOPs per token at `n_loops` iterations over causal sequences of `seq_len` tokens."""
    model = model if model is not None else meta_model(cfg)
    n_loops = cfg.n_loops if n_loops is None else n_loops
    seq_len = cfg.max_seq_len if seq_len is None else seq_len
    bptt = n_loops if bptt_depth is None else min(bptt_depth, n_loops)
    ctx = (seq_len + 1) / 2  # mean keys seen per token under a causal mask
    attn = _attention_flops(cfg, ctx)
    once = _linear_flops(model.prelude) + _linear_flops(model.coda) + 2 * cfg.dim * cfg.vocab_size
    once += (cfg.prelude_layers + cfg.coda_layers) * attn
    per_loop = _linear_flops(model.core) + cfg.core_layers * attn
    depth = _depth_attention_flops(cfg, 0, n_loops)
    forward = once + n_loops * per_loop + depth
    grad_part = once + bptt * per_loop + _depth_attention_flops(cfg, n_loops - bptt, n_loops)
    return Flops(forward, forward + 2 * grad_part, per_loop, depth)


def _depth_attention_flops(cfg: MythosConfig, first: int, end: int) -> float:
    """MoDA's depth part of iterations first..end-1 (iteration t: t + 1 keys), all core layers."""
    if not cfg.moda:
        return 0.0
    keys = sum(t + 1 for t in range(first, end))
    return cfg.core_layers * _attention_flops(cfg, keys)


def kv_cache_numbers_per_token(cfg: MythosConfig, n_loops: int | None = None, share_loops: bool = False) -> int:
    """Numbers the KV cache holds per token, over all layers and loop iterations (MoDA adds none)."""
    n_loops = cfg.n_loops if n_loops is None else n_loops
    if cfg.attn_type == "mla":
        per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_layer = 2 * cfg.n_kv_heads * cfg.head_dim
    slots = cfg.prelude_layers + cfg.coda_layers + cfg.core_layers * (1 if share_loops else n_loops)
    return per_layer * slots


def kv_cache_numbers_per_layer(cfg: MythosConfig) -> int:
    return kv_cache_numbers_per_token(cfg, n_loops=1) // cfg.n_layers_total


def moda_depth_numbers_per_token(cfg: MythosConfig, n_loops: int | None = None) -> int:
    """MoDA: depth keys and values held per token at the end of a forward pass of `n_loops`
    iterations (the entries of e and h_1..h_{n-1}, each core layer), freed after the pass; 0 without MoDA."""
    n_loops = cfg.n_loops if n_loops is None else n_loops
    if not cfg.moda:
        return 0
    return cfg.core_layers * n_loops * 2 * cfg.n_kv_heads * cfg.head_dim
