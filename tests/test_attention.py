import math

import pytest
import torch

from mythos.attention import GroupedQueryAttention, attend, flash_attn_available
from mythos.kv_cache import KVCache
from mythos.mla import MultiLatentAttention
from mythos.rope import rope_angles


def naive_attention(q, k, v, causal_offset):
    """(B, S, H, d) x (B, L, H, d): explicit softmax with a bottom-right causal mask."""
    S, L = q.shape[1], k.shape[1]
    scores = torch.einsum("bshd,blhd->bhsl", q, k) / math.sqrt(q.shape[-1])
    allowed = torch.arange(L)[None, :] <= torch.arange(S)[:, None] + causal_offset
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhsl,blhd->bshd", scores.softmax(-1), v)


@pytest.mark.parametrize("S, L", [(6, 6), (1, 9), (3, 9)])
def test_attend_matches_naive_with_gqa_and_cache_offset(S, L):
    q = torch.randn(2, S, 4, 8)
    k, v = torch.randn(2, L, 2, 8), torch.randn(2, L, 2, 8)
    out = attend(q, k, v, mask=None, causal=True)
    ref = naive_attention(q, k.repeat_interleave(2, 2), v.repeat_interleave(2, 2), L - S)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_flash_attn_absent_on_cpu_uses_sdpa_fallback():
    # flash-attn is a GPU-only optional extra; on this machine the SDPA path above is what runs
    assert flash_attn_available() is False or not torch.cuda.is_available()


def _mla():
    torch.manual_seed(0)
    m = MultiLatentAttention(dim=64, n_heads=4, q_lora_rank=16, kv_lora_rank=24, qk_nope_head_dim=8,
                             qk_rope_head_dim=6, v_head_dim=10)
    m.init_weights(0.1, 0.1)
    return m


def test_mla_absorbed_equals_expanded():
    m = _mla()
    x = torch.randn(2, 7, 64)
    rope = rope_angles(torch.arange(7)[None].expand(2, 7), 6, 10000.0)
    expanded = m(x, rope, None, absorb=False)
    absorbed = m(x, rope, None, absorb=True)
    torch.testing.assert_close(absorbed, expanded, rtol=1e-4, atol=1e-5)


def test_mla_cache_holds_latent_plus_one_shared_rope_key():
    m = _mla()
    cache = KVCache(batch=2, capacity=16)
    slot = cache.slot("prelude", 0)
    x = torch.randn(2, 5, 64)
    rope = rope_angles(torch.arange(5)[None].expand(2, 5), 6, 10000.0)
    m(x, rope, None, slot, 0)
    numbers = sum(b[:, :1].numel() for b in slot.buffers) // 2  # one token of one sequence
    assert numbers == MultiLatentAttention.cache_numbers_per_token(24, 6) == 30
    # decoding one token reads the latents directly and matches the full computation
    x2 = torch.randn(2, 1, 64)
    full_x = torch.cat([x, x2], 1)
    full_rope = rope_angles(torch.arange(6)[None].expand(2, 6), 6, 10000.0)
    step = m(x2, rope_angles(torch.full((2, 1), 5), 6, 10000.0), None, slot, 5)
    torch.testing.assert_close(step, m(full_x, full_rope, None)[:, -1:], rtol=1e-4, atol=1e-5)


def test_gqa_cache_numbers():
    a = GroupedQueryAttention(64, 8, 2)
    cache = KVCache(1, 8)
    slot = cache.slot("prelude", 0)
    rope = rope_angles(torch.arange(3)[None], 8, 10000.0)
    a(torch.randn(1, 3, 64), rope, None, slot, 0)
    assert sum(b[:, :1].numel() for b in slot.buffers) == GroupedQueryAttention.cache_numbers_per_token(2, 8) == 32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_the_textbook_rotation_bit_for_bit(dtype):
    """apply_rope's x*cos + swap(x)*sin with the full-width signed angles is (x1 cos - x2 sin,
    x1 sin + x2 cos), exactly, and keeps norms (a rotation)."""
    from mythos.rope import apply_rope

    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, 16).to(dtype)
    positions = torch.arange(9)[None].expand(2, 9) + 1000
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    angles = positions.float()[..., None] * inv_freq
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x1, x2 = x[..., :8].float(), x[..., 8:].float()
    textbook = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(dtype)
    out = apply_rope(x, *rope_angles(positions, 16, 10000.0))
    assert out.dtype == dtype and torch.equal(out, textbook)
    torch.testing.assert_close(out.float().norm(dim=-1), x.float().norm(dim=-1), rtol=2e-2, atol=1e-4)
