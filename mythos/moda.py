"""Mixture-of-Depths Attention (MoDA, Zhu et al. 2026, arXiv:2603.15619) over the loop trajectory.

In MoDA each head attends, under one softmax, to the causal sequence keys/values of its layer and
to "depth" keys/values of the *same token position* written by the preceding layers. In a looped
model the depth axis is the loop: at iteration t (0-based) a core layer's queries see

    sequence: k_j, v_j of positions j <= i at this iteration (the usual causal GQA keys)
    depth:    t + 1 entries of position i: one written from the prelude output e, and one from
              each state h_1..h_t that iterations 0..t-1 produced

so the loop can read this position's earlier states instead of only the latest one. An entry is
written by the block as k, v = W_j RMSNorm(state) (one write projection W_j per core layer, in the
layer's kv-head space, RoPE on k at the token's position), as the paper writes depth entries from a
layer's output through a separate key/value projection.

Depth entries concern one position only, so a later token never reads an earlier token's depth
entries: in generation they are rebuilt inside every forward pass from the states of the tokens
being processed, and the KV cache holds exactly what it holds without MoDA (the sequence keys and
values of each iteration). The depth memory is a transient working set of (n_loops + 1) entries
per token and core layer (`sizing.moda_depth_numbers_per_token`).

`moda_attend` computes the scores against the sequence keys (one matmul per kv-head group) and
against the position's depth keys (one batched dot product), joins them along the key axis, and
applies one softmax; it never copies keys per query (the test's reference does). It does not use
flash-attn or SDPA, which cannot take per-query keys; a fused kernel is the paper's section 3 and
is not implemented here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .attention import GroupedQueryAttention
from .kv_cache import LayerCache
from .norm import RMSNorm
from .rope import apply_rope

Depth = tuple[torch.Tensor, torch.Tensor]
"""Depth keys and values of the positions being processed: (B, S, T, Hkv, d) each."""


def allowed_keys(S: int, L: int, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(S, L) or (B, 1, S, L) bool: `mask` if given, else causal aligned to the last key."""
    if mask is not None:
        return mask
    i = torch.arange(S, device=device)[:, None] + (L - S)
    return torch.arange(L, device=device)[None, :] <= i


def moda_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, depth: Depth, mask: torch.Tensor | None,
                scale: float, dropout: float = 0.0) -> torch.Tensor:
    """One softmax over sequence and depth keys. q (B, S, H, d); k, v (B, L, Hkv, d); depth keys and
    values (B, S, T, Hkv, d); mask (B, 1, S, L) bool or None (causal) -> (B, S, H, d)."""
    B, S, H, d = q.shape
    L, Hkv = k.shape[1], k.shape[2]
    dk, dv = depth
    qg = q.view(B, S, Hkv, H // Hkv, d)  # (B, S, Hkv, G, d)
    seq = torch.einsum("bskgd,blkd->bkgsl", qg, k)  # (B, Hkv, G, S, L)
    allowed = allowed_keys(S, L, mask, q.device)
    allowed = allowed[:, :, None] if allowed.dim() == 4 else allowed  # (B, 1, 1, S, L)
    seq = seq.masked_fill(~allowed, float("-inf"))
    dep = torch.einsum("bskgd,bstkd->bkgst", qg, dk)  # (B, Hkv, G, S, T)
    scores = torch.cat((seq, dep), dim=-1) * scale  # (B, Hkv, G, S, L + T): one softmax over both
    p = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)
    if dropout > 0:
        p = nn.functional.dropout(p, dropout)
    out = torch.einsum("bkgsl,blkd->bskgd", p[..., :L], v)
    out = out + torch.einsum("bkgst,bstkd->bskgd", p[..., L:], dv)
    return out.reshape(B, S, H, d)


class MoDAAttention(GroupedQueryAttention):
    """GQA whose queries also read the depth entries of their own position (when given)."""

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        start: int = 0,
        depth: Depth | None = None,
    ) -> torch.Tensor:
        if depth is None:
            return super().forward(x, rope, mask, cache, start)
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, start+S, Hkv, hd)
        out = moda_attend(q, k, v, depth, mask, 1.0 / math.sqrt(self.head_dim),
                          self.dropout if self.training else 0.0)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))


class DepthWriter(nn.Module):
    """Writes one depth entry per core layer from a state (B, S, D): k, v = W_j RMSNorm(state)."""

    def __init__(self, dim: int, n_layers: int, n_kv_heads: int, head_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.norm = RMSNorm(dim, eps)
        self.proj = nn.ModuleList(nn.Linear(dim, 2 * n_kv_heads * head_dim, bias=False) for _ in range(n_layers))

    def init_weights(self, std: float) -> None:
        self.norm.init_weights()
        for w in self.proj:
            nn.init.normal_(w.weight, std=std)

    def forward(self, state: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> list[Depth]:
        """state (B, S, D) -> per core layer, (k, v) each (B, S, Hkv, hd); RoPE on k."""
        B, S, _ = state.shape
        x = self.norm(state)
        out = []
        for w in self.proj:
            k, v = w(x).view(B, S, 2 * self.n_kv_heads, self.head_dim).chunk(2, dim=2)
            out.append((apply_rope(k, *rope), v))
        return out


class DepthMemory:
    """The depth entries written so far in one forward pass, per core layer."""

    def __init__(self, n_layers: int) -> None:
        self.keys: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def write(self, entries: list[Depth], rows: torch.Tensor | None = None, batch: int = 0) -> None:
        """One entry per core layer; with `rows`, entries of those rows of a batch of `batch` (the
        rows still looping: the others never read this entry)."""
        for j, (k, v) in enumerate(entries):
            if rows is not None:
                k = k.new_zeros((batch, *k.shape[1:])).index_copy(0, rows, k)
                v = v.new_zeros((batch, *v.shape[1:])).index_copy(0, rows, v)
            self.keys[j].append(k)
            self.values[j].append(v)

    def read(self, layer: int, rows: torch.Tensor | None = None, count: int | None = None) -> Depth:
        """Layer `layer`'s entries, oldest first: (B, S, T, Hkv, hd) keys and values (of `rows` only);
        `count`: only the first `count` entries (what iteration count - 1 reads, also when it is run
        again after later iterations have written theirs, as activation checkpointing does)."""
        keys, values = self.keys[layer][:count], self.values[layer][:count]
        k, v = torch.stack(keys, dim=2), torch.stack(values, dim=2)
        return (k, v) if rows is None else (k[rows], v[rows])
