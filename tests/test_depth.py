"""The depth experiment: configs of the one trainer, a report from lm-eval points, and (Ray) a short
run of both models end to end."""

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from evals.task_data import shallow_floor, task_hops
from mythos import Mythos
from mythos_platform.config import ConfigError, load_config
from mythos_platform.depth import DepthConfig, report_from_points, run_depth_experiment
from mythos_platform.evaluation import EvalPoint

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "jobs/configs/depth-extrapolation.yaml"


def point(task: str, n_loops: int, acc: float) -> EvalPoint:
    return EvalPoint(task, n_loops, None, {"acc": acc}, {}, {"acc": True}, None, 100, 0.1)


def test_configs_are_two_pretraining_runs_of_about_the_same_size(tmp_path):
    cfg = load_config(CFG, [f"root={tmp_path}"], cls=DepthConfig)
    rdt, base = cfg.stage_configs()
    assert rdt.train.loop_schedule == "trajectory" and rdt.data.source == base.data.source == "pointer"
    assert base.model.build().n_loops == 1 and base.model.build().train_loops_max == 1  # not looped
    assert rdt.run.root == base.run.root == str(tmp_path.resolve()) and rdt.run.name != base.run.name
    n_rdt, n_base = (Mythos(c.model.build()).num_parameters() for c in (rdt, base))
    assert abs(n_base / n_rdt - 1) < 0.05  # parameter-matched within 5%
    with pytest.raises(ConfigError, match="^rdt.extends: config file 'jobs/configs/nope.yaml' does not exist"):
        load_config(CFG, ["rdt.extends=jobs/configs/nope.yaml"], cls=DepthConfig)
    with pytest.raises(ConfigError, match="eval_max_hops"):
        load_config(CFG, ["eval_max_hops=17"], cls=DepthConfig)
    with pytest.raises(ConfigError, match="^rdt.train.lrr: unknown key .did you mean 'lr'"):
        load_config(CFG, ["rdt.train.lrr=1"], cls=DepthConfig)
    with pytest.raises(ConfigError, match="^baseline.data.val_hops: got 90; a 90-hop problem"):
        load_config(CFG, ["baseline.data.val_hops=90"], cls=DepthConfig)


def test_task_hops_and_shallow_floor_come_from_the_task_data():
    assert task_hops("pointer_k7") == 7 and task_hops("multihop_k3") == 3 and task_hops("multihop_gen") is None
    # the shallow floor of 1 hop is the start symbol's score; deeper ones are >= it (more choices of j)
    assert shallow_floor("pointer_k1", 4) <= shallow_floor("pointer_k8", 4) <= 1.0
    assert shallow_floor("multihop_k3", 4) is None  # rows without their chain


def test_report_table_plot_and_deepest_solved(tmp_path):
    pts = [point(f"pointer_k{h}", n, 1.0 if n == h else 0.3) for h in range(1, 7) for n in (1, 2, 8)]
    pts += [point(f"pointer_k{h}", h, 1.0 if h < 6 else 0.5) for h in (3, 4, 5, 6)]
    base = [point(f"pointer_k{h}", 1, 0.9 if h <= 4 else 0.2) for h in range(1, 7)]
    rep = report_from_points(pts, base, trained_hops=4, loops=[1, 2, 8])
    assert rep.hops == [1, 2, 3, 4, 5, 6]
    assert rep.at_loops_equal_hops(2) == 1.0 and rep.at_loops_equal_hops(6) == 0.5
    assert rep.deepest_solved() == 5
    md = rep.markdown()
    assert md.splitlines()[0] == ("| hops | loops = hops | 1 loops | 2 loops | 8 loops | baseline | shallow floor "
                                  "| chance |")
    assert "| 4* | 1.00 | 0.30 | 0.30 | 0.30 | 0.90 |" in md and "| 6 | 0.50 |" in md
    assert rep.csv().splitlines()[1].startswith("1,1.00,1.00,0.30,0.30,0.90,")
    png = rep.plot(tmp_path / "p.png")
    assert png.stat().st_size > 20_000


@pytest.mark.ray
@pytest.mark.slow
def test_short_depth_experiment_runs_both_models_through_the_trainer(ray_cluster, tmp_path):
    short = ["train.steps=6", "train.warmup_steps=2", "train.log_every=3", "train.eval_every=6",
             "checkpoint.every_steps=6", "data.n_docs=512", "data.val_docs=32", "data.docs_per_batch=256",
             "train.batch_size=8", "scaling.cpus_per_worker=0.5"]
    sets = [f"{role}.{item}" for role in ("rdt", "baseline") for item in ["run.name=" + role[0], *short]]
    cfg = load_config(CFG, [f"root={tmp_path}", *sets, "eval_loops=[1,3]", "eval_max_hops=5", "eval_limit=10"],
                      cls=DepthConfig)
    res = run_depth_experiment(cfg)
    rep = res.report
    assert set(rep.grid) == {(h, n) for h in range(1, 6) for n in (1, 3)} | {(h, h) for h in range(1, 6)}
    assert set(rep.baseline) == set(rep.floor) == {1, 2, 3, 4, 5}
    assert abs(res.params["baseline"] / res.params["rdt"] - 1) < 0.05
    assert res.plot_path.stat().st_size > 20_000 and "| 5 |" in res.table_md
    client = MlflowClient(res.tracking_uri)
    hist = client.get_metric_history(res.run_id, "rdt_acc_hops_03")
    assert sorted(m.step for m in hist) == [1, 3]
    assert sorted(m.step for m in client.get_metric_history(res.run_id, "baseline_acc")) == [1, 2, 3, 4, 5]
    assert {"plots", "results"} <= {a.path for a in client.list_artifacts(res.run_id)}
    # both models were trained by the one trainer: two pretraining runs in the same store
    runs = client.search_runs([client.get_experiment_by_name("mythos-pretrain").experiment_id])
    assert {r.data.tags["mythos.run_name"] for r in runs} == {"r", "b"}
    assert {r.data.params["train.loop_schedule"] for r in runs} == {"trajectory", "random"}
