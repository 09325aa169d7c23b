"""MLflow tracking: a run in an embedded SQLite store read back through MlflowClient, and outages."""

from __future__ import annotations

import logging
import pickle
import subprocess

import pytest

from mythos_platform.config import PretrainConfig, TrackingConfig
from mythos_platform.tracking import (
    MAX_PARAM_VALUE,
    Tracker,
    flatten_params,
    git_commit,
    git_tags,
    loss_curve_png,
    tracking_uri,
)


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One run root (SQLite store + artifacts) for the module: creating the schema takes seconds."""
    return tmp_path_factory.mktemp("runs")


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    assert tracking_uri(TrackingConfig(), tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking_uri(TrackingConfig(tracking_uri="http://mlflow:5000"), tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    assert tracking_uri(TrackingConfig(tracking_uri="http://mlflow:5000"), tmp_path) == "http://elsewhere:5000"


def test_flatten_params_respects_mlflow_limits():
    flat = flatten_params({"train": {"lr": 1e-3, "betas": [0.9, 0.95]}, "long": "x" * 10_000, "none": None})
    assert flat["train.lr"] == "0.001" and flat["train.betas"] == "[0.9, 0.95]" and flat["none"] == "None"
    assert len(flat["long"]) == MAX_PARAM_VALUE and flat["long"].startswith("xxx") and "cut" in flat["long"]


def test_loss_curve_png(tmp_path):
    rows = [{"step": s, "train/loss": 3.0 / (s + 1), "val/loss": None if s % 2 else 3.1 / (s + 1)}
            for s in range(20)]
    png = loss_curve_png(rows, tmp_path / "plots" / "loss.png", log_y=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_git_commit(tmp_path):
    assert git_commit(tmp_path) is None and git_tags(tmp_path) == {}
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "PATH": "/usr/bin:/bin"}
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=tmp_path, check=True, env=env)
    sha = git_commit(tmp_path)
    assert sha and len(sha) == 40 and git_tags(tmp_path) == {"mlflow.source.git.commit": sha}


def test_run_in_embedded_sqlite_store(store, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = PretrainConfig()
    tracker = Tracker(cfg.tracking, store)
    with tracker.start(run_name="unit", tags={"job": "pretrain"}):
        tracker.log_params(cfg.to_dict())  # nested: flattened here
        for step in range(0, 50, 10):
            tracker.log_metrics({"train/loss": 4.0 - step / 25, "lr": 1e-3, "skip": "n/a"}, step=step)
        tracker.set_tags({"variant": "debug"})
        tracker.log_dict({"a": 1}, "config/resolved.json")
        tracker.log_text("hello", "notes.txt")
        tracker.log_loss_curve({"train/loss": tracker.metric_history("train/loss")}, "plots/loss.png")
        (tmp_path / "extra.txt").write_text("x")
        tracker.log_artifact(tmp_path / "extra.txt", "files")
    assert tracker.errors == 0

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp = client.get_experiment_by_name("mythos-pretrain")
    assert exp.artifact_location == (store / "mlartifacts" / "mythos-pretrain").resolve().as_uri()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "unit"
    assert run.data.params["train.lr"] == "0.0003" and run.data.params["model.variant"] == "debug"
    assert run.data.params["train.betas"] == "[0.9, 0.95]"
    assert run.data.tags["job"] == "pretrain" and run.data.tags["variant"] == "debug"
    history = client.get_metric_history(tracker.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(s, 4.0 - s / 25) for s in range(0, 50, 10)]
    assert "skip" not in run.data.metrics
    arts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config", "notes.txt", "plots", "files"} <= arts
    png = client.download_artifacts(tracker.run_id, "plots/loss.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(4) == b"\x89PNG"
    assert (store / "mlartifacts" / "mythos-pretrain" / tracker.run_id / "artifacts" / "notes.txt").exists()

    # a worker-side tracker attached to the same run: picklable, and only rank 0 writes
    rank0 = pickle.loads(pickle.dumps(Tracker(cfg.tracking, store, run_id=tracker.run_id)))
    rank1 = Tracker(cfg.tracking, store, run_id=tracker.run_id, active=False)
    rank0.log_metrics({"worker": 1.0}, step=7)
    rank1.log_metrics({"worker": 2.0}, step=8)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "worker")] == [(7, 1.0)]


def test_explicit_sqlite_store_keeps_artifacts_beside_it_and_opens_as_training(store, tmp_path, monkeypatch):
    """A job given the store's URI explicitly (the pipeline's evaluation stage), started from another
    working directory, writes its artifacts beside the database, not into ./mlruns there; its
    experiment carries the kind tag that makes MLflow's UI open the training view."""
    from mlflow.tracking import MlflowClient

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    uri = f"sqlite:///{store}/mlflow.db"
    tracker = Tracker(TrackingConfig(experiment="mythos-eval-explicit", tracking_uri=uri), tmp_path / "other-root")
    with tracker.start(run_name="eval"):
        tracker.log_text("x", "results/results.md")
    assert tracker.errors == 0
    assert (store / "mlartifacts" / "mythos-eval-explicit" / tracker.run_id / "artifacts" / "results" /
            "results.md").is_file()
    assert not (elsewhere / "mlruns").exists()
    exp = MlflowClient(uri).get_experiment_by_name("mythos-eval-explicit")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_existing_experiment_without_kind_gets_tagged(store):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    exp_id = client.create_experiment("made-by-hand")
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    Tracker(TrackingConfig(experiment="made-by-hand"), store).create_experiment()
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_find_run_and_reopen(store):
    """An earlier launch's run is found by tag (the newest of several) and continued as RUNNING."""
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(experiment="mythos-find")
    assert Tracker(cfg, store).find_run("tags.`name` = 'a'") is None  # no experiment yet
    ids = []
    for _ in range(2):
        with Tracker(cfg, store).start(tags={"name": "a"}) as t:
            ids.append(t.run_id)
    assert Tracker(cfg, store).find_run("tags.`name` = 'a'") == ids[-1]
    assert {r.info.run_id for r in Tracker(cfg, store).search_runs("tags.`name` = 'a'")} == set(ids)
    assert Tracker(cfg, store).find_run("tags.`name` = 'b'") is None
    assert Tracker(cfg, store, active=False).find_run("tags.`name` = 'a'") is None  # tracking off: no look-up
    again = Tracker(cfg, store).reopen(ids[0])
    assert again.run_id == ids[0] and MlflowClient(again.uri).get_run(ids[0]).info.status == "RUNNING"
    again.end()
    assert MlflowClient(again.uri).get_run(ids[0]).info.status == "FINISHED" and again.errors == 0


