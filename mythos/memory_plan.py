"""Activation memory of one training step: what autograd keeps for the backward pass, per token.

Arithmetic on a MythosConfig (no tensors), one term per tensor the model's forward saves for its
backward, read off the code and checked against `torch.autograd.graph.saved_tensors_hooks`
(tests/test_memory_plan.py: exact for fp32 on CPU). Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", section 4) count a GPT layer the same way, as
s·b·h·(34 + 5·a·s/h) bytes in 16-bit; here the layer is this model's (RMSNorm, SwiGLU, MoE, MLA or
GQA, MoDA), and the attention kernel keeps no s x s scores when it is a fused one (flash or
memory-efficient SDPA: Dao et al. 2022, "FlashAttention"), which keeps q, k, v, its output and one
log-sum-exp per head and query instead.

Symbols: D dim, H heads, hd = D / H, Hkv kv heads, F dense hidden, Fe expert hidden, k top-k,
E experts, S sequence, V vocabulary, T = min(bptt_depth, loops) the differentiated iterations.

- a norm (RMSNorm of width w) keeps its input, its normalised input and 1/rms: 2w + 1;
- a linear keeps its input (w); a block's residual sums are new tensors, kept by the next norm;
- GQA: q and k after RoPE, the fused qkv output (v is a view of it), the output, lse (fp32);
- MLA: the query latent (norm, up-projection input), the kv latent and its norm, the expanded
  q and k (H (d_nope + d_rope) each), the kv expansion (v is a view), the output; fused kernels
  add lse, the math kernel (CPU, where the head widths differ) keeps H·S probabilities instead;
- MoDA: explicit attention (no fused kernel): H (S + T) fp32 probabilities, their sequence and
  depth parts, the t + 1 stacked depth keys and values;
- SwiGLU: input, w13 output, silu, product: D + 4F; MoE: the router input and fp32 scores, then per
  routed copy (k per token): the gathered input, w13 output, silu, product and the expert output
  gathered back into token order (the weighted sum keeps no copy of its own): k (2D + 4Fe), the
  shared experts 4 Fsh, and int64 indices;
- the loop, per differentiated iteration: the input norm (2D + 1), the state (D), the depth-wise
  LoRA (2 r) and ACT's per-position floats; the truncated iterations keep nothing (no_grad);
- once: e_norm, e, the last state (ACT), the final norm and head input, the loss's fp32
  log-softmax (4 V bytes per token; the logits themselves are kept too: the caller holds them).

Activation checkpointing (mythos_platform/train/activation_checkpointing.py): a checkpointed
unit keeps only its inputs (block: each block's input, D; iteration: the state entering the
iteration, D), and the backward pass recomputes one unit at a time, so the peak adds the largest
unit's activations and the gradient of its largest tensor ("recompute"). The start of the backward pass adds the loss gradients (two
fp32 N x V buffers, "head"); the peak is saved + kept logits + max(head, recompute).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import MythosConfig

AC_MODES = ("none", "block", "iteration")
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class Per:
    """Per-token memory: `act` numbers in the activation dtype, plus `fixed` bytes (fp32/int64/bool)."""

    act: float = 0.0
    fixed: float = 0.0

    def __add__(self, other: "Per") -> "Per":
        return Per(self.act + other.act, self.fixed + other.fixed)

    def __mul__(self, n: float) -> "Per":
        return Per(self.act * n, self.fixed * n)

    __rmul__ = __mul__

    def bytes(self, dtype_bytes: int) -> float:
        return self.act * dtype_bytes + self.fixed


def norm(w: int) -> Per:
    return Per(2 * w, 4)


def gqa(cfg: MythosConfig) -> Per:
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    return Per(cfg.dim + H * hd + Hkv * hd + (H + 2 * Hkv) * hd + H * hd, 4 * H)


def mla(cfg: MythosConfig, fused: bool, seq: int) -> Per:
    H, dq = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q = Per(3 * cfg.q_lora_rank, 4) if cfg.q_lora_rank else Per()
    kv = Per(3 * cfg.kv_lora_rank + cfg.qk_rope_head_dim, 4)
    core = Per(cfg.dim + 2 * H * dq + H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim)
    scores = Per(0, 4 * H) if fused else Per(H * seq)
    return q + kv + core + scores


def moda(cfg: MythosConfig, seq: int, entries: float) -> Per:
    """GQA with MoDA's explicit attention over S sequence and `entries` depth keys."""
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    kept = cfg.dim + (H + 2 * Hkv) * hd + Hkv * hd + 3 * H * hd + H * (seq + entries) + 2 * entries * Hkv * hd
    return Per(kept, 4 * H * (seq + entries))


