"""Activation checkpointing (mythos_platform/train/activation_checkpointing.py): the same gradients,
fewer saved activations, the same parameter names, nothing checkpointed without autograd."""

from __future__ import annotations

import pytest
from saved_bytes import saved_bytes as counting_saved_bytes
import torch

from mythos import Mythos, get_variant
from mythos_platform.train import activation_checkpointing as ac
from mythos_platform.train.parallel import blocks, build_model

TINY = dict(dim=64, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2, expert_dim=32, loop_emb_dim=16, lora_rank=4,
            max_seq_len=64, prelude_layers=1, core_layers=2, coda_layers=1, kv_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16)
CONFIGS = {"mla-moe": get_variant("debug", attn_type="mla", **TINY),
           "gqa-moe-moda": get_variant("debug", attn_type="gqa", moda=True, **TINY)}
LOOPS, BPTT = 4, 2
MODES = ("block", "iteration")


def model_for(cfg, mode: str) -> Mythos:
    torch.manual_seed(0)
    return ac.apply_activation_checkpointing(Mythos(cfg).train(), mode)


def batch(B: int = 2, S: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (B, S + 1), generator=torch.Generator().manual_seed(1))


def train_step(model, x, loops: int = LOOPS, bptt: int = BPTT) -> None:
    """Forward (with the coda on every differentiated loop state too) and backward."""
    out = model(x[:, :-1], targets=x[:, 1:], n_loops=loops, bptt_depth=bptt, return_loop_logits=True)
    extra = sum(logits.float().square().mean() for logits in out.loop_logits)
    (out.loss + out.aux_loss + 0.01 * out.ponder_cost + 1e-3 * extra).backward()


def saved_bytes(model, x, bptt: int, loops: int = 6) -> int:
    """Bytes autograd saves for backward in one step (unique storages, parameters excluded)."""
    with counting_saved_bytes(model) as total:
        out = model(x[:, :-1], targets=x[:, 1:], n_loops=loops, bptt_depth=bptt)
    (out.loss + out.aux_loss).backward()
    return total[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_and_expert_loads_equal_the_plain_models(name):
    cfg, x = CONFIGS[name], batch()
    plain = model_for(cfg, "none")
    train_step(plain, x)
    for mode in MODES:
        model = model_for(cfg, mode)
        train_step(model, x)
        for (n, p), q in zip(plain.named_parameters(), model.parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=f"{mode}: {n}")
        # the recomputation leaves the MoE's load count (the router-bias balancing input) as it was
        for m_plain, m in zip(plain.moe_layers(), model.moe_layers()):
            assert torch.equal(m.expert_load, m_plain.expert_load), mode


def test_a_graph_backpropagated_twice_recomputes_twice_and_counts_once():
    cfg, x = CONFIGS["mla-moe"], batch()
    plain, model = model_for(cfg, "none"), model_for(cfg, "block")
    for m in (plain, model):
        out = m(x[:, :-1], targets=x[:, 1:], n_loops=LOOPS, bptt_depth=BPTT)
        out.loss.backward(retain_graph=True)
        out.loss.backward()
    for p, q in zip(plain.parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a.expert_load, b.expert_load) for a, b in zip(plain.moe_layers(), model.moe_layers()))


def test_checkpointing_saves_less_and_iteration_keeps_about_one_state_per_iteration():
    cfg, x = CONFIGS["mla-moe"], batch()
    state = x.shape[0] * (x.shape[1] - 1) * cfg.dim * 4  # one fp32 (B, S, D) tensor
    saved = {mode: [saved_bytes(model_for(cfg, mode), x, k) for k in (1, 2, 3)] for mode in ("none", *MODES)}
    for k in range(3):
        assert saved["none"][k] > 3 * saved["block"][k] and saved["block"][k] > saved["iteration"][k]
    per_iteration = {mode: [(b - a) / state for a, b in zip(s, s[1:])] for mode, s in saved.items()}
    for growth in per_iteration["iteration"]:  # the state entering the iteration, and ACT's (B, S) floats
        assert 1.0 <= growth < 1.1
    assert all(g > 10 for g in per_iteration["none"]) and all(2 < g < 8 for g in per_iteration["block"])


def test_only_differentiated_calls_are_checkpointed(monkeypatch):
    calls = []
    real = ac.checkpoint
    monkeypatch.setattr(ac, "checkpoint", lambda fn, *a, **kw: calls.append(fn) or real(fn, *a, **kw))
    cfg, x = CONFIGS["mla-moe"], batch()
    expected = {"block": 2 + cfg.core_layers * BPTT, "iteration": 2 + BPTT}  # prelude + coda + the loop
    for mode, n in expected.items():
        model = model_for(cfg, mode)
        calls.clear()
        model(x[:, :-1], n_loops=LOOPS, bptt_depth=BPTT)
        assert len(calls) == n, mode
        with torch.no_grad():  # inference: nothing is checkpointed, and the result is the plain model's
            calls.clear()
            out = model(x[:, :-1], n_loops=LOOPS).logits
            assert calls == []
            torch.testing.assert_close(out, model_for(cfg, "none")(x[:, :-1], n_loops=LOOPS).logits)


def test_parameter_names_and_state_dict_keys_do_not_change():
    cfg = CONFIGS["gqa-moe-moda"]
    plain = model_for(cfg, "none")
    for mode in MODES:
        model = model_for(cfg, mode)
        assert list(model.state_dict()) == list(plain.state_dict())
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]
        assert ac.is_checkpointed(model.prelude[0]) and ac.is_checkpointed(model.coda[0])
        assert ac.is_checkpointed(model.core.layers[0]) == (mode == "block")
        assert ac.is_checkpointed(model.core, "iteration") == (mode == "iteration")
        model.load_state_dict(plain.state_dict())  # a checkpoint of either loads into the other


def test_build_model_applies_the_mode_and_refuses_an_unknown_one():
    cfg, x = CONFIGS["mla-moe"], batch()
    plain = build_model(cfg, "fsdp", torch.device("cpu"), False, seed=0)
    model = build_model(cfg, "fsdp", torch.device("cpu"), False, seed=0, activation_checkpointing="iteration")
    assert ac.is_checkpointed(model.core, "iteration") and not ac.is_checkpointed(plain.core, "iteration")
    train_step(plain.train(), x)
    train_step(model.train(), x)
    for p, q in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation_checkpointing: got 'layer'"):
        build_model(cfg, "ddp", torch.device("cpu"), False, seed=0, activation_checkpointing="layer")




@pytest.mark.parametrize("mode", MODES)
def test_fsdp2_per_block_after_checkpointing_gives_the_plain_gradients(one_rank_group, mode):
    """FSDP2's hooks (all-gather before forward, and again before the backward that recomputes) on
    blocks whose forward is checkpointed, as build_model composes them; one rank, so in-process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg, x = CONFIGS["mla-moe"], batch()
    plain = model_for(cfg, "none")
    train_step(plain, x)
    model = model_for(cfg, mode)
    mesh = init_device_mesh("cpu", (1,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert ac.is_checkpointed(model.prelude[0])  # still there under FSDP2's class swap
    train_step(model, x)
    for (n, p), q in zip(plain.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-5, msg=n)
