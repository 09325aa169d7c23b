"""The pipeline's config, its question and its summary. The pipeline itself runs end to end, as a
user runs it (interrupted in every stage and resumed), in tests/test_interrupts.py, which also
asserts what the demo shows: loops = hops solves problems deeper than any trained."""

from pathlib import Path

import pytest

from mythos_platform.config import ConfigError, load_config
from mythos_platform.pipeline import PipelineConfig, question

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
    # both registry versions compared, with their figures, and which one won
    assert "pretrained model (version 1) val_acc 0.990, best sweep trial (t3, version 2) val_acc 1.000 -> champion: " \
           "the sweep's best trial (models:/mythos-rdt@champion = version 2)" in "\n".join(out)
    assert "solves every depth up to 16 hops at >= 0.95 (4x the trained depth)" in "\n".join(out)
    assert out[-3].strip() == q["prompt"]
    assert out[-2].split() == ["n_loops=8", "->", "'k'", "(right)"]
    assert out[-1].split() == ["n_loops=2", "->", "'p'", "(wrong)"]
    curl = next(line for line in out if line.startswith("query the API"))
    assert '"n_loops": 8' in curl and q["prompt"] in curl and "-d '{" in curl


def test_the_champions_trained_depth_is_its_own_runs(tmp_path):
    """The summary's "trained on <= N hops" is the champion's: a sweep trial fine-tuned on deeper
    chains than the pretraining (the interrupt chain's curriculum: 2, then 4) reports the deeper."""
    from mlflow.tracking import MlflowClient

    from mythos_platform.pipeline import PipelineRun
    from mythos_platform.registry import register_model

    cfg = load_config(CFG, [f"root={tmp_path}", "pretrain.data.min_hops=2", "pretrain.data.max_hops=2"],
                      cls=PipelineConfig)
    run = PipelineRun(cfg)
    client = MlflowClient(run.uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    versions = {}
    for hops, acc in ((2, 0.5), (4, 0.9)):
        r = client.create_run(exp)
        client.log_param(r.info.run_id, "data.max_hops", hops)
        versions[hops] = register_model(run.uri, r.info.run_id, acc, "val_acc", lower_is_better=False).version
    run.champion = {"version": versions[2], "pretrained_version": versions[2]}
    assert run.champion_trained_hops() == 2
    run.champion.update(version=versions[4], sweep_version=versions[4])
    assert run.champion_trained_hops() == 4


def test_a_relaunch_finds_runs_that_finished_earlier_without_any_ray_work(tmp_path, capsys):
    """The pipeline run again (after a Ctrl-C in a later stage) learns in its own process that the
    looped model and the baseline finished earlier with these configs: their recorded results come
    back and no Ray task starts (one was about 15 s of a 2-core machine per launch); a run whose
    config changed since is not taken as finished."""
    import json

    import ray

    from mythos_platform.tracking import Tracker
    from mythos_platform.train.trainer import (FINISHED_FILE, RUN_NAME_TAG, _done_earlier, _export_dir, _run_name,
                                               run_pretrains)

    cfg = load_config(CFG, [f"root={tmp_path}"], cls=PipelineConfig)
    pre, base, _, _ = cfg.stage_configs()
    ids = {}
    for c, acc in ((pre, 0.75), (base, 0.25)):
        name = _run_name(c)
        export = _export_dir(c, name, Path(c.run.root))
        export.mkdir(parents=True)
        (export / FINISHED_FILE).write_text(json.dumps({"config": c.to_dict(), "checkpoint": f"/ckpt/{name}",
                                                        "metrics": {"val_acc": acc}}, default=str))
        tracker = Tracker(c.tracking, Path(c.run.root)).start(tags={RUN_NAME_TAG: name})
        tracker.end()
        ids[name] = tracker.run_id
    assert not ray.is_initialized()
    runs = run_pretrains([pre, base])
    assert not ray.is_initialized()  # nothing was launched to find out
    assert [r.run_name for r in runs] == [_run_name(pre), _run_name(base)]
    assert [r.metrics["val_acc"] for r in runs] == [0.75, 0.25]
    assert [r.mlflow_run_id for r in runs] == [ids[_run_name(pre)], ids[_run_name(base)]]
    assert runs[0].checkpoint_path == f"/ckpt/{_run_name(pre)}"
    out = capsys.readouterr().out
    assert out.count("finished earlier with this config") == 2, out
    # a changed config is not the finished run: it would train (resuming from its checkpoints)
    assert _done_earlier(pre.updated({"train.steps": pre.train.steps + 1})) is None
