import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mythos.moe as moe_mod
from mythos import Mythos, get_variant
from mythos.sizing import flops_per_token, kv_cache_numbers_per_token, parameter_counts
from mythos.variants import NOMINAL_SIZES


@pytest.mark.parametrize("cfg", [get_variant("debug"), get_variant("debug", attn_type="mla", q_lora_rank=32),
                                 get_variant("debug", n_experts=0, tie_embeddings=False)])
def test_meta_count_equals_real_model(cfg):
    model = Mythos(cfg)
    counts = parameter_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    if cfg.n_experts:
        routed = sum(m.w13.numel() + m.w2.numel() for m in model.moe_layers())
        assert counts.active == counts.total - routed + routed * cfg.top_k // cfg.n_experts
    else:
        assert counts.active == counts.total


@pytest.mark.parametrize("name", sorted(NOMINAL_SIZES))
def test_named_sizes_within_5_percent(name):
    counts = parameter_counts(get_variant(name))
    assert abs(counts.total / NOMINAL_SIZES[name] - 1) <= 0.05
    assert counts.active < counts.total


def _measured_matmul_flops(model, x, n_loops):
    fc = FlopCounterMode(display=False)
    with fc, torch.no_grad():
        model(x, n_loops=n_loops)
    return fc.get_total_flops() / x.numel()


@pytest.mark.parametrize("n_experts", [0, 8])
def test_forward_flops_match_counted_matmuls(monkeypatch, n_experts):
    # the per-slice fallback dispatch runs plain matmuls that FlopCounterMode sees
    monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    cfg = get_variant("debug", n_experts=n_experts, act_enabled=False)
    model = Mythos(cfg).eval()
    S, loops = 48, 3
    x = torch.randint(0, 256, (2, S))
    measured = _measured_matmul_flops(model, x, loops)
    f = flops_per_token(cfg, n_loops=loops, seq_len=S)
    # FlopCounterMode does not count the CPU SDPA kernel: add the analytic attention part
    attn = 2.0 * cfg.n_heads * 2 * cfg.head_dim * (S + 1) / 2 * (cfg.prelude_layers + cfg.coda_layers + loops)
    assert measured + attn == pytest.approx(f.forward, rel=1e-3)


def test_flops_count_loops_and_truncated_backprop():
    cfg = get_variant("debug")
    f4, f8 = flops_per_token(cfg, n_loops=4, seq_len=256), flops_per_token(cfg, n_loops=8, seq_len=256)
    assert f8.forward - f4.forward == pytest.approx(4 * f4.per_loop)
    full = flops_per_token(cfg, n_loops=8, seq_len=256)
    trunc = flops_per_token(cfg, n_loops=8, seq_len=256, bptt_depth=2)
    assert full.train_step == pytest.approx(3 * full.forward)
    assert full.train_step - trunc.train_step == pytest.approx(2 * 6 * full.per_loop)


def test_kv_cache_mla_smaller_than_gqa_at_default():
    cfg = get_variant("1b")
    mla = kv_cache_numbers_per_token(cfg, n_loops=1) / cfg.n_layers_total
    gqa_cfg = cfg.replace(attn_type="gqa")
    gqa = kv_cache_numbers_per_token(gqa_cfg, n_loops=1) / cfg.n_layers_total
    assert mla == cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576
    assert gqa == 2 * gqa_cfg.n_kv_heads * gqa_cfg.head_dim == 1024
    assert kv_cache_numbers_per_token(cfg, n_loops=8) == 576 * (cfg.prelude_layers + cfg.coda_layers + 8 * cfg.core_layers)
    assert kv_cache_numbers_per_token(cfg, n_loops=8, share_loops=True) == 576 * cfg.n_layers_total


def test_moda_flops_match_counted_matmuls(monkeypatch):
    """MoDA's attention is plain einsums that FlopCounterMode sees: its sequence part over every key
    (the causal mask is applied after the matmul) and its depth part over t + 1 entries at iteration t."""
    monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    cfg = get_variant("debug", moda=True, core_layers=2, act_enabled=False)
    model = Mythos(cfg).eval()
    S, loops = 24, 5
    measured = _measured_matmul_flops(model, torch.randint(0, 256, (2, S)), loops)
    f = flops_per_token(cfg, n_loops=loops, seq_len=S)
    per_key = 2.0 * cfg.n_heads * 2 * cfg.head_dim  # scores + values, one key
    assert f.depth_attention == pytest.approx(cfg.core_layers * per_key * (1 + 2 + 3 + 4 + 5))
    sdpa = per_key * (S + 1) / 2 * (cfg.prelude_layers + cfg.coda_layers)  # not seen by the counter
    # nor is the weighted sum over the single depth entry of iteration 0 (einsum runs it as a product)
    one_entry = cfg.core_layers * per_key / 2
    core_seq = loops * cfg.core_layers * per_key
    assert measured + sdpa + one_entry == pytest.approx(f.forward - core_seq * (S + 1) / 2 + core_seq * S, rel=1e-9)


def test_moda_flops_add_the_write_projections_and_the_depth_part():
    base, moda = get_variant("debug"), get_variant("debug", moda=True)
    f0, f1 = flops_per_token(base, n_loops=8, seq_len=256), flops_per_token(moda, n_loops=8, seq_len=256)
    write = 2 * moda.dim * 2 * moda.n_kv_heads * moda.head_dim * moda.core_layers  # one write per iteration
    assert f1.per_loop - f0.per_loop == write
    assert f1.forward - f0.forward == pytest.approx(8 * write + f1.depth_attention)
    assert f0.depth_attention == 0
    # truncated backprop differentiates the depth part of the last iterations only (t = 6, 7: 7 + 8 keys)
    trunc = flops_per_token(moda, n_loops=8, seq_len=256, bptt_depth=2)
    two = flops_per_token(moda, n_loops=2, seq_len=256)  # the same weights twice, depth part of t = 0, 1
    per_key = 2.0 * moda.n_heads * 2 * moda.head_dim
    grad_part = (trunc.train_step - trunc.forward) / 2
    assert grad_part == pytest.approx(two.forward - two.depth_attention + moda.core_layers * per_key * (7 + 8))


def test_moda_keeps_the_kv_cache_and_holds_one_depth_entry_per_iteration(monkeypatch):
    from mythos.moda import DepthMemory
    from mythos.sizing import moda_depth_numbers_per_token

    cfg = get_variant("debug", moda=True, core_layers=2)
    assert kv_cache_numbers_per_token(cfg, n_loops=8) == kv_cache_numbers_per_token(cfg.replace(moda=False), n_loops=8)
    held = []
    orig = DepthMemory.write
    monkeypatch.setattr(DepthMemory, "write", lambda self, entries: (orig(self, entries), held.append(
        sum(k.numel() + v.numel() for k, v in entries)))[0])
    with torch.no_grad():
        Mythos(cfg).eval()(torch.randint(0, 256, (3, 10)), n_loops=6)
    assert sum(held) / (3 * 10) == moda_depth_numbers_per_token(cfg, n_loops=6) == 2 * 6 * 2 * 2 * 32
    assert moda_depth_numbers_per_token(cfg.replace(moda=False), n_loops=6) == 0
