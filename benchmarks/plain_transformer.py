"""A plain dense transformer: the reference `make bench` sets beside the looped model's MFU.

GPT-style decoder (Radford et al. 2019, with the pre-norm RMSNorm and SwiGLU of LLaMA, Touvron et
al. 2023): learned positions, L blocks of causal multi-head attention (torch's SDPA) and a SwiGLU
of three linears, one final norm and an untied head. No loops, injection, LoRA, routing, RoPE or
halting: what a transformer of the same width costs on this machine per FLOP, trained with the
same optimizer on the same batch, so that the gap between the two MFUs is what the recurrent-depth
model's extra parts cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.w1, self.w3 = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(B, S, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        h = self.ffn_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class PlainTransformer(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, hidden: int, layers: int, max_seq: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.dim, self.heads, self.hidden, self.layers = dim, heads, hidden, layers
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_seq, dim)
        self.blocks = nn.ModuleList(_Block(dim, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def train_flops_per_token(self, seq: int) -> float:
        """Forward + backward (3x the forward) FLOPs per token: 2 per weight of every linear and,
        per layer, scores and weighted values over the (seq + 1) / 2 keys a causal token sees on
        average (as mythos.sizing counts the looped model's)."""
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        attention = self.layers * 2.0 * 2 * self.dim * (seq + 1) / 2
        return 3 * (2.0 * linear + attention)
