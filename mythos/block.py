"""A pre-norm transformer block that returns its *update* (attention + FFN output), not x + update.

Prelude and coda add the update to their residual stream; the recurrent block feeds it to the
LTI injection, so the state receives the block's contribution and not a copy of its own input
(OpenMythos's `TransformerBlock`, github.com/kyegomez/OpenMythos, returns x + attn + ffn and its
`LTIInjection` adds all of it to A*h + B*e, so the state's norm grows ~60x above the injected
input B*e; tests/test_recurrence.py checks the ratio here).
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import GroupedQueryAttention
from .config import MythosConfig
from .ffn import SwiGLU
from .kv_cache import LayerCache
from .mla import MultiLatentAttention
from .moda import Depth, MoDAAttention
from .moe import MoE
from .norm import RMSNorm


def make_attention(cfg: MythosConfig, moda: bool = False) -> nn.Module:
    """The config's attention; `moda`: the MoDA variant of GQA (recurrent block only)."""
    if cfg.attn_type == "mla":
        return MultiLatentAttention(cfg.dim, cfg.n_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                                    cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.norm_eps, cfg.dropout)
    cls = MoDAAttention if moda else GroupedQueryAttention
    return cls(cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.dropout)


def make_moe(cfg: MythosConfig) -> MoE:
    return MoE(cfg.dim, cfg.n_experts, cfg.top_k, cfg.expert_dim, cfg.n_shared_experts, cfg.moe_aux_loss_coef,
               cfg.router_bias_rate, score=cfg.router_score, n_groups=cfg.n_groups, topk_groups=cfg.topk_groups,
               route_scale=cfg.route_scale)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: MythosConfig, moe: bool, moda: bool = False) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = make_attention(cfg, moda)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn: nn.Module
        if moe:
            self.ffn = make_moe(cfg)
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def init_weights(self, std: float, out_std: float) -> None:
        self.attn_norm.init_weights()
        self.ffn_norm.init_weights()
        self.attn.init_weights(std, out_std)
        self.ffn.init_weights(std, out_std)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        start: int = 0,
        depth: Depth | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, D) -> (update (B, S, D), auxiliary loss). `depth`: MoDA's depth keys/values."""
        h = self.attn_norm(x)
        a = self.attn(h, rope, mask, cache, start) if depth is None else self.attn(h, rope, mask, cache, start, depth)
        a = self.dropout(a)
        f = self.ffn(self.ffn_norm(x + a))
        if isinstance(f, tuple):
            f, aux = f
        else:
            aux = x.new_zeros((), dtype=torch.float32)
        return a + self.dropout(f), aux
