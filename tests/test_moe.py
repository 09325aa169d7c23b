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