def swiglu(cfg: MythosConfig, hidden: int) -> Per:
    return Per(cfg.dim + 4 * hidden)


def moe(cfg: MythosConfig) -> Per:
    k, D = cfg.top_k, cfg.dim
    shared = 4 * cfg.n_shared_experts * cfg.expert_dim
    return Per(D + k * (2 * D + 4 * cfg.expert_dim) + shared, 4 * cfg.n_experts + 8 + 32 * k)


def attention_kept(cfg: MythosConfig, fused: bool, seq: int, core: bool, entries: float) -> Per:
    if cfg.attn_type == "mla":
        return mla(cfg, fused, seq)
    return moda(cfg, seq, entries) if (core and cfg.moda) else gqa(cfg)


def block_kept(cfg: MythosConfig, core: bool, fused: bool, seq: int, entries: float = 0.0) -> Per:
    """A transformer block call without checkpointing: norms, attention, FFN (MoE in the core)."""
    ffn = moe(cfg) if (core and cfg.use_moe) else swiglu(cfg, cfg.ffn_dim)
    return norm(cfg.dim) + attention_kept(cfg, fused, seq, core, entries) + norm(cfg.dim) + ffn


def largest_tensor(cfg: MythosConfig, core: bool, fused: bool, seq: int, entries: float = 0.0) -> Per:
    """The largest tensor per token a block call makes: while the backward pass works through a
    recomputed unit it holds the gradient of about one such tensor besides the unit's activations."""
    ffn = cfg.top_k * max(2 * cfg.expert_dim, cfg.dim) if (core and cfg.use_moe) else 2 * cfg.ffn_dim
    attn = 0.0
    if cfg.attn_type == "mla" and not fused:
        attn = cfg.n_heads * seq
    elif core and cfg.moda:
        attn = cfg.n_heads * (seq + entries)
    return Per(max(ffn, attn, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim))


def loop_glue(cfg: MythosConfig) -> Per:
    """One differentiated iteration outside its core layers: in_norm, the state, LoRA, ACT."""
    out = norm(cfg.dim) + Per(cfg.dim + 2 * cfg.lora_rank)
    if cfg.act_enabled:
        out = out + Per(0, 10)
    if cfg.moda:  # the depth writer's norm and projection input
        out = out + Per(2 * cfg.dim, 4)
    return out


def head_kept(cfg: MythosConfig) -> Per:
    """The final norm, the head's input and the loss's fp32 log-softmax (and its int64 targets)."""
    return norm(cfg.dim) + Per(cfg.dim, 4 * cfg.vocab_size + 8)


@dataclass(frozen=True)
class StepShape:
    """One micro-batch of training: its size, the loop, checkpointing and dtype."""

    micro_batch: int
    seq_len: int
    n_loops: int
    bptt_depth: int
    checkpointing: str = "none"
    dtype: str = "bf16"
    fused_attention: bool = True
    """Flash / memory-efficient SDPA (CUDA); False: the math kernel (CPU with MLA's unequal head widths)."""
    loop_losses: bool = False
    """Coda, head and loss also on every differentiated loop state (deep supervision, trajectory)."""

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def differentiated(self) -> int:
        return min(self.bptt_depth, self.n_loops)


@dataclass(frozen=True)
class Activations:
    """Bytes of one micro-batch's activations (one GPU): saved at the end of the forward pass,
    the logits the caller keeps, and the two transients of the backward pass."""

    saved: float
    logits: float
    head: float
    recompute: float

    @property
    def peak(self) -> float:
        return self.saved + self.logits + max(self.head, self.recompute)


def _differentiated_iterations(shape: StepShape) -> range:
    return range(shape.n_loops - shape.differentiated, shape.n_loops)


