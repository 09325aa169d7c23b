"""`MythosConfig`: every knob of the Recurrent-Depth Transformer, validated, JSON round-trippable.

A pydantic model (`mythos.typed_config.ConfigModel`): field types and single-field ranges are
declared on the fields, the rules that involve several fields are in `check`. An invalid value
raises `ConfigError` naming the field, e.g. `MythosConfig.n_heads: got 7; must divide dim=256`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from .typed_config import ConfigError, ConfigModel

__all__ = ["ConfigError", "MythosConfig"]


class MythosConfig(ConfigModel):
    error_prefix: ClassVar[str] = "MythosConfig"

    # --- vocabulary and width --------------------------------------------------------
    vocab_size: int = Field(320, gt=0)
    """Embedding rows; must be >= the tokenizer's vocabulary."""
    dim: int = Field(256, gt=0)
    """Residual stream width."""
    n_heads: int = Field(8, gt=0)
    """Query heads."""
    n_kv_heads: int = 2
    """Key/value heads for GQA (must divide n_heads). Unused by MLA."""
    max_seq_len: int = Field(512, gt=0)
    """Longest sequence (prompt + generated) the model accepts."""

    # --- layer layout: prelude -> looped core -> coda -----------------------------------
    prelude_layers: int = Field(1, ge=0)
    """Dense blocks run once before the loop."""
    core_layers: int = Field(1, ge=1)
    """Blocks inside the recurrent block (looped together)."""
    coda_layers: int = Field(1, ge=0)
    """Dense blocks run once after the loop."""
    dense_ffn_dim: int = Field(0, ge=0)
    """SwiGLU hidden width of prelude/coda blocks; 0 means round(8/3 * dim) to a multiple of 64."""

    # --- loop counts -------------------------------------------------------------------
    n_loops: int = Field(4, gt=0)
    """Default loop count at inference."""
    train_loops_mean: float = 4.0
    """Mean of the training loop-count distribution."""
    train_loops_max: int = Field(16, gt=0)
    """Largest loop count drawn in training; also the trained range of the depth-wise LoRA."""
    train_loops_min: int = Field(1, ge=1)
    """Smallest loop count drawn in training."""
    loop_distribution: Literal["poisson_lognormal", "fixed", "uniform"] = "poisson_lognormal"
    """How training draws the loop count: poisson_lognormal | fixed | uniform."""
    loop_sigma: float = Field(0.5, ge=0)
    """Standard deviation of the log-normal rate (poisson_lognormal only)."""
    bptt_depth: int = Field(4, ge=1)
    """Only the last `bptt_depth` loop iterations are under autograd in training (truncated BPTT)."""

    # --- attention -----------------------------------------------------------------------
    attn_type: Literal["gqa", "mla"] = "gqa"
    """gqa (grouped-query attention) or mla (multi-latent attention, DeepSeek-V2)."""
    rope_theta: float = Field(10000.0, gt=0)
    q_lora_rank: int = Field(0, ge=0)
    """MLA: rank of the query latent; 0 projects queries directly."""
    kv_lora_rank: int = 64
    """MLA: rank of the compressed kv latent (what the cache stores, plus the RoPE key)."""
    qk_rope_head_dim: int = 16
    """MLA: per-head query dims that carry RoPE; the RoPE key of this width is shared by all heads."""
    qk_nope_head_dim: int = Field(32, ge=0)
    """MLA: per-head query/key dims without RoPE."""
    v_head_dim: int = 32
    """MLA: per-head value dims."""
    moda: bool = False
    """Mixture-of-Depths Attention (MoDA, arXiv:2603.15619) in the recurrent block: at loop
    iteration t every head attends, under one softmax, to the causal sequence keys/values and to
    t + 1 depth keys/values of the same token position, written from the prelude output e and
    from the states after iterations 0..t-1 (one write projection per core layer). GQA only
    (attn_type='gqa'); the KV cache is unchanged (depth entries live for one forward pass)."""

    # --- mixture of experts (inside the loop) ---------------------------------------------------
    n_experts: int = Field(8, ge=0)
    """Routed experts; 0 uses a dense SwiGLU FFN in the recurrent block as well."""
    n_shared_experts: int = Field(1, ge=0)
    """Always-on experts."""
    top_k: int = 2
    """Routed experts per token."""
    expert_dim: int = 256
    """SwiGLU hidden width of one expert."""
    moe_aux_loss_coef: float = Field(0.0, ge=0)
    """Weight of the optional auxiliary balance loss (0 disables it; the router bias balances)."""
    router_bias_rate: float = Field(1e-3, ge=0)
    """Step of the aux-loss-free router-bias update (DeepSeek-V3's gamma)."""
    router_score: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router affinities: sigmoid (DeepSeek-V3; the chosen gates are renormalised to sum to 1) or
    softmax over all experts (the chosen probabilities are used as they are, not renormalised)."""
    n_groups: int = Field(1, ge=1)
    """Expert groups for group-limited routing (DeepSeek-V3): experts are split into n_groups equal
    groups of consecutive experts; 1 = no grouping. Must divide n_experts."""
    topk_groups: int = Field(1, ge=1)
    """Groups each token may route to (group-limited routing): the groups with the largest sum of
    their top (top_k // topk_groups) biased affinities; top_k experts are then chosen inside them.
    In 1..n_groups; with n_groups = 1 it has no effect."""
    route_scale: float = Field(1.0, gt=0)
    """Factor on the routed experts' gate weights (DeepSeek-V3's routed scaling factor)."""

    # --- recurrence ----------------------------------------------------------------------
    act_enabled: bool = True
    """Adaptive Computation Time halting over loop iterations."""
    act_threshold: float = Field(0.99, gt=0, le=1)
    """A position halts once its cumulative halting probability reaches this."""
    act_init_bias: float = -4.0
    """Initial halting-logit bias; sigmoid(-4) ~ 0.018 keeps every position running ~50 loops at init."""
    loop_emb_dim: int = 32
    """Channels that receive the sinusoidal loop-index embedding (even, <= dim)."""
    lora_rank: int = Field(8, ge=0)
    """Rank of the depth-wise LoRA delta (0 disables it)."""
    injection_init_decay: float = Field(0.5, gt=0, lt=1)
    """Initial value of A (the state decay) in h' = A h + B e + block(...); in (0, 1)."""
    input_gain_init: float = Field(1.0, gt=0)
    """Initial gain of e_norm, the RMSNorm whose output e is injected at every loop. Below 1 the
    injected input starts small next to the block's updates, so what the loop writes into the
    state is not drowned by e (RMS 1 per channel at gain 1, against updates of ~0.02 at init)."""
    state_init: Literal["zeros", "noise"] = "zeros"
    """Initial recurrent state: zeros | noise (Huginn-style random state)."""

    # --- misc ------------------------------------------------------------------------------------
    dropout: float = Field(0.0, ge=0, lt=1)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    tie_embeddings: bool = True

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

    def check(self) -> None:
        need = self.need
        need(self.dim % self.n_heads == 0, "n_heads", f"must divide dim={self.dim}", self.n_heads)
        if self.attn_type == "gqa":
            need(0 < self.n_kv_heads <= self.n_heads, "n_kv_heads", f"must be in 1..n_heads={self.n_heads}",
                 self.n_kv_heads)
            need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads", f"must divide n_heads={self.n_heads}",
                 self.n_kv_heads)
            need(self.head_dim % 2 == 0, "n_heads", f"dim/n_heads={self.head_dim} must be even for RoPE", self.n_heads)
        else:
            need(self.kv_lora_rank > 0, "kv_lora_rank", "must be > 0 for mla", self.kv_lora_rank)
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 "must be a positive even int (RoPE rotates pairs)", self.qk_rope_head_dim)
            need(self.v_head_dim > 0, "v_head_dim", "must be > 0", self.v_head_dim)
        need(not self.moda or self.attn_type == "gqa", "moda",
             f"MoDA is supported with attn_type='gqa' only, not {self.attn_type!r}", self.moda)
        if self.use_moe:
            need(1 <= self.top_k <= self.n_experts, "top_k", f"must be in 1..n_experts={self.n_experts}", self.top_k)
            need(self.expert_dim > 0, "expert_dim", "must be > 0 when n_experts > 0", self.expert_dim)
            self._check_groups()
        need(self.loop_emb_dim % 2 == 0 and 0 <= self.loop_emb_dim <= self.dim, "loop_emb_dim",
             f"must be even and in 0..dim={self.dim}", self.loop_emb_dim)
        need(self.train_loops_min <= self.train_loops_max, "train_loops_min",
             f"must be in 1..train_loops_max={self.train_loops_max}", self.train_loops_min)
        need(self.train_loops_min <= self.train_loops_mean <= self.train_loops_max, "train_loops_mean",
             f"must be in [train_loops_min, train_loops_max] = [{self.train_loops_min}, {self.train_loops_max}]",
             self.train_loops_mean)

    def _check_groups(self) -> None:
        """Group-limited routing: equal groups, topk_groups of them reachable, top_k fits inside."""
        need = self.need
        need(self.n_experts % self.n_groups == 0, "n_groups", f"must divide n_experts={self.n_experts}",
             self.n_groups)
        need(self.topk_groups <= self.n_groups, "topk_groups", f"must be in 1..n_groups={self.n_groups}",
             self.topk_groups)
        reachable = self.topk_groups * (self.n_experts // self.n_groups)
        need(self.top_k <= reachable, "top_k",
             f"must be <= the {reachable} experts reachable in topk_groups={self.topk_groups} of "
             f"n_groups={self.n_groups} groups of n_experts={self.n_experts}", self.top_k)

    # ------------------------------------------------------------------------------------
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
