"""The spine on a real local Ray cluster: FSDP2 training, checkpoints, fault recovery, MLflow."""

import json
import random
import time
from pathlib import Path

import pytest
import torch

from mythos.checkpoint import load_pretrained
from mythos_platform.config import PretrainConfig, load_config
from mythos_platform.train import run_pretrain
from mythos_platform.train.faults import FAULT_FILE_ENV

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def fault_file(tmp_path_factory):
    """Where a test arms a worker fault (see mythos_platform.train.faults): the variable is set
    before the module's Ray cluster starts, so every worker process inherits it."""
    path = tmp_path_factory.mktemp("fault") / "fault.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_FILE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def ray_cluster(fault_file, ray_cluster):
    """conftest's cluster, started with the fault variable set."""
    yield ray_cluster


def small_cfg(root: Path, **extra: str) -> PretrainConfig:
    sets = {
        "run.root": str(root), "run.name": "t", "train.steps": "24", "train.batch_size": "4",
        "data.seq_len": "64", "data.n_docs": "1500", "data.val_docs": "100", "data.val_blocks": "8",
        "train.log_every": "4", "train.eval_every": "12", "train.val_batches": "2", "train.warmup_steps": "4",
        "checkpoint.every_steps": "8", "train.parallelism": "fsdp", "tracking.experiment": "test-pretrain",
        **extra,
    }
    return load_config(ROOT / "jobs/configs/debug.yaml", [f"{k}={v}" for k, v in sets.items()])


def read_state(checkpoint_path: str) -> dict:
    return json.loads((Path(checkpoint_path) / "train_state.json").read_text())


@pytest.fixture(scope="module")
def plain_run(ray_cluster, tmp_path_factory):
    """A 24-step FSDP2 run on two workers, undisturbed: what the fault tests must reproduce."""
    return run_pretrain(small_cfg(tmp_path_factory.mktemp("plain")))


def history(res, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return [(m.step, m.value) for m in MlflowClient(res.tracking_uri).get_metric_history(res.mlflow_run_id, key)]


def test_fsdp_run_checkpoints_exports_and_tracks(plain_run):
    from mlflow.tracking import MlflowClient

    res = plain_run
    # checkpoint: DCP shards of both ranks + the trainer state at the final step
    ckpt = Path(res.checkpoint_path)
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "train_state.json"} <= {p.name for p in ckpt.iterdir()}
    state = read_state(res.checkpoint_path)
    assert state["step"] == 24 and state["data_epoch"] == 0 and state["data_batches"] == 24
    # the exported serving folder loads with mythos alone and gives finite logits
    model = load_pretrained(res.export_dir)
    logits = model(torch.randint(0, 256, (1, 16)), n_loops=3).logits
    assert torch.isfinite(logits).all()
    # MLflow: params, metrics with steps, artifacts
    client = MlflowClient(res.tracking_uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.parallelism"] == "fsdp" and run.data.params["model.variant"] == "debug"
    assert run.data.tags["mythos.variant"] == "debug"
    loss = client.get_metric_history(res.mlflow_run_id, "loss")
    assert [m.step for m in loss] == [4, 8, 12, 16, 20, 24]
    assert loss[-1].value < loss[0].value  # it learns
    for key in ("val_loss", "tokens_per_s", "mfu", "grad_norm", "lr", "max_A", "mean_loops",
                "expert_load_imbalance", "state_norm/loop_01"):
        assert client.get_metric_history(res.mlflow_run_id, key), key
    # of the best matmul FLOP/s the workers measured (two workers and another test share 2 CPUs)
    assert all(0 < m.value <= 1.0 for m in client.get_metric_history(res.mlflow_run_id, "mfu"))
    assert not client.get_metric_history(res.mlflow_run_id, "resumed_from_step")  # never restarted
    arts = {a.path for a in client.list_artifacts(res.mlflow_run_id)}
    assert {"plots", "model", "config"} <= arts
    model_files = {Path(a.path).name for a in client.list_artifacts(res.mlflow_run_id, "model")}
    assert {"config.json", "model.safetensors"} <= model_files


def test_chaos_worker_kills_reproduce_the_uninterrupted_run(ray_cluster, fault_file, plain_run, tmp_path):
    """Two workers are SIGKILLed at two seeded-random steps (random.Random(3): rank 0 after step 12,
    which is logged but not checkpointed; rank 1 after step 18). Ray Train restarts the worker group
    from the last checkpoint each time; the second time, that checkpoint (step 16) has a truncated
    shard, so the run falls back to the whole one before it (step 8) and says so. The fixed data order
    (data.order: fixed) replays the batches an undisturbed run trains on, so the run ends where the
    plain run ended, step for step, and MLflow shows every step once. A third kill comes after the
    final checkpoint and before the export: the restart trains no step and still exports the model
    and reports the run's last metrics (they travel in the checkpoint)."""
    import threading

    from mlflow.tracking import MlflowClient

    rng = random.Random(3)
    steps = sorted(rng.sample(range(9, 24), 2))  # after the first checkpoint (step 8), before the end
    kills = [{"step": s, "rank": rng.randrange(2), "marker": str(tmp_path / f"killed-{s}")} for s in steps]
    assert any(s % 4 == 0 and s % 8 for s in steps)  # one kill replays a step that was already logged
    kills.append({"step": 24, "rank": 0, "marker": str(tmp_path / "killed-24")})  # between checkpoint and export
    fault_file.write_text(json.dumps({"kills": kills, "wait_s": 3}))
    damaged: list[tuple[Path, int]] = []

    def damage_the_newest_checkpoint_at_the_second_kill() -> None:
        marker, deadline = Path(kills[1]["marker"]), time.monotonic() + 600
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        newest = max((p for p in (tmp_path / "run" / "checkpoints" / "t").glob("checkpoint_*") if p.is_dir()),
                     key=lambda p: p.name)
        shard = newest / "__1_0.distcp"
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 3)
        damaged.append((shard, read_state(str(newest))["step"]))

    watcher = threading.Thread(target=damage_the_newest_checkpoint_at_the_second_kill, daemon=True)
    watcher.start()
    try:
        res = run_pretrain(small_cfg(tmp_path / "run", **{"run.max_failures": "3"}))
    finally:
        fault_file.unlink()
    assert all(Path(k["marker"]).exists() for k in kills)  # the worker processes really died
    state, plain = read_state(res.checkpoint_path), read_state(plain_run.checkpoint_path)
    assert (state["step"], state["tokens"], state["data_epoch"], state["data_batches"]) == \
           (plain["step"], plain["tokens"], plain["data_epoch"], plain["data_batches"]) == (24, 24 * 4 * 64 * 2, 0, 24)
    # resumed twice from step 8: after the first kill the step-16 checkpoint did not exist yet,
    # after the second it was damaged and skipped (named in the run's tag)
    assert [v for _, v in history(res, "resumed_from_step")] == [8.0, 8.0, 24.0]
    # the relaunch after the final checkpoint trained nothing, yet reports and exports the run
    # (from the summary the workers write: a relaunched job has no Ray Train result of the earlier fit)
    summary = json.loads((Path(res.export_dir) / "training_summary.json").read_text())
    assert summary["step"] == 24 and (Path(res.export_dir) / "model.safetensors").is_file()
    for key in ("loss", "val_loss"):
        assert summary[key] == pytest.approx(plain_run.metrics[key], rel=1e-5), key
    skipped = MlflowClient(res.tracking_uri).get_run(res.mlflow_run_id).data.tags["mythos.resume.skipped"]
    assert damaged and damaged[0][1] == 16  # the newest checkpoint at the second kill (later rotated out)
    assert skipped.startswith(f"{damaged[0][0]} is truncated (")
    # the same batches, the same updates: the loss and validation curves of the plain run, each step once
    for key in ("loss", "val_loss", "grad_norm"):
        got, want = history(res, key), history(plain_run, key)
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-6), key


