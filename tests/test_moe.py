import math

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
    if grouped:  # the kernel path (CUDA's) on CPU too; the default there is one mm per expert
        monkeypatch.setattr(moe_mod, "_GROUPED_MM_DEVICES", ("cuda", "cpu"))
    else:
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
    # the aligned case really runs the grouped kernel where it is enabled (CUDA; on CPU one mm per
    # expert is faster), and the per-expert path on CPU by default
    calls = []
    monkeypatch.setattr(moe_mod, "_GROUPED_MM", lambda *a, **k: calls.append(1) or F.grouped_mm(*a, **k))
    make_moe()(torch.randn(2, 3, 32))
    assert calls == []
    monkeypatch.setattr(moe_mod, "_GROUPED_MM_DEVICES", ("cuda", "cpu"))
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


# --- the DeepSeek-V3 router: scoring, group-limited routing, route_scale ---------------------------
def naive_route(logits, bias, top_k, score="sigmoid", n_groups=1, topk_groups=1, route_scale=1.0):
    """One token at a time, with Python lists: the oracle of mythos.router.route."""
    idx, gates = [], []
    for row in logits.double().tolist():
        if score == "sigmoid":
            s = [1 / (1 + math.exp(-x)) for x in row]
        else:
            z = sum(math.exp(x) for x in row)
            s = [math.exp(x) / z for x in row]
        choose = [a + b for a, b in zip(s, bias.tolist())]
        size = len(row) // n_groups
        per_group = min(size, max(1, top_k // topk_groups))
        group_score = [sum(sorted(choose[g * size:(g + 1) * size], reverse=True)[:per_group])
                       for g in range(n_groups)]
        groups = sorted(range(n_groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(allowed, key=lambda e: -choose[e])[:top_k]
        w = [s[e] for e in chosen]
        if score == "sigmoid":
            w = [x / sum(w) for x in w]
        idx.append(chosen)
        gates.append([x * route_scale for x in w])
    return torch.tensor(idx), torch.tensor(gates, dtype=torch.float64)


ROUTINGS = [  # score, n_experts, top_k, n_groups, topk_groups, route_scale
    ("sigmoid", 8, 2, 1, 1, 1.0),
    ("softmax", 8, 2, 1, 1, 1.0),
    ("sigmoid", 16, 4, 4, 2, 2.5),
    ("softmax", 16, 3, 4, 1, 1.0),
    ("sigmoid", 12, 3, 3, 3, 0.5),
    ("softmax", 16, 6, 8, 3, 16.0),
]


@pytest.mark.parametrize("score, n_experts, top_k, n_groups, topk_groups, scale", ROUTINGS)
def test_router_matches_a_per_token_oracle(score, n_experts, top_k, n_groups, topk_groups, scale):
    from mythos.router import RouterSpec, route

    torch.manual_seed(2)
    logits, bias = torch.randn(40, n_experts) * 2, torch.randn(n_experts) * 0.3
    idx, gates, scores = route(logits, bias, RouterSpec(top_k, score, n_groups, topk_groups, scale))
    ref_idx, ref_gates = naive_route(logits, bias, top_k, score, n_groups, topk_groups, scale)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(gates.double(), ref_gates, rtol=1e-5, atol=1e-6)
    size = n_experts // n_groups
    assert max(len(set((row // size).tolist())) for row in idx) <= topk_groups  # group-limited
    if score == "softmax":
        torch.testing.assert_close(scores.sum(-1), torch.ones(40))
    else:
        torch.testing.assert_close(gates.sum(-1), torch.full((40,), scale))


def test_group_limit_changes_the_choice():
    """A token whose two best experts sit in different groups gets both without a limit, and only
    the experts of its best group with topk_groups=1."""
    from mythos.router import RouterSpec, route

    logits = torch.tensor([[5.0, -5, -5, -5, 4.0, 3.9, -5, -5]])  # groups {0..3}, {4..7}
    free, _, _ = route(logits, torch.zeros(8), RouterSpec(2, "sigmoid", 1, 1))
    limited, _, _ = route(logits, torch.zeros(8), RouterSpec(2, "sigmoid", 2, 1))
    assert free.tolist() == [[0, 4]]
    assert limited.tolist() == [[4, 5]]  # group {4..7} scores 4.0 + 3.9 against 5.0 + (-5)


def _grouped_moe(**kw):
    torch.manual_seed(1)
    m = MoE(dim=32, n_experts=8, top_k=3, expert_dim=24, score="softmax", n_groups=4, topk_groups=2,
            route_scale=2.0, **kw)
    m.init_weights(0.2, 0.2)
    return m


@pytest.mark.parametrize("grouped", [True, False])
def test_grouped_softmax_routing_dispatch_matches_masked_oracle(monkeypatch, grouped):
    if grouped:
        monkeypatch.setattr(moe_mod, "_GROUPED_MM_DEVICES", ("cuda", "cpu"))
    else:
        monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    moe = _grouped_moe()
    with torch.no_grad():
        moe.router_bias.copy_(torch.linspace(-0.2, 0.2, 8))
    x = torch.randn(3, 10, 32, requires_grad=True)
    out, _ = moe(x)
    ref = masked_reference(moe, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    params = [x, moe.w13, moe.w2, moe.router.weight]
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


SYNCS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
         "unique", "bincount", "cpu", "numpy", "any", "all"}
"""Tensor operations that read data back to the host (on CUDA, a device sync)."""


def count_host_syncs(fn):
    from torch.overrides import TorchFunctionMode

    class Spy(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name in SYNCS:
                self.seen.append(name)
            return func(*args, **(kwargs or {}))

    with Spy() as spy:
        fn()
    return spy.seen


def test_the_spy_sees_host_syncs():
    x = torch.randn(4)
    assert count_host_syncs(lambda: (x.tolist(), bool(x.sum() > 0), torch.bincount(x.long().abs()))) == \
        ["tolist", "__bool__", "bincount"]


@pytest.mark.parametrize("kernel, syncs", [(True, []), (False, ["tolist"])])
def test_grouped_routing_keeps_the_dispatch_host_syncs(monkeypatch, kernel, syncs):
    """Group-limited routing adds no host sync: the grouped-matmul path has none, the per-slice
    fallback its one read of the slice sizes; in training as in inference."""
    if kernel and moe_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    if kernel:
        monkeypatch.setattr(moe_mod, "_GROUPED_MM_DEVICES", ("cuda", "cpu"))
    else:
        monkeypatch.setattr(moe_mod, "_GROUPED_MM", None)
    moe = _grouped_moe(aux_loss_coef=0.01)
    x = torch.randn(2, 8, 32)
    for mode in (moe.train, moe.eval):
        mode()
        assert count_host_syncs(lambda: moe(x)) == syncs


@pytest.mark.parametrize("routing", [{}, {"n_groups": 4, "topk_groups": 2, "route_scale": 2.0},
                                     {"score": "softmax", "n_groups": 4, "topk_groups": 2, "route_scale": 2.0}])
def test_bias_update_rebalances_grouped_and_softmax_routers(routing):
    """The aux-loss-free update is the same for every router. (With the stronger skew of the test
    above, a softmax router, whose expert 0 then takes almost all of the probability, was still at an
    imbalance of ~3.8 after 60 steps: a step of 0.02 is small next to probabilities near 1 and 0.)"""
    torch.manual_seed(1)
    moe = MoE(dim=32, n_experts=8, top_k=2, expert_dim=24, bias_rate=0.02, **routing).train()
    moe.init_weights(0.2, 0.2)
    with torch.no_grad():
        moe.router.weight[0] += 0.05  # expert 0 favoured by every token
    x = torch.randn(4, 64, 32) + 1.0
    moe(x)
    before = load_imbalance(moe.update_router_bias())
    for _ in range(60):
        moe(x)
        after = load_imbalance(moe.update_router_bias())
    assert moe.router_bias[0] < 0
    assert before > 3.0 and after < 1.5


def _graph_nodes(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in seen:
            seen.add(type(node).__name__)
            todo.extend(n for n, _ in node.next_functions)
    return seen


def test_swiglu_activation_node_gives_autograds_gradients():
    """mythos.ffn.swiglu's one autograd node (no `cat` of the gradient halves) against the plain
    expression's graph, in fp64 (gradcheck) and on the dense SwiGLU module."""
    from mythos.ffn import SwiGLU, _SwiGLUAct, swiglu

    h = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SwiGLUAct.apply, (h,))
    x = torch.randn(4, 6, 16, requires_grad=True)
    layer = SwiGLU(16, 12)
    layer.init_weights(0.3, 0.3)
    gate, up = layer.w13(x).chunk(2, dim=-1)
    ref = layer.w2(F.silu(gate) * up)
    out = layer(x)
    assert "_SwiGLUActBackward" in _graph_nodes(out)  # the node really ran
    g = torch.randn_like(out)
    params = [x, layer.w13.weight, layer.w2.weight]
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # inference takes the plain expression: nothing to save
        torch.testing.assert_close(swiglu(h.detach()), F.silu(h.detach()[..., :4]) * h.detach()[..., 4:])


@pytest.mark.parametrize("kw", [{}, {"n_groups": 3, "topk_groups": 2, "route_scale": 2.0},
                                {"score": "softmax", "n_shared_experts": 0, "top_k": 3}])
def test_one_token_inference_path_gives_the_general_paths_numbers_bit_for_bit(kw, monkeypatch):
    """Decoding at batch 1 runs the chosen experts on the token directly (no sort); the general path
    (sort, dispatch, combine; taken in training mode) gives the same output, bit for bit, with the same
    single host read; with the grouped kernel (no host read) the direct path is not taken."""
    sorts = []
    argsort = torch.argsort
    monkeypatch.setattr(torch, "argsort", lambda *a, **k: sorts.append(1) or argsort(*a, **k))
    moe = make_moe(**kw)
    torch.manual_seed(3)
    moe.router_bias.normal_()
    for _ in range(20):
        x = torch.randn(1, 1, 32)
        with torch.inference_mode():
            moe.eval()
            direct, aux = moe(x)
            syncs = count_host_syncs(lambda: moe(x))
            assert sorts == []  # the direct path
            moe.train()
            general, _ = moe(x)
            assert sorts == [1]  # the general path
            sorts.clear()
        assert torch.equal(direct, general) and float(aux) == 0.0
        assert syncs == ["tolist"]
    torch.testing.assert_close(direct, masked_reference(moe, x), rtol=1e-5, atol=1e-6)


def test_one_token_path_is_not_taken_where_the_grouped_kernel_reads_nothing(monkeypatch):
    if moe_mod._GROUPED_MM is None:
        pytest.skip("this torch has no grouped_mm")
    monkeypatch.setattr(moe_mod, "_GROUPED_MM_DEVICES", ("cuda", "cpu"))
    moe = make_moe().eval()
    with torch.inference_mode():
        assert count_host_syncs(lambda: moe(torch.randn(1, 1, 32))) == []
