"""Ray Tune sweeps: search-space validation, a 4-trial ASHA sweep, MLflow runs, the registered winner, clean-up."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from mythos_platform.config import ConfigError
from mythos_platform.tune import SweepConfig, load_sweep_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
GOOD_LR, BAD_LR = 3e-3, 1e-9  # BAD_LR cannot learn in 8 steps: ASHA must cut it at the first rung (step 4)


def sweep_cfg(root: Path, name: str = "t-sweep", **extra) -> SweepConfig:
    data = {
        "name": name, "root": str(root), "experiment": "test-sweep",
        "base": {
            "extends": str(ROOT / "jobs/configs/debug.yaml"),
            "data": {"n_docs": 400, "val_docs": 60, "val_blocks": 4, "seq_len": 32},
            "train": {"steps": STEPS, "batch_size": 4, "warmup_steps": 2, "min_lr": 0.0, "log_every": 4,
                      "eval_every": 4, "val_batches": 1},
            "checkpoint": {"every_steps": STEPS},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
        },
        # grid order: the first key varies slowest, so both good-lr trials start (2 at a time)
        # before the bad ones, and have recorded the first rung when a bad one reaches it
        "space": {"train.lr": [GOOD_LR, BAD_LR], "model.overrides.lora_rank": [2, 4],
                  "model.overrides.train_loops_mean": 2.0, "model.overrides.bptt_depth": 2},
        "search": {"algorithm": "grid", "max_concurrent_trials": 2},
        "asha": {"grace_period": 4, "reduction_factor": 2},
        **extra,
    }
    return SweepConfig.from_dict(data)


# ---------------------------------------------------------------------------------------
# Validation: before any trial (or Ray) starts, naming the key
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, key, words", [
    ("space.model.overrides.lora_rnk=[2,4]", "space.model.overrides.lora_rnk", "did you mean 'lora_rank'"),
    ("space.train.lr={uniformm: [1.0e-4, 1.0e-3]}", "space.train.lr", "unknown distribution 'uniformm'"),
    ("space.train.lr={loguniform: [0, 1]}", "space.train.lr", "0 < low < high"),
    ("space.model.overrides.bptt_depth=[0, 2]", "space.model.overrides.bptt_depth", "must be >= 1"),
    ("space.model.overrides.train_loops_mean=[2.0, 99.0]", "space.model.overrides.train_loops_mean",
     "train_loops_max"),
    ("space.train.lr={uniform: [1.0e-4, 1.0e-3]}", "space.train.lr", "search.algorithm random"),
    ("space.run.root=[a, b]", "space.run.root", "set by the sweep"),
    ("space.train=[1, 2]", "space.train", "whole section"),
    ("base.train.lrr=1", "base.train.lrr", "unknown key"),
])
def test_bad_search_space_entries_name_the_key(override, key, words):
    with pytest.raises(ConfigError) as err:
        load_sweep_config(ROOT / "jobs/configs/sweep-debug.yaml", [override])
    assert err.value.path == key and words in str(err.value)


def test_values_checked_against_the_base_and_in_combination():
    # lr below the base's min_lr is rejected by the pretrain config itself
    with pytest.raises(ConfigError) as err:
        load_sweep_config(ROOT / "jobs/configs/sweep-debug.yaml", ["space.train.lr=[1.0e-9]"])
    assert err.value.path == "space.train.lr" and "min_lr" in str(err.value)
    # each value alone is fine, the combination is not (train_loops_min 8 > train_loops_mean 2)
    with pytest.raises(ConfigError) as err:
        load_sweep_config(ROOT / "jobs/configs/sweep-debug.yaml", ["space.model.overrides.train_loops_min=[1, 8]",
                                                                   "space.model.overrides.train_loops_mean=[2.0, 9.0]"])
    assert "train_loops_m" in err.value.path and "rejects" in str(err.value)


def test_debug_sweep_config_and_random_search_parse():
    cfg = load_sweep_config(ROOT / "jobs/configs/sweep-debug.yaml")
    assert cfg.num_trials() == 8
    assert {p.key for p in cfg.params()} >= {"model.overrides.train_loops_mean", "model.overrides.bptt_depth",
                                              "model.overrides.lora_rank", "train.lr"}
    rnd = load_sweep_config(ROOT / "jobs/configs/sweep-debug.yaml", [
        "search.algorithm=random", "search.num_samples=3", "space.train.lr={loguniform: [1.0e-4, 3.0e-3]}",
        "space.model.overrides.bptt_depth={randint: [1, 3]}"])
    kinds = {p.key: p.kind for p in rnd.params()}
    assert kinds["train.lr"] == "loguniform" and kinds["model.overrides.bptt_depth"] == "randint"
    assert rnd.num_trials() == 3 * 2 * 2  # samples x the two remaining grids


def test_sweep_job_rejects_bad_space_before_starting_ray():
    cmd = [sys.executable, "jobs/sweep.py", "--config", "jobs/configs/sweep-debug.yaml",
           "--set", "space.model.overrides.lora_rank={choice: []}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "space.model.overrides.lora_rank" in out.stderr and "non-empty list" in out.stderr
    assert "Started a local Ray instance" not in out.stderr


# ---------------------------------------------------------------------------------------
# A real sweep on a local Ray cluster
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory):
    from mythos_platform.tune import run_sweep

    cfg = sweep_cfg(tmp_path_factory.mktemp("sweep"))
    t0 = time.perf_counter()
    res = run_sweep(cfg)
    wall = time.perf_counter() - t0
    print(f"\n[test] sweep wall {wall:.1f}s; split " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items())
          + f"; released {len(res.released)} leaked placement groups")
    for r in res.trials:
        print(f"[test]   {r['trial_id']} lr={r['train.lr']} rank={r['model.overrides.lora_rank']} {r['status']} "
              f"step={r['step']} val_loss={r['metric']:.3f} time={r['time_s']}s")
    return cfg, res


@pytest.mark.ray
def test_sweep_asha_stops_the_arm_that_cannot_learn(sweep):
    cfg, res = sweep
    assert len(res.trials) == 4 and not any(r["status"] == "error" for r in res.trials)
    bad = [r for r in res.trials if r["train.lr"] == BAD_LR]
    good = [r for r in res.trials if r["train.lr"] == GOOD_LR]
    assert len(bad) == 2 and all(r["status"] == "early_stopped" and r["step"] < STEPS for r in bad)
    done = [r for r in res.trials if r["status"] == "completed"]
    assert done and all(r["train.lr"] == GOOD_LR and r["step"] == STEPS for r in done)
    assert all(r["best_metric"] < min(b["best_metric"] for b in bad) for r in good)  # it learns, the bad arm not
    assert not res.leftovers, res.leftovers


@pytest.mark.ray
def test_sweep_leaves_no_placement_groups_or_train_actors(sweep):
    import ray
    from ray.util.state import list_actors, list_placement_groups

    address = ray.get_runtime_context().gcs_address  # other engineers' clusters run on this machine too
    assert list_placement_groups(address=address, filters=[("state", "!=", "REMOVED")]) == []
    alive = [a.class_name for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])]
    sweep_classes = ("TrainController", "RayTrainWorker", "ImplicitFunc", "_trial", "SplitCoordinator")
    assert not [c for c in alive if c in sweep_classes], alive


@pytest.mark.ray
def test_sweep_mlflow_parent_children_and_artifacts(sweep):
    from mlflow.tracking import MlflowClient

    cfg, res = sweep
    client = MlflowClient(res.tracking_uri)
    parent = client.get_run(res.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["mythos.sweep.name"] == cfg.name
    assert parent.data.params["space.train.lr"] == f"grid[{GOOD_LR}, {BAD_LR}]"
    assert parent.data.metrics["trials"] == 4 and parent.data.metrics["trials_early_stopped"] >= 2
    arts = {a.path for d in ("results", "plots") for a in client.list_artifacts(res.parent_run_id, d)}
    assert {"results/results.csv", "results/results.md", "plots/val_loss_vs_loops.png"} <= arts
    csv_text = Path(client.download_artifacts(res.parent_run_id, "results/results.csv")).read_text()
    assert csv_text.count("\n") == 5 and "early_stopped" in csv_text and "model.overrides.lora_rank" in csv_text
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    assert len(children) == 4
    by_run = {r["mlflow_run_id"]: r for r in res.trials}
    for child in children:
        row = by_run[child.info.run_id]
        assert child.data.params["train.lr"] == str(row["train.lr"])
        assert child.data.params["model.overrides.lora_rank"] == str(row["model.overrides.lora_rank"])
        assert child.data.tags["mythos.sweep.status"] == row["status"]
        assert child.info.status == ("FINISHED" if row["status"] == "completed" else "KILLED")
        assert client.get_metric_history(child.info.run_id, "val_loss")


@pytest.mark.ray
def test_registered_alias_points_to_the_best_trial(sweep):
    from mlflow.tracking import MlflowClient

    from mythos.checkpoint import load_pretrained
    from mythos_platform.registry import resolve_model

    cfg, res = sweep
    done = [r for r in res.trials if r["status"] == "completed"]
    best = min(done, key=lambda r: r["metric"])
    assert res.best["trial_id"] == best["trial_id"]
    client = MlflowClient(res.tracking_uri, registry_uri=res.tracking_uri)
    champ = client.get_model_version_by_alias("mythos-rdt", "champion")
    assert champ.run_id == best["mlflow_run_id"]
    assert float(champ.tags["val_loss"]) == pytest.approx(best["metric"])
    assert res.registration.alias_moved and res.registration.version == str(champ.version)
    folder = resolve_model("models:/mythos-rdt@champion", res.tracking_uri)
    assert load_pretrained(folder).cfg.lora_rank == best["model.overrides.lora_rank"]


@pytest.mark.ray
def test_rerunning_a_finished_sweep_resumes_it_without_new_trials(sweep):
    from mythos_platform.tune import run_sweep

    cfg, res = sweep
    again = run_sweep(cfg)
    assert again.parent_run_id == res.parent_run_id
    assert [(r["trial_id"], r["status"]) for r in again.trials] == [(r["trial_id"], r["status"]) for r in res.trials]
    assert again.registration.version == res.registration.version and not again.registration.alias_moved
    assert again.timings["trials"] < 60


def test_sweep_plot_compares_trials_at_a_step_all_reached_and_marks_stopped_ones(tmp_path):
    """ASHA stops the weak arm at half the steps: the plot's right panel reads every trial at the
    last step all of them reached, not a stopped trial's half-trained figure against a finished one's."""
    from mythos_platform.tune.results import common_step, metric_plot, value_at

    rows = [
        {"trial_id": "a", "status": "completed", "label_loops": 4, "lora": 0,
         "history": [(40, 0.5), (80, 0.7), (120, 0.8), (160, 0.9)]},
        {"trial_id": "b", "status": "completed", "label_loops": 6, "lora": 0,
         "history": [(40, 0.4), (80, 0.6), (120, 0.85), (160, 0.95)]},
        {"trial_id": "c", "status": "early_stopped", "label_loops": 6, "lora": 4, "history": [(40, 0.45), (80, 0.65)]},
    ]
    assert common_step(rows) == 80
    assert [value_at(r["history"], 80) for r in rows] == [0.7, 0.6, 0.65]
    assert value_at(rows[0]["history"], 100) == 0.7 and value_at(rows[0]["history"], 10) is None
    png = metric_plot(rows, "label_loops", "lora", "val_acc", tmp_path / "p.png", title="sweep t",
                      searched=["label_loops", "lora"])
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 20_000


def test_sweep_progress_counts_the_trial_being_reported_and_names_early_stops(capsys):
    """Tune calls back before it sets the trial's status: the line counts that trial as the event says."""
    from types import SimpleNamespace as T

    from mythos_platform.tune.progress import SweepProgress

    p = SweepProgress("val_acc", 3, ["data.label_loops", "model.overrides.lora_rank"])
    a = T(trial_id="x_00000", status="PENDING", config={"data.label_loops": 4, "model.overrides.lora_rank": 0},
          last_result={})
    b = T(trial_id="x_00001", status="RUNNING", config={"data.label_loops": 6, "model.overrides.lora_rank": 4},
          last_result={"val_acc": 0.41, "step": 80})
    c = T(trial_id="x_00002", status="TERMINATED", config={"data.label_loops": 6, "model.overrides.lora_rank": 0},
          last_result={"val_acc": 0.9, "step": 160, "completed": 1})
    p.on_trial_start(0, [a, b, c], a)
    p.on_trial_complete(0, [a, b, c], b)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("[mythos] sweep 1/3 trials done, 2 running | trial 00000 started "
                      "(label_loops=4, lora_rank=0)")
    assert out[1] == ("[mythos] sweep 2/3 trials done (1 stopped early by the scheduler), 0 running | trial 00001 "
                      "stopped early by the scheduler at step 80: val_acc 0.410 (label_loops=6, lora_rank=4)")