def test_trajectory_schedule_on_two_workers(ray_cluster, tmp_path):
    """The reasoning corpus through Ray Data into two FSDP2 workers (the shipped reasoning configs
    train with DDP: the pipeline and interrupt tests run them), a loss after every loop; the
    exported folder reads the problem as text."""
    from mlflow.tracking import MlflowClient

    from mythos.tokenizer import load_tokenizer_from_folder

    parallelism = "fsdp"
    sets = {"run.root": str(tmp_path), "run.name": f"traj-{parallelism}", "train.parallelism": parallelism,
            "train.steps": "12", "train.warmup_steps": "4", "train.log_every": "4", "train.eval_every": "12",
            "train.batch_size": "8", "checkpoint.every_steps": "12", "data.n_docs": "600", "data.val_docs": "32",
            "data.val_hops": "6", "data.docs_per_batch": "300", "tracking.experiment": "test-pretrain"}
    res = run_pretrain(load_config(ROOT / "jobs/configs/reasoning.yaml", [f"{k}={v}" for k, v in sets.items()]))
    client = MlflowClient(res.tracking_uri)
    loss = client.get_metric_history(res.mlflow_run_id, "loss")
    assert [m.step for m in loss] == [4, 8, 12] and loss[-1].value < loss[0].value  # it learns (the format)
    assert {m.value for m in client.get_metric_history(res.mlflow_run_id, "mean_loops")} == {4.0}  # 4 per step
    for t in range(1, 7):  # validation: 6-hop problems run for 6 loops, accuracy after each
        assert client.get_metric_history(res.mlflow_run_id, f"val_acc_loop_{t:02d}")
    acc = client.get_metric_history(res.mlflow_run_id, "val_acc")[-1].value
    assert 0.0 <= acc <= 1.0
    assert read_state(res.checkpoint_path)["step"] == 12
    model, tok = load_pretrained(res.export_dir), load_tokenizer_from_folder(res.export_dir)
    assert "parametrizations" not in str(model)  # a plain Mythos
    ids = [tok.eos_id] + tok.encode("> > ab ba cd dc ef fe gh hg ij ji kl lk mn nm op po a")
    assert len(ids) == 20 and 2 not in ids  # 1 + 2 marks + 16 pair words + the start symbol, none unknown
    logits = model(torch.tensor([ids]), n_loops=2).logits
    assert torch.isfinite(logits).all() and logits.shape == (1, 20, model.cfg.vocab_size)


def test_diverged_run_stops_once_with_a_clear_error_and_exports_nothing(ray_cluster, fault_file, tmp_path):
    """Every step from 3 on is NaN: the run stops at the 3rd skipped step in a row (step 5, as the
    progress lines count), is not retried although max_failures allows it, and exports nothing."""
    from mlflow.tracking import MlflowClient

    from mythos_platform.train.loop import NonFiniteLossError

    cfg = small_cfg(tmp_path, **{"run.max_failures": "2", "train.max_consecutive_skips": "3", "run.name": "nan"})
    fault_file.write_text(json.dumps({"nan_from_step": 3}))
    try:
        with pytest.raises(NonFiniteLossError, match=r"'nan' stopped: non-finite loss or gradient at step 5 .*"
                                                     r"3 steps in a row and 3 in all skipped"):
            run_pretrain(cfg)
    finally:
        fault_file.unlink()
    assert not (tmp_path / "export" / "nan").exists()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("test-pretrain").experiment_id])[0]
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [4]  # no restart logged steps again
