"""Multi-Latent Attention (DeepSeek-V2, arXiv:2405.04434, section 2.1).

Queries go through an optional low-rank latent; keys and values are compressed into one kv
latent c_kv of width kv_lora_rank, plus a decoupled RoPE key k_pe of width qk_rope_head_dim
that is shared by every head. The cache holds only (c_kv, k_pe): kv_lora_rank +
qk_rope_head_dim numbers per layer and token.

Two equivalent ways to attend:
- expanded (training and prefill): up-project c_kv to per-head K_nope and V, attend as usual;
- absorbed (decoding against a cache): fold the key up-projection into the query and the
  value up-projection into the output, so attention runs directly on the cached latents
  (one shared "head" of width kv_lora_rank + rope for keys, kv_lora_rank for values) and the
  cache is never re-expanded into per-head K and V.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import attend
from .kv_cache import LayerCache
from .norm import RMSNorm
from .rope import apply_rope


class MultiLatentAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        q_lora_rank: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        eps: float = 1e-5,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.dropout = dropout
        if q_lora_rank > 0:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank, eps)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(dim, n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank, eps)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_head_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        for name in ("wq_a", "wq_b", "wq", "wkv_a", "wkv_b"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=std)
        if hasattr(self, "q_norm"):
            self.q_norm.init_weights()
        self.kv_norm.init_weights()
        nn.init.normal_(self.wo.weight, std=out_std)

    @staticmethod
    def cache_numbers_per_token(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
        return kv_lora_rank + qk_rope_head_dim

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        start: int = 0,
        absorb: bool | None = None,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        H = self.n_heads
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank > 0 else self.wq(x)
        q_nope, q_pe = q.view(B, S, H, self.qk_head_dim).split([self.nope, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, *rope)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_norm(c_kv)  # (B, S, r)
        k_pe = apply_rope(k_pe.unsqueeze(2), *rope)  # (B, S, 1, rope): one RoPE key for all heads
        if cache is not None:
            c_kv, k_pe = cache.update(start, c_kv, k_pe)  # (B, L, r), (B, L, 1, rope)
        L = c_kv.shape[1]
        scale = 1.0 / math.sqrt(self.qk_head_dim)
        drop = self.dropout if self.training else 0.0
        if absorb is None:
            absorb = cache is not None and L > S
        w_kv_b = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_lora_rank)
        if absorb:
            w_uk, w_uv = w_kv_b[:, : self.nope], w_kv_b[:, self.nope:]  # (H, nope, r), (H, v, r)
            q_lat = torch.einsum("bshn,hnr->bshr", q_nope, w_uk)  # (B, S, H, r)
            q_cat = torch.cat((q_lat, q_pe), dim=-1)  # (B, S, H, r + rope)
            k_cat = torch.cat((c_kv, k_pe.squeeze(2)), dim=-1).unsqueeze(2)  # (B, L, 1, r + rope)
            o_lat = attend(q_cat, k_cat, c_kv.unsqueeze(2), mask, causal=True, scale=scale, dropout=drop)
            out = torch.einsum("bshr,hvr->bshv", o_lat, w_uv)  # (B, S, H, v)
        else:
            kv = self.wkv_b(c_kv).view(B, L, H, self.nope + self.v_dim)
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat((k_nope, k_pe.expand(B, L, H, self.rope_dim)), dim=-1)
            qq = torch.cat((q_nope, q_pe), dim=-1)
            out = attend(qq, k, v, mask, causal=True, scale=scale, dropout=drop)  # (B, S, H, v)
        return self.wo(out.reshape(B, S, H * self.v_dim))
