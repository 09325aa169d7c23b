"""`MythosConfig`: every knob of the Recurrent-Depth Transformer, validated, JSON round-trippable."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ATTN_TYPES = ("gqa", "mla")
LOOP_DISTRIBUTIONS = ("poisson_lognormal", "fixed", "uniform")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and what is allowed."""


@dataclass
class MythosConfig:
    # --- vocabulary and width --------------------------------------------------------
    vocab_size: int = 320
    """Embedding rows; must be >= the tokenizer's vocabulary."""
    dim: int = 256
    """Residual stream width."""
    n_heads: int = 8
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads for GQA (must divide n_heads). Unused by MLA."""
    max_seq_len: int = 512
    """Longest sequence (prompt + generated) the model accepts."""

    # --- layer layout: prelude -> looped core -> coda -----------------------------------
    prelude_layers: int = 1
    """Dense blocks run once before the loop."""
    core_layers: int = 1
    """Blocks inside the recurrent block (looped together)."""
    coda_layers: int = 1
    """Dense blocks run once after the loop."""
    dense_ffn_dim: int = 0
    """SwiGLU hidden width of prelude/coda blocks; 0 means round(8/3 * dim) to a multiple of 64."""

    # --- loop counts -------------------------------------------------------------------
    n_loops: int = 4
    """Default loop count at inference."""
    train_loops_mean: float = 4.0
    """Mean of the training loop-count distribution."""
    train_loops_max: int = 16
    """Largest loop count drawn in training; also the trained range of the depth-wise LoRA."""
    train_loops_min: int = 1
    """Smallest loop count drawn in training."""
    loop_distribution: str = "poisson_lognormal"
    """How training draws the loop count: poisson_lognormal | fixed | uniform."""
    loop_sigma: float = 0.5
    """Standard deviation of the log-normal rate (poisson_lognormal only)."""
    bptt_depth: int = 4
    """Only the last `bptt_depth` loop iterations are under autograd in training (truncated BPTT)."""

    # --- attention -----------------------------------------------------------------------
    attn_type: str = "gqa"
    """gqa (grouped-query attention) or mla (multi-latent attention, DeepSeek-V2)."""
    rope_theta: float = 10000.0
    q_lora_rank: int = 0
    """MLA: rank of the query latent; 0 projects queries directly."""
    kv_lora_rank: int = 64
    """MLA: rank of the compressed kv latent (what the cache stores, plus the RoPE key)."""
    qk_rope_head_dim: int = 16
    """MLA: per-head query dims that carry RoPE; the RoPE key of this width is shared by all heads."""
    qk_nope_head_dim: int = 32
    """MLA: per-head query/key dims without RoPE."""
    v_head_dim: int = 32
    """MLA: per-head value dims."""

    # --- mixture of experts (inside the loop) ---------------------------------------------------
    n_experts: int = 8
    """Routed experts; 0 uses a dense SwiGLU FFN in the recurrent block as well."""
    n_shared_experts: int = 1
    """Always-on experts."""
    top_k: int = 2
    """Routed experts per token."""
    expert_dim: int = 256
    """SwiGLU hidden width of one expert."""
    moe_aux_loss_coef: float = 0.0
    """Weight of the optional auxiliary balance loss (0 disables it; the router bias balances)."""
    router_bias_rate: float = 1e-3
    """Step of the aux-loss-free router-bias update (DeepSeek-V3's gamma)."""

    # --- recurrence ----------------------------------------------------------------------
    act_enabled: bool = True
    """Adaptive Computation Time halting over loop iterations."""
    act_threshold: float = 0.99
    """A position halts once its cumulative halting probability reaches this."""
    act_init_bias: float = -4.0
    """Initial halting-logit bias; sigmoid(-4) ~ 0.018 keeps every position running ~50 loops at init."""
    loop_emb_dim: int = 32
    """Channels that receive the sinusoidal loop-index embedding (even, <= dim)."""
    lora_rank: int = 8
    """Rank of the depth-wise LoRA delta (0 disables it)."""
    injection_init_decay: float = 0.5
    """Initial value of A (the state decay) in h' = A h + B e + block(...); in (0, 1)."""
    input_gain_init: float = 1.0
    """Initial gain of e_norm, the RMSNorm whose output e is injected at every loop. Below 1 the
    injected input starts small next to the block's updates, so what the loop writes into the
    state is not drowned by e (RMS 1 per channel at gain 1, against updates of ~0.02 at init)."""
    state_init: str = "zeros"
    """Initial recurrent state: zeros | noise (Huginn-style random state)."""

    # --- misc ------------------------------------------------------------------------------------
    dropout: float = 0.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.dense_ffn_dim:
            return self.dense_ffn_dim
        return max(64, int(round(8 * self.dim / 3 / 64)) * 64)

    @property
    def n_layers_total(self) -> int:
        return self.prelude_layers + self.core_layers + self.coda_layers

    @property
    def use_moe(self) -> bool:
        return self.n_experts > 0

    def validate(self) -> None:
        def need(cond: bool, name: str, allowed: str) -> None:
            if not cond:
                raise ConfigError(f"MythosConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name in ("vocab_size", "dim", "n_heads", "max_seq_len", "n_loops", "train_loops_max"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "must be a positive int")
        for name in ("prelude_layers", "coda_layers", "n_experts", "n_shared_experts", "lora_rank", "q_lora_rank"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "must be an int >= 0")
        need(isinstance(self.core_layers, int) and self.core_layers >= 1, "core_layers", "must be an int >= 1")
        need(self.dim % self.n_heads == 0, "n_heads", f"must divide dim={self.dim}")
        need(self.attn_type in ATTN_TYPES, "attn_type", f"allowed: {', '.join(ATTN_TYPES)}")
        if self.attn_type == "gqa":
            need(isinstance(self.n_kv_heads, int) and 0 < self.n_kv_heads <= self.n_heads, "n_kv_heads",
                 f"must be in 1..n_heads={self.n_heads}")
            need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}")
            need(self.head_dim % 2 == 0, "n_heads", f"dim/n_heads={self.head_dim} must be even for RoPE")
        else:
            need(self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0 for mla")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 "must be a positive even int (RoPE rotates pairs)")
            need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
            need(self.v_head_dim > 0, "v_head_dim", "must be > 0")
        if self.use_moe:
            need(1 <= self.top_k <= self.n_experts, "top_k", f"must be in 1..n_experts={self.n_experts}")
            need(self.expert_dim > 0, "expert_dim", "must be > 0 when n_experts > 0")
        need(self.moe_aux_loss_coef >= 0, "moe_aux_loss_coef", "must be >= 0")
        need(self.router_bias_rate >= 0, "router_bias_rate", "must be >= 0")
        need(0.0 < self.act_threshold <= 1.0, "act_threshold", "must be in (0, 1]")
        need(self.loop_emb_dim % 2 == 0 and 0 <= self.loop_emb_dim <= self.dim, "loop_emb_dim",
             f"must be even and in 0..dim={self.dim}")
        need(0.0 < self.injection_init_decay < 1.0, "injection_init_decay", "must be in (0, 1)")
        need(self.input_gain_init > 0.0, "input_gain_init", "must be > 0")
        need(self.state_init in ("zeros", "noise"), "state_init", "allowed: zeros, noise")
        need(self.loop_distribution in LOOP_DISTRIBUTIONS, "loop_distribution",
             f"allowed: {', '.join(LOOP_DISTRIBUTIONS)}")
        need(isinstance(self.train_loops_min, int) and 1 <= self.train_loops_min <= self.train_loops_max,
             "train_loops_min", f"must be in 1..train_loops_max={self.train_loops_max}")
        need(self.train_loops_min <= self.train_loops_mean <= self.train_loops_max, "train_loops_mean",
             f"must be in [train_loops_min, train_loops_max] = [{self.train_loops_min}, {self.train_loops_max}]")
        need(self.loop_sigma >= 0, "loop_sigma", "must be >= 0")
        need(isinstance(self.bptt_depth, int) and self.bptt_depth >= 1, "bptt_depth", "must be an int >= 1")
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(self.norm_eps > 0, "norm_eps", "must be > 0")
        need(self.init_std > 0, "init_std", "must be > 0")
        need(self.rope_theta > 0, "rope_theta", "must be > 0")
        need(self.dense_ffn_dim >= 0, "dense_ffn_dim", "must be >= 0 (0 = automatic)")

    # ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MythosConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown MythosConfig field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**d)

    def replace(self, **overrides: Any) -> "MythosConfig":
        return MythosConfig.from_dict({**self.to_dict(), **overrides})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "MythosConfig":
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        text = p.read_text() if p is not None else str(text_or_path)
        return cls.from_dict(json.loads(text))