def saved_per_token(cfg: MythosConfig, shape: StepShape) -> tuple[Per, Per]:
    """(what the forward keeps per token, the largest unit a backward recomputes per token)."""
    S, fused, mode = shape.seq_len, shape.fused_attention, shape.checkpointing
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing must be one of {AC_MODES}, got {mode!r}")
    dense = block_kept(cfg, False, fused, S)
    outer = cfg.prelude_layers + cfg.coda_layers * (1 + (shape.differentiated if shape.loop_losses else 0))
    once = Per(0, 8) + norm(cfg.dim) + Per(cfg.dim * (2 if cfg.act_enabled else 1))  # ids, e_norm, e, h_T
    once = once + head_kept(cfg) * (1 + (shape.differentiated if shape.loop_losses else 0))
    loop, recompute = Per(), Per()
    depth_args = 2 * cfg.n_kv_heads * cfg.head_dim  # one MoDA entry, keys and values, per core layer
    for t in _differentiated_iterations(shape):
        core = block_kept(cfg, True, fused, S, t + 1)
        if mode == "none":
            loop = loop + loop_glue(cfg) + core * cfg.core_layers
            continue
        if mode == "block":
            moda_args = Per(depth_args * (t + 1)) if cfg.moda else Per()
            loop = loop + loop_glue(cfg) + (Per(cfg.dim) + moda_args) * cfg.core_layers
            recompute = _larger(recompute, core + largest_tensor(cfg, True, fused, S, t + 1))
        else:
            moda_kept = Per(2 * cfg.dim + depth_args * cfg.core_layers, 4) if cfg.moda else Per()
            loop = loop + Per(cfg.dim, 10 if cfg.act_enabled else 0) + moda_kept
            recompute = _larger(recompute, loop_glue(cfg) + core * cfg.core_layers +
                                largest_tensor(cfg, True, fused, S, t + 1))
    if mode == "none":
        return once + dense * outer + loop, Per()
    return once + Per(cfg.dim) * outer + loop, _larger(recompute, dense + largest_tensor(cfg, False, fused, S))


def _larger(a: Per, b: Per) -> Per:
    return a if a.bytes(2) >= b.bytes(2) else b


def activation_bytes(cfg: MythosConfig, shape: StepShape) -> Activations:
    """Activation bytes of one micro-batch of `shape` (see the module docstring for the terms)."""
    a = DTYPE_BYTES[shape.dtype]
    kept, unit = saved_per_token(cfg, shape)
    n = shape.tokens
    loops_with_logits = 1 + (shape.differentiated if shape.loop_losses else 0)
    return Activations(saved=kept.bytes(a) * n, logits=a * cfg.vocab_size * n * loops_with_logits,
                       head=8 * cfg.vocab_size * n, recompute=unit.bytes(a) * n)


@dataclass(frozen=True)
class ParamLayout:
    """Parameter counts by where a sharded trainer puts them (from the meta-device model)."""

    total: int
    routed: int
    """Routed expert weights (w13, w2) of every MoE layer: what expert parallelism shards."""
    root: int
    """Outside the transformer blocks: embedding (and an untied head), norms, the loop's injection,
    LoRA, ACT and MoDA writer (FSDP2's root unit, unsharded for the whole step)."""
    largest_block: int
    """The largest transformer block without its routed experts (an FSDP2 unit)."""
    routed_per_layer: int


def param_layout(cfg: MythosConfig, model=None) -> ParamLayout:
    """`model`: the config's model on the meta device, if already built (`sizing.meta_model`)."""
    from .moe import MoE
    from .sizing import meta_model

    model = model if model is not None else meta_model(cfg)
    numel = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    experts = lambda m: sum(e.w13.numel() + e.w2.numel() for e in m.modules() if isinstance(e, MoE))  # noqa: E731
    routed = [experts(layer) for layer in model.core.layers]
    blocks = [*model.prelude, *model.core.layers, *model.coda]
    own = [numel(b) - experts(b) for b in blocks]
    return ParamLayout(total=numel(model), routed=sum(routed), root=numel(model) - sum(numel(b) for b in blocks),
                       largest_block=max(own), routed_per_layer=max(routed, default=0))
