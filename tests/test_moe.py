import pytest
import torch
import torch.nn.functional as F

import mythos.moe as moe_mod
from mythos.moe import MoE, load_imbalance


def masked_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The simple implementation, kept only as the oracle: a boolean mask per (slot, expert)."""
    B, S, D = x.shape
    xf = x.reshape(-1, D)
    idx, gates, _ = moe.route(xf)
    out = torch.zeros_like(xf)
    for slot in range(moe.top_k):
        for e in range(moe.n_experts):
            sel = idx[:, slot] == e
            if not sel.any():
                continue
            gate, up = (xf[sel] @ moe.w13[e]).chunk(2, dim=-1)
            out[sel] += gates[sel, slot, None] * ((F.silu(gate) * up) @ moe.w2[e])
    if moe.shared is not None:
        out = out + moe.shared(xf)
    return out.view(B, S, D)


def make_moe(**kw):
    torch.manual_seed(1)
    m = MoE(dim=32, n_experts=kw.pop("n_experts", 6), top_k=kw.pop("top_k", 2), expert_dim=24, **kw)
    m.init_weights(0.2, 0.2)
    return m


@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_matches_masked_oracle_forward_and_backward(monkeypatch, grouped):
    if not grouped:
        monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    moe = make_moe()
    x = torch.randn(3, 10, 32, requires_grad=True)
    out, _ = moe(x)
    ref = masked_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, moe.w13, moe.w2, moe.router.weight], g)
    ref_grads = torch.autograd.grad(ref, [x, moe.w13, moe.w2, moe.router.weight], g)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim, expert_dim", [(30, 24), (32, 30), (30, 30)])
def test_widths_the_grouped_kernel_cannot_take_fall_back_and_match_the_oracle(dim, expert_dim):
    """grouped_mm needs sizes that are multiples of 16 bytes; other widths are valid configs and
    must take the per-slice path (they used to fail with "strides should be multiple of 16 bytes")."""
    torch.manual_seed(1)
    moe = MoE(dim=dim, n_experts=6, top_k=2, expert_dim=expert_dim)
    moe.init_weights(0.2, 0.2)
    x = torch.randn(3, 10, dim, requires_grad=True)
    out, _ = moe(x)
    ref = masked_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [x, moe.w13, moe.w2, moe.router.weight]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_grouped_path_is_chosen_by_alignment_and_dtype(monkeypatch):
    if moe_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    w = torch.zeros(4, 36, 40)
    assert moe_mod._grouped_mm_fits(torch.zeros(5, 36), w)  # fp32: multiples of 4 elements
    assert not moe_mod._grouped_mm_fits(torch.zeros(5, 36, dtype=torch.bfloat16), w)  # bf16: of 8
    assert not moe_mod._grouped_mm_fits(torch.zeros(5, 30), torch.zeros(4, 30, 40))
    assert not moe_mod._grouped_mm_fits(torch.zeros(5, 36), torch.zeros(4, 36, 30))
    assert not moe_mod._grouped_mm_fits(torch.zeros(0, 36), w)
    # the aligned case really runs the grouped kernel (the parametrized oracle test above covers it)
    calls = []
    monkeypatch.setattr(moe_mod, "_GROUPED_MM", lambda *a, **k: calls.append(1) or F.grouped_mm(*a, **k))
    make_moe()(torch.randn(2, 3, 32))
    assert len(calls) == 2
    # bf16 at a width that is 16-byte aligned in fp32 but not in bf16: forward and backward run
    torch.manual_seed(1)
    moe = MoE(dim=36, n_experts=4, top_k=2, expert_dim=20).to(torch.bfloat16)
    moe.init_weights(0.2, 0.2)
    x = torch.randn(2, 5, 36, dtype=torch.bfloat16, requires_grad=True)
    out, _ = moe(x)
    out.float().sum().backward()
    torch.testing.assert_close(out.float(), masked_reference(moe.float(), x.detach().float()), rtol=0.05, atol=0.05)


def test_unused_experts_are_handled():
    moe = make_moe(n_experts=8, top_k=1)
    with torch.no_grad():
        moe.router_bias[:] = -10.0
        moe.router_bias[3] = 10.0  # every token goes to expert 3
    x = torch.randn(2, 5, 32)
    out, _ = moe(x)
    torch.testing.assert_close(out, masked_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_expert_load_telemetry_counts_every_assignment():
    moe = make_moe().train()
    moe(torch.randn(2, 7, 32))
    assert moe.expert_load.sum().item() == 2 * 7 * moe.top_k
    moe.eval()
    moe(torch.randn(2, 7, 32))
    assert moe.expert_load.sum().item() == 2 * 7 * moe.top_k  # inference does not count


def test_router_bias_update_rebalances_a_skewed_router():
    moe = make_moe(n_experts=8, top_k=2, bias_rate=0.02).train()
    with torch.no_grad():
        moe.router.weight[0] += 0.3  # with positive inputs, expert 0 is favoured by every token
    x = torch.randn(4, 64, 32) + 1.0
    moe(x)
    before = load_imbalance(moe.update_router_bias())
    for _ in range(60):
        moe(x)
        after = load_imbalance(moe.update_router_bias())
    assert moe.router_bias[0] < 0  # the overloaded expert was pushed down
    assert before > 3.0 and after < 1.5


def test_bias_chooses_but_does_not_weight():
    moe = make_moe()
    x = torch.randn(4, 32)
    idx, gates, scores = moe.route(x)
    torch.testing.assert_close(gates.sum(-1), torch.ones(4))
    expected = scores.gather(-1, idx)
    torch.testing.assert_close(gates, expected / expected.sum(-1, keepdim=True))


def test_aux_loss_optional_and_differentiable():
    off, _ = make_moe().train()(torch.randn(2, 4, 32))[1], None
    assert off.item() == 0.0
    moe = make_moe(aux_loss_coef=0.01).train()
    _, aux = moe(torch.randn(2, 4, 32))
    assert aux.item() > 0
    aux.backward()
    assert moe.router.weight.grad.abs().sum() > 0