def test_failed_block_marks_run_failed(store):
    from mlflow.tracking import MlflowClient

    tracker = Tracker(TrackingConfig(experiment="mythos-test"), store)
    with pytest.raises(RuntimeError):
        with tracker.start():
            raise RuntimeError("training crashed")
    assert MlflowClient(tracker.uri).get_run(tracker.run_id).info.status == "FAILED"


def test_outage_is_warned_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(tracking_uri="http://127.0.0.1:9")  # nothing listens on the discard port
    caplog.set_level(logging.WARNING, logger="mythos_platform.tracking")

    tracker = Tracker(cfg, tmp_path).start(run_name="offline")  # cannot create the run: no exception
    assert tracker.run_id is None and tracker.errors == 1
    tracker.log_metrics({"loss": 1.0}, step=1)  # no run: quiet no-ops
    tracker.end()

    # an outage in the middle of a run: every call fails, one warning in all
    mid = Tracker(cfg, tmp_path, run_id="0123456789abcdef")
    for step in range(3):
        mid.log_metrics({"loss": 1.0}, step=step)
    mid.log_params({"a": 1})
    mid.log_text("x", "x.txt")
    assert mid.find_run("tags.`name` = 'a'") is None  # an earlier run cannot be looked up: start a new one
    mid.end()
    assert mid.errors == 7
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per tracker
    assert "127.0.0.1:9" in warnings[0].getMessage() and "training goes on" in warnings[0].getMessage()
