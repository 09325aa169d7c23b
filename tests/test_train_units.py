"""Trainer building blocks without Ray: optimizer schedule, checkpoints, the non-finite guard."""

import json

import pytest
import torch

from mythos import Mythos, get_variant
from mythos.checkpoint import load_pretrained
from mythos_platform.train.checkpointing import (
    CheckpointError,
    TrainState,
    export_model,
    load_checkpoint,
    save_checkpoint,
)
from mythos_platform.train.loop import NonFiniteLossError, apply_update
from mythos_platform.train.optim import build_optimizer, build_scheduler, lr_factor, param_groups


def test_warmup_then_cosine_to_min():
    f = [lr_factor(s, warmup=10, total=110, min_ratio=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # monotone decay after warmup
    assert f[110] == pytest.approx(0.1)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)


def test_weight_decay_only_on_matrices():
    model = Mythos(get_variant("debug"))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.core.injection.b for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0


def test_the_cpu_optimizer_is_the_fused_adamw_and_updates_as_the_reference_one_does():
    """The trainer's AdamW runs torch's fused kernel on the CPU too (one pass per parameter instead
    of the foreach implementation's dozen; docs/performance.md), with the same updates."""
    torch.manual_seed(0)
    model = Mythos(get_variant("debug"))
    ref = Mythos(get_variant("debug"))
    ref.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    ref_opt = torch.optim.AdamW(param_groups(ref, 0.1), lr=1e-3, betas=(0.9, 0.95), foreach=False)
    assert opt.defaults["fused"] is True and ref_opt.defaults["fused"] is not True
    x = torch.randint(0, 256, (2, 17))
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x[:, :-1], targets=x[:, 1:], n_loops=2).loss.backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert not torch.equal(p, before[name]), name  # every parameter was updated
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

def _train_step(model, opt, sched):
    x = torch.randint(0, 256, (2, 17))
    model(x[:, :-1], targets=x[:, 1:], n_loops=2).loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    cfg = get_variant("debug")
    model = Mythos(cfg)
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    sched = build_scheduler(opt, 2, 20, 1e-3, 1e-4)
    for _ in range(3):
        _train_step(model, opt, sched)
    state = TrainState(step=3, tokens=96, data_epoch=1, data_batches=7, metrics={"val_acc": 0.5, "loss": 2.25})
    save_checkpoint(tmp_path, model, opt, sched, state, rank=0)
    after_save = torch.rand(3)

    torch.manual_seed(123)
    fresh = Mythos(cfg)
    fresh_opt = build_optimizer(fresh, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    fresh_sched = build_scheduler(fresh_opt, 2, 20, 1e-3, 1e-4)
    restored = load_checkpoint(tmp_path, fresh, fresh_opt, fresh_sched, rank=0)
    assert restored == state  # including the last metrics, which a relaunch at the final step reports
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), n
    assert fresh_sched.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.rand(3), after_save)  # RNG state restored
    # both continue identically
    torch.manual_seed(5)
    _train_step(model, opt, sched)
    torch.manual_seed(5)
    _train_step(fresh, fresh_opt, fresh_sched)
    assert torch.equal(model.tok_emb.weight, fresh.tok_emb.weight)


def test_incomplete_checkpoint_is_refused(tmp_path):
    model = Mythos(get_variant("debug"))
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    sched = build_scheduler(opt, 2, 20, 1e-3, 1e-4)
    save_checkpoint(tmp_path, model, opt, sched, TrainState(step=1), rank=0)
    (tmp_path / "train_state.json").unlink()  # as if the writer died before finishing
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path, model, opt, sched, rank=0)


