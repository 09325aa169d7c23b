import pytest
import torch

from mythos import Mythos, get_variant
from mythos.act import ACTHalting, ACTState
from mythos.injection import LTIInjection
from mythos.lora import DepthLoRA
from mythos.loop_embedding import loop_index_embedding
from mythos.loop_schedule import sample_loops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decay_strictly_inside_unit_interval_for_extreme_parameters(dtype):
    inj = LTIInjection(16)
    inj.init_weights()
    values = torch.tensor([-1e30, -1e4, -100.0, -20.0, -10.0, 0.0, 10.0, 20.0, 100.0, 1e4, 1e30, 3.0, -3.0, 1.0, -1.0, 0.5])
    with torch.no_grad():
        inj.decay_logit.copy_(values)
    inj.to(dtype)
    a = inj.decay()
    for tensor in (a, a.to(dtype)):  # the fp32 value and its cast into the parameter dtype
        assert torch.isfinite(tensor).all()
        assert (tensor > 0).all() and (tensor < 1).all(), tensor
    # the gradient stays alive towards A -> 1 (OpenMythos's exp(-exp(clamp(x, -20, 20))) has 0 below -20)
    inj2 = LTIInjection(4)
    inj2.init_weights()
    with torch.no_grad():
        inj2.decay_logit.copy_(torch.tensor([-60.0, -20.0, 0.0, 10.0]))
    inj2.decay().sum().backward()
    assert (inj2.decay_logit.grad.abs() > 0).all()


def test_injected_input_is_not_negligible_next_to_the_state():
    cfg = get_variant("debug")
    model = Mythos(cfg).eval()
    x = torch.randint(0, 256, (2, 32))
    captured = {}
    orig = model.core.injection.forward

    def spy(h, e, update):
        out = orig(h, e, update)
        captured["be"] = (model.core.injection.b * e).norm(dim=-1).mean()
        captured["h"] = out.norm(dim=-1).mean()
        return out

    model.core.injection.forward = spy
    with torch.no_grad():
        model(x, n_loops=16)
    ratio = (captured["be"] / captured["h"]).item()
    assert ratio > 0.3, ratio  # OpenMythos's block (x + attn + ffn into the state): ~60x, ratio ~0.017


def test_more_loops_change_the_output_of_a_fresh_model():
    model = Mythos(get_variant("debug")).eval()
    x = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        l4, l16, l64 = (model(x, n_loops=n).logits for n in (4, 16, 64))
    assert (l4 - l16).abs().max() > 1e-4
    assert (l16 - l64).abs().max() > 1e-4


@pytest.mark.parametrize("n_loops", [1, 2, 5, 40])
def test_act_weights_sum_to_one(n_loops):
    act = ACTHalting(8, threshold=0.9, init_bias=0.0)
    act.init_weights()
    with torch.no_grad():
        act.proj.weight.normal_(std=2.0)
    h0 = torch.randn(3, 11, 8)
    state = ACTState(act, h0)
    total = torch.zeros(3, 11)
    for t in range(n_loops):
        before = state.cum.clone()
        state.step(torch.randn(3, 11, 8), last=t == n_loops - 1)
        total += state.cum - before
    torch.testing.assert_close(total, torch.ones(3, 11))
    assert state.all_halted
    assert state.ponder_cost().item() <= n_loops + 1


def test_act_switch_and_ponder_cost():
    x = torch.randint(0, 256, (2, 8))
    on = Mythos(get_variant("debug")).train()(x, n_loops=3)
    off = Mythos(get_variant("debug", act_enabled=False)).train()(x, n_loops=3)
    assert on.ponder_cost is not None and on.ponder_cost.requires_grad
    assert 3.0 < on.ponder_cost.item() <= 4.0  # N = 3 iterations + remainder
    assert off.ponder_cost is None


