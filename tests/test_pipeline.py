"""A shortened `make demo`: pretrain the reasoning model (and a baseline) -> sweep from it -> lm-eval
at several loop counts -> deploy -> one deep question. Asserts that looping buys depth: on hop
counts beyond training, accuracy at loops = hops is high and far above a shallow loop count."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from mythos_platform.config import ConfigError, load_config
from mythos_platform.pipeline import PipelineConfig, question, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "jobs/configs/pipeline-debug.yaml"


def test_bad_stage_config_fails_before_ray(tmp_path):
    """Each stage's config is typed inside the pipeline's: a bad key anywhere fails at load time,
    named by its dotted path through the pipeline config."""
    cfg = load_config(CFG, [f"root={tmp_path}"], cls=PipelineConfig)
    pre, base, swp, srv = cfg.stage_configs()
    assert pre.run.root == base.run.root == swp.root == str(tmp_path.resolve())
    assert srv.model.source == "models:/mythos-rdt@champion" and swp.name == "pipeline-sweep"
    assert pre.train.batch_size == 32 and pre.train.loop_schedule == "trajectory"  # reasoning.yaml + the demo's change
    with pytest.raises(ConfigError, match=r"^pretrain\.train\.lrr: unknown key \(did you mean 'lr'\?\)"):
        load_config(CFG, ["pretrain.train.lrr=1"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match=r"^baseline\.data\.val_hops: got 90"):
        load_config(CFG, ["baseline.data.val_hops=90"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match=r"^sweep\.base\.train\.lr: got -1"):
        load_config(CFG, ["sweep.base.train.lr=-1"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match="the sweep ranks on val_acc"):
        load_config(CFG, ["metric=val_loss", "mode=min"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match="question_hops"):
        load_config(CFG, ["question_hops=17"], cls=PipelineConfig)
    with pytest.raises(ConfigError, match=r"^serve\.extends: config file 'nope.yaml' does not exist"):
        load_config(CFG, ["serve.extends=nope.yaml"], cls=PipelineConfig)


def test_the_demo_question_needs_every_hop():
    q = question(8)
    chain = q["chain"]
    assert q["hops"] == 8 and len(chain) == 9 and q["answer"].strip() == chain[8]
    assert all(chain[j] != chain[8] for j in range(8))  # stopping early is visibly wrong
    assert q["prompt"].startswith("> " * 8) and q["prompt"].endswith(" " + chain[0])


@pytest.mark.ray
@pytest.mark.slow
def test_short_pipeline_shows_loops_solving_deeper_problems(ray_cluster, tmp_path, free_port):
    """Shortened to fit the test budget as a curriculum: pretraining follows 2-hop chains (the first
    lookup is found within a few hundred steps), the sweep fine-tunes on 4-hop chains; the sweep's
    best must beat the pretrained model on 8-hop validation problems and become the champion."""
    pre = ["data.min_hops=2", "data.max_hops=2", "train.steps=600", "train.lr=2.0e-3", "train.min_lr=2.0e-3",
           "train.eval_every=300", "train.log_every=100", "checkpoint.every_steps=600", "data.n_docs=20000",
           "data.val_docs=64", "data.val_blocks=64", "data.val_hops=8"]
    base = ["train.steps=30", "train.warmup_steps=5", "train.eval_every=30", "checkpoint.every_steps=30",
            "data.n_docs=2000", "data.val_docs=32", "scaling.cpus_per_worker=0.4", "train.batch_size=8"]
    sweep = ["name=t-sweep", "base.data.n_docs=6000", "base.data.val_docs=64", "base.data.val_hops=8",
             "base.train.steps=160", "base.train.warmup_steps=20", "base.train.eval_every=40",
             "base.checkpoint.every_steps=160", "asha.enabled=false", "space={data.label_loops: [4], "
             "model.overrides.lora_rank: [0, 2]}"]
    sets = [
        f"root={tmp_path}", "keep_serving=false", "eval_loops=[2,8]", "eval_max_hops=8", "eval_limit=30",
        *(f"pretrain.{item}" for item in ["scaling.num_workers=1", "scaling.cpus_per_worker=1.0",
                                          "train.batch_size=32", *pre]),
        *(f"baseline.{item}" for item in ["scaling.num_workers=1", *base]),
        *(f"sweep.{item}" for item in sweep),
        f"serve.http.port={free_port()}",
    ]
    cfg = load_config(CFG, sets, cls=PipelineConfig)
    s = run_pipeline(cfg)
    assert set(s.stages) == {"pretrain", "sweep", "evaluate", "deploy", "request"}
    client = MlflowClient(s.tracking_uri, registry_uri=s.tracking_uri)
    champ = client.get_model_version_by_alias("mythos-rdt", "champion")
    assert str(champ.version) == s.champion["version"]
    versions = client.search_model_versions("name='mythos-rdt'")
    assert len(versions) == 2  # the pretrained model and the sweep's best, compared on val_acc (higher wins)
    assert float(champ.tags["val_acc"]) == max(float(v.tags["val_acc"]) for v in versions)
    # 4-hop chains beat 2-hop chains on 8-hop validation problems: the sweep's best is the champion
    assert s.champion["sweep_best"] > s.champion["pretrained"] and s.champion["version"] == s.champion["sweep_version"]
    # looping buys depth: beyond the trained 4 hops, loops = hops solves what 2 loops cannot
    for task in ("pointer_k6", "pointer_k8"):
        hist = {m.step: m.value for m in client.get_metric_history(s.eval_run_id, f"{task}/acc")}
        k = int(task.rsplit("k", 1)[1])
        assert set(hist) == {2, 8, k}
        assert hist[k] >= 0.8, hist
        assert hist[k] >= hist[2] + 0.2, hist
    assert s.deepest_solved >= 5
    assert "| 8 |" in s.depth_table and "baseline" in s.depth_table
    assert s.plot_path.exists() and s.plot_path.stat().st_size > 20_000
    # the served model answers the 8-hop question right with 8 loops, and not with 2
    assert [a.n_loops for a in s.answers] == [8, 2]
    assert s.answers[0].correct and not s.answers[1].correct


def test_summary_says_what_was_compared_and_ends_with_the_served_answers(capsys, tmp_path):
    from mythos_platform.pipeline import Answer, PipelineSummary, print_summary

    q = question(8)
    s = PipelineSummary(tmp_path, "sqlite:///x.db", {"pretrain": 60.0, "sweep": 30.0}, "p", "s", "e",
                        {"pretrained": 0.99, "version": "2", "pretrained_version": "1", "sweep_best": 1.0,
                         "sweep_trial": "t3", "sweep_version": "2"},
                        "| hops | loops = hops |\n", tmp_path / "plot.png", 16, 4, "http://127.0.0.1:8000", "mythos-rdt",
                        q, [Answer(8, " k", 8, True), Answer(2, " p", 2, False)])
    print_summary(s, keep_serving=True)
    out = capsys.readouterr().out.rstrip().splitlines()
    assert any(line.startswith("The endpoint stays up") for line in out[:-4])  # the answers stay the last lines
    assert "pretrained model val_acc 0.990, best sweep trial (t3) val_acc 1.000 -> champion: the sweep's best " \
           "trial (models:/mythos-rdt@champion = version 2)" in "\n".join(out)
    assert "solves every depth up to 16 hops at >= 0.95 (4x the trained depth)" in "\n".join(out)
    assert out[-3].strip() == q["prompt"]
    assert out[-2].split() == ["n_loops=8", "->", "'k'", "(right)"]
    assert out[-1].split() == ["n_loops=2", "->", "'p'", "(wrong)"]
    curl = next(line for line in out if line.startswith("query the API"))
    assert '"n_loops": 8' in curl and q["prompt"] in curl and "-d '{" in curl
