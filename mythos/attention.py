"""Grouped-Query Attention and the attention kernel shared with MLA.

`attend` runs flash-attn when it is installed and the tensors are on CUDA (casting fp32 to
bf16 for the kernel and back), and PyTorch's scaled_dot_product_attention otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import LayerCache
from .rope import apply_rope

try:  # optional GPU extra
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - not installable on CPU machines
    _flash_attn_func = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Attention over (B, S, H, d) queries and (B, L, Hkv, d) keys/values -> (B, S, H, dv).

    `mask` (B, 1, S, L) bool (True = attend) takes precedence; otherwise `causal` aligns the
    last query with the last key (so it is right for a cache holding L - S earlier tokens).
    """
    S, L, H, Hkv = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if mask is None and _flash_attn_func is not None and q.is_cuda and q.shape[-1] == v.shape[-1] <= 256:
        dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        out = _flash_attn_func(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=dropout, softmax_scale=scale,
                               causal=causal)
        return out.to(q.dtype)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, d)
    # grouped heads (GQA; MLA's absorbed decode has one shared key head): SDPA reads each key head
    # for its group of query heads instead of us materialising repeated keys (2x faster on CPU)
    is_causal = False
    if mask is None and causal and S > 1:
        if S == L:
            is_causal = True
        else:  # SDPA's is_causal aligns top-left; build the bottom-right mask explicitly
            i = torch.arange(S, device=q.device)[:, None] + (L - S)
            mask = torch.arange(L, device=q.device)[None, :] <= i
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                         scale=scale, enable_gqa=Hkv != H)
    return out.transpose(1, 2)  # (B, S, H, dv)


class GroupedQueryAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.dropout = dropout
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.wqkv.weight, std=std)
        nn.init.normal_(self.wo.weight, std=out_std)

    @staticmethod
    def cache_numbers_per_token(n_kv_heads: int, head_dim: int) -> int:
        return 2 * n_kv_heads * head_dim

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: LayerCache | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(start, k, v)  # (B, start+S, Hkv, hd)
        out = attend(q, k, v, mask, causal=True, scale=1.0 / math.sqrt(self.head_dim),
                     dropout=self.dropout if self.training else 0.0)
        return self.wo(out.reshape(B, S, self.n_heads * self.head_dim))

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """x (B, S, D) -> q (B, S, H, hd), k and v (B, S, Hkv, hd); RoPE on q and k."""
        B, S, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = apply_rope(q.view(B, S, H, hd), *rope)
        k = apply_rope(k.view(B, S, Hkv, hd), *rope)
        return q, k, v.view(B, S, Hkv, hd)