def test_damaged_latest_checkpoint_falls_back_to_the_newest_whole_one(tmp_path):
    from mythos_platform.train.checkpointing import checkpoint_problem, resumable_checkpoint

    model = Mythos(get_variant("debug"))
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    sched = build_scheduler(opt, 2, 20, 1e-3, 1e-4)
    folders = [tmp_path / f"checkpoint_{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        folder.mkdir()
        save_checkpoint(folder, model, opt, sched, TrainState(step=8 * (i + 1)), rank=0)
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's file beside them
    assert [checkpoint_problem(f) for f in folders] == [None, None, None]
    assert resumable_checkpoint(folders[1]) == (folders[2], [])  # the newest step, whichever Ray names
    shard = folders[2] / "__0_0.distcp"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    (folders[1] / "rng_rank0.pt").write_bytes(b"not a tensor file")
    folder, skipped = resumable_checkpoint(folders[2])
    assert folder == folders[0] and len(skipped) == 2
    assert skipped[0].startswith(f"{shard} is truncated (") and "rng_rank0.pt" not in skipped[0]
    assert str(folders[1]) in skipped[1]
    assert load_checkpoint(folder, model, opt, sched, rank=0).step == 8
    (folders[0] / ".metadata").unlink()
    assert resumable_checkpoint(folders[2])[0] is None


def test_a_stopped_run_says_the_step_its_relaunch_resumes_from_or_that_it_starts_again(tmp_path):
    """The message after Ctrl-C and the next launch's start line name the step the run resumes from
    (its newest whole checkpoint), and a run stopped before its first checkpoint says it starts
    again at step 0 instead of promising a resume."""
    from mythos_platform.config import PretrainConfig
    from mythos_platform.train.checkpointing import resume_step
    from mythos_platform.train.trainer import _relaunch, _resuming, _stopped_side_by_side

    cfg = PretrainConfig.from_dict({"run": {"root": str(tmp_path), "name": "r"}, "checkpoint": {"every_steps": 50}})
    run_dir = tmp_path / "checkpoints" / "r"
    assert resume_step(run_dir) is None  # no folder yet
    assert _relaunch(cfg).format(run="it") == \
        "starts it again at step 0 (it stopped before its first checkpoint, due every 50 steps)"
    assert _resuming(cfg, mlflow_run_continued=True) == " — from step 0: the earlier launch saved no checkpoint"
    assert _resuming(cfg, mlflow_run_continued=False) == ""

    model = Mythos(get_variant("debug"))
    opt = build_optimizer(model, 1e-3, (0.9, 0.95), 0.1, torch.device("cpu"))
    sched = build_scheduler(opt, 2, 20, 1e-3, 1e-4)
    for step in (50, 100):
        folder = run_dir / f"checkpoint_{step}"
        folder.mkdir(parents=True)
        save_checkpoint(folder, model, opt, sched, TrainState(step=step), rank=0)
    assert resume_step(run_dir) == 100
    assert _relaunch(cfg).format(run="'r'") == "resumes 'r' from step 100"
    assert _resuming(cfg, mlflow_run_continued=True) == " — resuming from step 100"
    baseline = PretrainConfig.from_dict({"run": {"root": str(tmp_path), "name": "b"}, "checkpoint": {"every_steps": 30}})
    assert _stopped_side_by_side([cfg, baseline]) == (
        "training runs 'r', 'b' stopped; the same command resumes 'r' from step 100 and starts 'b' again at step 0 "
        "(it stopped before its first checkpoint, due every 30 steps)")
    (run_dir / "checkpoint_100" / ".metadata").unlink()  # damaged: the relaunch takes the one before
    assert resume_step(run_dir) == 50 and _relaunch(cfg).format(run="it") == "resumes it from step 50"
    (run_dir / "checkpoint_50" / ".metadata").unlink()
    assert resume_step(run_dir) is None

    remote = PretrainConfig.from_dict({"run": {"root": str(tmp_path), "name": "r"},
                                       "checkpoint": {"storage_path": "s3://bucket/ckpt", "every_steps": 0}})
    assert _relaunch(remote).format(run="it") == "resumes it from its last checkpoint"
    only_at_end = PretrainConfig.from_dict({"run": {"root": str(tmp_path / "other"), "name": "r"},
                                            "checkpoint": {"every_steps": 0}})
    assert _relaunch(only_at_end).format(run="it").endswith("before its first checkpoint, saved only at the end)")


def test_export_writes_the_serving_format(tmp_path):
    model = Mythos(get_variant("debug", attn_type="mla"))
    export_model(model, model.cfg, tmp_path / "m", rank=0, metadata={"step": "5"})
    loaded = load_pretrained(tmp_path / "m")
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, n_loops=2).logits, model.eval()(x, n_loops=2).logits)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["config"]["attn_type"] == "mla"


def test_nonfinite_guard_skips_a_bounded_number_of_steps():
    from mythos_platform.config import TrainConfig
    from mythos_platform.train.checkpointing import TrainState

    stop = TrainConfig(nonfinite="stop")
    assert apply_update(True, stop, TrainState(), 3, 1.0, 1.0)
    with pytest.raises(NonFiniteLossError, match="non-finite loss or gradient at step 3 .*train.nonfinite=stop"):
        apply_update(False, stop, TrainState(), 3, float("inf"), 1.0)
    skip, state = TrainConfig(max_consecutive_skips=3, max_total_skips=5), TrainState()
    nan = float("nan")
    assert not apply_update(False, skip, state, 1, nan, 1.0)
    assert not apply_update(False, skip, state, 2, nan, 1.0)
    assert apply_update(True, skip, state, 3, 1.0, 1.0) and state.skips_in_a_row == 0  # a good step resets the run
    assert not apply_update(False, skip, state, 4, nan, 1.0)
    assert not apply_update(False, skip, state, 5, nan, 1.0)
    with pytest.raises(NonFiniteLossError, match=r"at step 6 .*3 steps in a row and 5 in all skipped"):
        apply_update(False, skip, state, 6, nan, 1.0)  # the 3rd in a row (and the 5th in all)
    state = TrainState(skips_total=4)
    with pytest.raises(NonFiniteLossError, match="1 steps in a row and 5 in all.*max_total_skips=5"):
        apply_update(False, skip, state, 9, nan, 1.0)


def test_deep_supervision_option_adds_the_per_loop_loss():
    from types import SimpleNamespace

    from mythos_platform.train.losses import per_loop_lm_loss
    from mythos_platform.train.loop import _loss

    model = Mythos(get_variant("debug", act_enabled=False)).train()
    x = torch.randint(0, 256, (2, 9))
    out = model(x[:, :-1], targets=x[:, 1:], n_loops=3, bptt_depth=2, return_loop_logits=True)
    tcfg = SimpleNamespace(ponder_cost=0.0, loop_schedule="random", deep_supervision=False)
    plain = _loss(out, x[:, 1:], tcfg)
    deep = _loss(out, x[:, 1:], SimpleNamespace(ponder_cost=0.0, loop_schedule="random", deep_supervision=True))
    assert torch.allclose(plain, out.loss + out.aux_loss)
    expected = 0.5 * plain + 0.5 * per_loop_lm_loss(out.loop_logits, x[:, 1:], scheme="linear")
    assert torch.allclose(deep, expected) and len(out.loop_logits) == 2


def test_the_peak_probe_measures_without_drawing_from_the_training_generator():
    """The MFU's peak is re-measured at every log (the best so far counts): the probe's random
    matrices must not move the training's random stream (a resumed run replays the uninterrupted one)."""
    from types import SimpleNamespace

    from mythos_platform.train.worker import Trainer

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    peak = Trainer.peak_probe(SimpleNamespace(matmul_dtype=torch.float32, device=torch.device("cpu")))
    assert torch.equal(torch.rand(4), expected)
    assert peak > 1e9  # FLOP/s of a 512 x 512 matmul on any CPU this runs on
