"""A shortened end-to-end pipeline: pretrain -> sweep -> evaluate -> deploy -> one request."""

import socket
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mythos_platform.config import ConfigError, load_config
from mythos_platform.pipeline import PipelineConfig, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bad_stage_config_fails_before_ray(tmp_path):
    with pytest.raises(ConfigError, match="pretrain_overrides|train.lrr"):
        from mythos_platform.pipeline import _stage_configs

        cfg = load_config(ROOT / "jobs/configs/pipeline-debug.yaml", [f"root={tmp_path}"], cls=PipelineConfig)
        _stage_configs(cfg.replace(pretrain_overrides=["train.lrr=1"]), tmp_path)


def test_short_pipeline_end_to_end(ray_cluster, tmp_path):
    short_pretrain = ["data.n_docs=800", "data.val_docs=100", "data.val_blocks=8", "data.seq_len=64",
                      "train.steps=8", "train.warmup_steps=2", "train.log_every=4", "train.eval_every=8",
                      "train.val_batches=2", "checkpoint.every_steps=8"]
    sets = [
        f"root={tmp_path}", "keep_serving=false", "eval_loops=[1,4]", "eval_tasks=[multihop_k1,multihop_k2]",
        "eval_limit=8", "eval_exit_thresholds=[]", "request_max_tokens=4",
        f"pretrain_overrides={short_pretrain}",
        "sweep_overrides=[name=t-sweep, base.data.n_docs=800, base.data.val_docs=100, base.data.val_blocks=8, "
        "base.train.steps=6, base.train.warmup_steps=2, base.train.eval_every=3, base.checkpoint.every_steps=6, asha.enabled=false, "
        "'space={\"model.overrides.lora_rank\": [2, 4]}']",
        f"serve_overrides=[http.port={free_port()}, batching.max_wait_ms=5]",
    ]
    cfg = load_config(ROOT / "jobs/configs/pipeline-debug.yaml", sets, cls=PipelineConfig)
    s = run_pipeline(cfg)
    client = MlflowClient(s.tracking_uri, registry_uri=s.tracking_uri)
    champ = client.get_model_version_by_alias("mythos-rdt", "champion")
    assert str(champ.version) == s.champion["version"]
    # the champion is the best of the pretrain candidate and the two sweep trials by val_loss
    versions = client.search_model_versions("name='mythos-rdt'")
    assert len(versions) >= 2
    assert float(champ.tags["val_loss"]) == min(float(v.tags["val_loss"]) for v in versions)
    # evaluation metrics at each loop count
    for task in ("multihop_k1", "multihop_k2"):
        hist = client.get_metric_history(s.eval_run_id, f"{task}/acc")
        assert sorted(m.step for m in hist) == [1, 4]
    assert "multihop_k1" in s.loops_table
    # a served answer
    assert s.completion["object"] == "text_completion"
    assert s.completion["usage"]["completion_tokens"] >= 1
    assert s.completion["mythos"]["n_loops"] == 8
    assert set(s.stages) == {"pretrain", "sweep", "evaluate", "deploy", "request"}