def test_loop_embedding_distinct_and_sliced():
    embs = torch.stack([loop_index_embedding(t, 8, 32, torch.device("cpu"), torch.float32) for t in range(64)])
    assert (embs[:, 8:] == 0).all()
    assert torch.cdist(embs, embs).add(torch.eye(64) * 10).min() > 1e-3


def test_lora_starts_at_zero_and_reuses_last_scale_beyond_trained_range():
    lora = DepthLoRA(16, 4, n_scales=6)
    lora.init_weights(0.1)
    u = torch.randn(2, 3, 16)
    assert lora(u, 0).abs().max() == 0
    with torch.no_grad():
        lora.up.weight.normal_()
        lora.scale.copy_(torch.arange(24, dtype=torch.float32).view(6, 4))
    assert lora.scale_index(5) == lora.scale_index(50) == 5
    torch.testing.assert_close(lora(u, 9), lora(u, 5))
    assert (lora(u, 4) - lora(u, 5)).abs().max() > 0


def test_truncated_backprop_differentiates_only_the_last_iterations():
    model = Mythos(get_variant("debug")).train()
    grad_iters = []
    layer = model.core.layers[0]
    layer.register_forward_hook(lambda m, i, o: grad_iters.append(torch.is_grad_enabled()))
    x = torch.randint(0, 256, (2, 8))
    out = model(x, targets=x, n_loops=6, bptt_depth=2)
    assert grad_iters == [False] * 4 + [True] * 2
    out.loss.backward()
    assert model.core.injection.b.grad.abs().sum() > 0


def test_loop_sample_is_a_pure_function_of_seed_and_step():
    cfg = get_variant("debug", train_loops_mean=6.0, train_loops_max=20, bptt_depth=3)
    draws = [sample_loops(cfg, step, seed=7) for step in range(400)]
    assert draws == [sample_loops(cfg, step, seed=7) for step in range(400)]
    assert draws != [sample_loops(cfg, step, seed=8) for step in range(400)]
    ns = torch.tensor([d.n_loops for d in draws], dtype=torch.float32)
    assert ns.min() >= 1 and ns.max() <= 20 and len(set(ns.tolist())) > 4
    assert 4.5 < ns.mean().item() < 7.5
    assert all(d.bptt_depth == min(3, d.n_loops) for d in draws)
    fixed = get_variant("debug", loop_distribution="fixed", train_loops_mean=5.0)
    assert {sample_loops(fixed, s).n_loops for s in range(20)} == {5}


def test_deep_supervision_returns_logits_per_differentiated_loop():
    model = Mythos(get_variant("debug")).train()
    x = torch.randint(0, 256, (2, 8))
    out = model(x, n_loops=5, bptt_depth=3, return_loop_logits=True, collect_stats=True)
    assert len(out.loop_logits) == 3 and all(l.shape == out.logits.shape for l in out.loop_logits)
    assert len(out.state_norms) == 5


def test_bad_inputs_are_refused_with_their_shape():
    model = Mythos(get_variant("debug")).eval()
    with pytest.raises(ValueError, match=r"input_ids must be a \(batch, seq\) tensor, got torch.Size\(\[8\]\)"):
        model(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="n_loops must be an int >= 1"):
        model(torch.zeros(2, 4, dtype=torch.long), n_loops=0)


def test_input_gain_init_scales_the_injected_input():
    cfg = get_variant("debug").replace(input_gain_init=0.1)
    model = Mythos(cfg)
    assert torch.allclose(model.e_norm.weight, torch.full_like(model.e_norm.weight, 0.1))
    x = torch.randn(2, 5, cfg.dim)
    assert model.e_norm(x).pow(2).mean().sqrt().item() == pytest.approx(0.1, rel=1e-3)
    with pytest.raises(Exception, match="input_gain_init"):
        get_variant("debug").replace(input_gain_init=0.0)


