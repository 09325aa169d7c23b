"""The depth-extrapolation experiment as configs of the one trainer: pretrain the looped model and
its baseline side by side (two Ray Train runs), score both with lm-eval on pointer_k<hops> tasks,
and report accuracy by hop count (table, CSV, plot) in one MLflow run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..ray_env import init_ray
from ..tracking import Tracker, git_tags
from ..config import TrackingConfig
from .config import DepthConfig
from .report import DepthReport, report_from_points


@dataclass
class DepthResult:
    report: DepthReport
    table_md: str
    plot_path: Path
    run_id: str | None
    tracking_uri: str
    seconds: float
    params: dict[str, int]


def evaluate_depth(model: str, root: Path, tracking_uri: str, loops: list[int], max_hops: int,
                   limit: int | None, cpus_per_task: float, run_name: str, looped: bool = True,
                   loops_per_hop: list[int] | None = None, exit_thresholds: list[float] | None = None,
                   exit_on: str = "all"):
    """lm-eval on pointer_k1..pointer_k<max_hops>: a looped model at `loops` and at loops = m x hops
    (m in loops_per_hop, default [1]), with the adaptive exit at each threshold (capped at the
    largest of `loops`); a baseline at its single loop. Returns the evaluation job's result."""
    from ..evaluation import LoopEvalConfig, run_loop_eval

    cfg = LoopEvalConfig(model=model, loops=list(loops) if looped else [1],
                           tasks=[f"pointer_k{k}" for k in range(1, max_hops + 1)], limit=limit,
                           cpus_per_task=cpus_per_task, run_root=str(root), tracking_uri=tracking_uri,
                           run_name=run_name, loops_per_hop=(loops_per_hop or [1]) if looped else [],
                           exit_thresholds=list(exit_thresholds or []) if looped else [], exit_on=exit_on,
                           bootstrap_iters=0)
    return run_loop_eval(cfg)


def run_depth_experiment(cfg: DepthConfig) -> DepthResult:
    from mythos import Mythos

    from ..train.trainer import run_pretrains

    t0 = time.perf_counter()
    root = Path(cfg.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    rdt_cfg, base_cfg = cfg.stage_configs()
    init_ray()
    runs = run_pretrains([rdt_cfg] + ([base_cfg] if base_cfg is not None else []))
    tracking = runs[0].tracking_uri
    rdt_eval = evaluate_depth(str(runs[0].export_dir), root, tracking, cfg.eval_loops, cfg.eval_max_hops,
                              cfg.eval_limit, cfg.eval_cpus_per_task, "depth-eval-rdt", loops_per_hop=cfg.eval_loops_per_hop,
                              exit_thresholds=cfg.eval_exit_thresholds, exit_on=cfg.eval_exit_on)
    base_eval = None
    if base_cfg is not None:
        base_eval = evaluate_depth(str(runs[1].export_dir), root, tracking, cfg.eval_loops, cfg.eval_max_hops,
                                   cfg.eval_limit, cfg.eval_cpus_per_task, "depth-eval-baseline", looped=False)
    report = report_from_points(rdt_eval.points, base_eval.points if base_eval else (),
                                trained_hops=rdt_cfg.data.max_hops, loops=cfg.eval_loops,
                                n_symbols=rdt_cfg.data.n_symbols, limit=cfg.eval_limit,
                                loops_per_hop=cfg.eval_loops_per_hop)
    md, csv_text = report.markdown(), report.csv()
    plot_path = report.plot(root / "depth_extrapolation.png")
    (root / "depth_extrapolation.md").write_text(md)
    (root / "depth_extrapolation.csv").write_text(csv_text)
    params = {"rdt": Mythos(rdt_cfg.model.build()).num_parameters()}
    if base_cfg is not None:
        params["baseline"] = Mythos(base_cfg.model.build()).num_parameters()

    tracker = Tracker(TrackingConfig(experiment=cfg.experiment, tracking_uri=tracking), root)
    tracker.start(run_name=cfg.name, tags={"mythos.job": "depth", "mythos.rdt_run": runs[0].mlflow_run_id or "",
                                          **git_tags(Path(__file__).resolve().parents[2])})
    tracker.log_params(cfg.to_dict())
    tracker.log_metrics({f"params_{k}": v for k, v in params.items()}, step=0)
    for (h, n), acc in report.grid.items():
        tracker.log_metrics({f"rdt_acc_hops_{h:02d}": acc}, step=n)
    for h, metrics in report.metrics_by_hops(prefix="rdt_").items():
        tracker.log_metrics(metrics, step=h)
    tracker.log_artifact(str(plot_path), artifact_path="plots")
    tracker.log_text(md, "results/depth_extrapolation.md")
    tracker.log_text(csv_text, "results/depth_extrapolation.csv")
    tracker.end()
    return DepthResult(report, md, plot_path, tracker.run_id, tracker.uri, time.perf_counter() - t0, params)