def test_exit_on_last_position_checks_only_the_answering_state():
    torch.manual_seed(0)
    model = Mythos(get_variant("debug", act_enabled=False)).eval()
    x = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        for thr in (0.3, 0.1, 0.03):
            every = model(x, n_loops=24, exit_threshold=thr)
            last = model(x, n_loops=24, exit_threshold=thr, exit_on="last")
            assert 1 <= last.loops_used <= every.loops_used <= 24  # fewer states to wait for
            # exiting after t loops gives exactly the t-loop forward pass
            assert torch.allclose(last.logits, model(x, n_loops=last.loops_used).logits, atol=1e-5)
        assert model(x, n_loops=8, exit_threshold=float("inf"), exit_on="last").loops_used == 1
    with pytest.raises(ValueError, match="exit_on must be 'all' or 'last'"):
        model(x, n_loops=2, exit_threshold=0.1, exit_on="first")


def test_loop_embedding_rows_equal_the_formula_and_serve_training_after_inference():
    """The embedding is a row of a shared table: the sin/cos formula itself, bit for bit, for any t
    (the table grows past 64 rows) and dtype; a table first built under inference mode is an
    ordinary tensor, so a training step after serving can still save it for backward."""
    import math

    for n, dim in ((32, 256), (6, 30), (0, 16)):
        for t in (0, 1, 7, 63, 64, 200):
            row = loop_index_embedding(t, n, dim, torch.device("cpu"), torch.float32)
            want = torch.zeros(dim)
            for i in range(0, n, 2):
                freq = torch.tensor(1.0) / (torch.tensor(100.0) ** (torch.tensor(float(i)) / n))
                want[i], want[i + 1] = math.sin(float(t * freq)), math.cos(float(t * freq))
            torch.testing.assert_close(row, want, rtol=0, atol=1e-6)
    assert loop_index_embedding(3, 32, 256, "cpu", torch.bfloat16).dtype == torch.bfloat16
    model = Mythos(get_variant("debug", dim=64, n_heads=2, n_kv_heads=1, expert_dim=32, loop_emb_dim=16,
                               vocab_size=64, max_seq_len=32)).train()
    ids = torch.randint(0, 64, (2, 8))
    with torch.inference_mode():
        model(ids, n_loops=40)  # builds tables under inference mode (rows past 64 too)
        assert not loop_index_embedding(39, 16, 64, torch.device("cpu"), torch.float32).is_inference()
    loss = model(ids, n_loops=3, targets=ids).loss
    loss.backward()  # "Inference tensors cannot be saved for backward" if the table were one
    assert model.core.in_norm.weight.grad is not None


def test_injection_keeps_its_coefficients_only_under_inference_mode_and_until_a_parameter_changes():
    inj = LTIInjection(8)
    inj.init_weights()
    h, e, u = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)

    def reference():
        with torch.no_grad():
            return inj.decay() * h + inj.b * e + u

    with torch.inference_mode():
        first = inj.coefficients(torch.float32)
        assert inj.coefficients(torch.float32)[0] is first[0]  # kept
        torch.testing.assert_close(inj(h, e, u), reference(), rtol=0, atol=0)
    with torch.no_grad():  # an optimizer step: in place, outside inference mode
        inj.decay_logit.add_(0.5)
        inj.b.mul_(2.0)
    with torch.inference_mode():
        assert inj.coefficients(torch.float32)[0] is not first[0]
        torch.testing.assert_close(inj(h, e, u), reference(), rtol=0, atol=0)
        inj.load_state_dict({"decay_logit": torch.zeros(8), "b": torch.full((8,), 3.0)})  # in inference mode too
        torch.testing.assert_close(inj(h, e, u), reference(), rtol=0, atol=0)
    out = inj(h, e, u)  # with autograd: computed afresh, gradients reach both parameters
    out.sum().backward()
    assert inj.decay_logit.grad is not None and inj.b.grad is not None
    with torch.no_grad():
        assert inj.coefficients(torch.float32)[0] is not inj.coefficients(torch.float32)[0]  # not kept in no_grad
