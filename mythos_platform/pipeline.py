"""The whole life cycle as one job, on the reasoning model: pretrain (the looped model and its
parameter-matched baseline, side by side) -> sweep loop depth x LoRA rank -> evaluate the champion
with lm-eval at several loop counts on 1..16 hops -> deploy it -> ask the served model one deep
question at two loop counts. Every stage is the same code its own job runs; all stages share one
run root, so one MLflow store holds their runs and the Model Registry.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .config import Section, _join
from .registry import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, register_model

STAGES = 5


@dataclass
class PipelineConfig(Section):
    """Which configs each stage starts from, and what the pipeline changes in them."""

    root: str = "./runs/pipeline"
    """Run root of every stage: checkpoints, exports, the MLflow store and registry."""
    pretrain_config: str = "jobs/configs/reasoning.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    baseline_config: str | None = "jobs/configs/reasoning-baseline.yaml"
    """The parameter-matched non-looped baseline, trained beside the looped model (null: none)."""
    baseline_overrides: list[str] = field(default_factory=list)
    sweep: bool = True
    sweep_config: str = "jobs/configs/sweep-reasoning.yaml"
    sweep_overrides: list[str] = field(default_factory=list)
    """The sweep's base starts from the pretrained model (base.train.init_from is set to its export)."""
    metric: str = "val_acc"
    """What the pretrained model and the sweep's trials are compared on for the registry."""
    mode: str = "max"
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    eval_max_hops: int = 16
    """lm-eval tasks pointer_k1..pointer_k<eval_max_hops>; every task is also scored at loops = hops."""
    eval_limit: int | None = 100
    """Problems per hop count."""
    eval_cpus_per_task: float = 0.5
    serve_config: str = "jobs/configs/serve-debug.yaml"
    serve_overrides: list[str] = field(default_factory=list)
    question_hops: int = 8
    """The demo's last lines: one held-out question of this many hops ..."""
    question_loops: list[int] = field(default_factory=lambda: [8, 2])
    """... asked of the served model at each of these loop counts."""
    keep_serving: bool = True
    """Keep the endpoint up (until Ctrl-C) after the summary; false ends the job with it."""

    def check(self, path: str) -> None:
        for name in ("pretrain_config", "baseline_config", "sweep_config", "serve_config"):
            value = getattr(self, name)
            self.need(value is None or Path(value).is_file(), _join(path, name), "config file does not exist", value)
        self.need(bool(self.eval_loops) and all(n >= 1 for n in self.eval_loops), _join(path, "eval_loops"),
                  "must be a non-empty list of ints >= 1", self.eval_loops)
        self.need(1 <= self.eval_max_hops <= 16, _join(path, "eval_max_hops"), "must be in 1..16", self.eval_max_hops)
        self.need(self.eval_limit is None or self.eval_limit >= 1, _join(path, "eval_limit"), "must be >= 1 or null",
                  self.eval_limit)
        self.need(1 <= self.question_hops <= 16, _join(path, "question_hops"), "must be in 1..16",
                  self.question_hops)
        self.need(bool(self.question_loops) and all(n >= 1 for n in self.question_loops),
                  _join(path, "question_loops"), "must be a non-empty list of ints >= 1", self.question_loops)
        self.need(self.mode in ("min", "max"), _join(path, "mode"), "allowed: 'min', 'max'", self.mode)


@dataclass
class Answer:
    n_loops: int
    text: str
    loops_used: int | None
    correct: bool


@dataclass
class PipelineSummary:
    root: Path
    tracking_uri: str
    stages: dict[str, float]
    """Wall seconds per stage."""
    pretrain_run_id: str | None
    sweep_run_id: str | None
    eval_run_id: str | None
    champion: dict[str, Any]
    """What the registry compared and what won."""
    depth_table: str
    plot_path: Path | None
    deepest_solved: int
    trained_hops: int
    url: str
    model_name: str
    question: dict[str, Any]
    answers: list[Answer]


def _stage_configs(cfg: PipelineConfig, root: Path):
    """Validate every stage's config before any Ray work (a bad key fails here, naming it)."""
    from .config import PretrainConfig, load_config
    from .serve.config import ServeConfig
    from .tune.config import load_sweep_config

    pre = load_config(cfg.pretrain_config, [*cfg.pretrain_overrides, f"run.root={root}", "run.name=pipeline-pretrain",
                                            "tracking.experiment=mythos-pretrain"], cls=PretrainConfig)
    base = None
    if cfg.baseline_config:
        base = load_config(cfg.baseline_config, [*cfg.baseline_overrides, f"run.root={root}",
                                                 "run.name=pipeline-baseline", "tracking.experiment=mythos-pretrain"],
                           cls=PretrainConfig)
    swp = None
    if cfg.sweep:
        swp = load_sweep_config(cfg.sweep_config, [*cfg.sweep_overrides, f"root={root}"])
        if swp.search.metric != cfg.metric or swp.search.mode != cfg.mode:
            from .config import ConfigError

            raise ConfigError("metric", f"the sweep ranks on {swp.search.metric} ({swp.search.mode}) but the pipeline "
                                        f"registers the pretrained model on {cfg.metric} ({cfg.mode}): make them agree")
    srv = load_config(cfg.serve_config, [*cfg.serve_overrides, f"model.source=models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"],
                      cls=ServeConfig)
    return pre, base, swp, srv


def question(hops: int) -> dict[str, Any]:
    """A held-out question of the lm-eval task pointer_k<hops>: the first whose answer after fewer
    loops (any j < hops) differs from the right one, so a shallow answer shows as wrong. Chosen
    from the data alone, never from what a model answers."""
    from evals.loop_sweep import task_rows

    rows = task_rows(f"pointer_k{hops}")
    for row in rows:
        chain = row["chain"]
        if all(chain[j] != chain[hops] for j in range(hops)):
            return row
    return rows[0]


def run_pipeline(cfg: PipelineConfig) -> PipelineSummary:
    from .depth.experiment import evaluate_depth
    from .depth.report import report_from_points
    from .ray_env import init_ray
    from .serve.deploy import deploy
    from .train.trainer import run_pretrains
    from .tune.sweep import run_sweep

    root = Path(cfg.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root}/mlflow.db"
    pre_cfg, base_cfg, sweep_cfg, serve_cfg = _stage_configs(cfg, root)
    serve_cfg = serve_cfg.replace(model={**serve_cfg.model.to_dict(), "tracking_uri": uri})
    stages: dict[str, float] = {}

    def stage(i: int, name: str) -> float:
        print(f"\n[mythos pipeline] ===== {i}/{STAGES} {name} =====", flush=True)
        return time.perf_counter()

    t = stage(1, "pretrain the looped model" + (" and its baseline, side by side" if base_cfg else ""))
    init_ray()
    runs = run_pretrains([pre_cfg] + ([base_cfg] if base_cfg is not None else []))
    pre = runs[0]
    pre_metric = pre.metrics.get(cfg.metric)
    champion: dict[str, Any] = {"pretrained": pre_metric}
    if pre.mlflow_run_id and pre_metric is not None:
        reg = register_model(uri, pre.mlflow_run_id, metric=float(pre_metric), metric_name=cfg.metric,
                             lower_is_better=cfg.mode == "min")
        champion.update(version=reg.champion_version, pretrained_version=reg.version)
    stages["pretrain"] = time.perf_counter() - t

    sweep_run = None
    if sweep_cfg is not None:
        t = stage(2, "sweep loop depth x LoRA rank, starting from the pretrained model")
        base = sweep_cfg.base_dict()
        base.setdefault("train", {})["init_from"] = str(pre.export_dir)
        sres = run_sweep(sweep_cfg.replace(base=base))
        sweep_run = sres.parent_run_id
        if sres.best:
            champion["sweep_best"] = sres.best["metric"]
            champion["sweep_trial"] = sres.best["trial_id"]
        if sres.registration:
            champion.update(version=sres.registration.champion_version, sweep_version=sres.registration.version)
        stages["sweep"] = time.perf_counter() - t

    t = stage(3, "evaluate the champion (and the baseline) with lm-eval at several loop counts")
    model_uri = f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"
    rdt_eval = evaluate_depth(model_uri, root, uri, cfg.eval_loops, cfg.eval_max_hops, cfg.eval_limit,
                              cfg.eval_cpus_per_task, "pipeline-eval")
    base_eval = None
    if base_cfg is not None:
        base_eval = evaluate_depth(str(runs[1].export_dir), root, uri, [1], cfg.eval_max_hops, cfg.eval_limit,
                                   cfg.eval_cpus_per_task, "pipeline-eval-baseline", looped=False)
    report = report_from_points(rdt_eval.points, base_eval.points if base_eval else (),
                                trained_hops=pre_cfg.data.max_hops, loops=cfg.eval_loops,
                                n_symbols=pre_cfg.data.n_symbols, limit=cfg.eval_limit)
    plot_path = report.plot(root / "depth_extrapolation.png",
                            title=f"champion {model_uri}: trained on <= {pre_cfg.data.max_hops} hops")
    (root / "depth_extrapolation.md").write_text(report.markdown())
    _log_report(uri, root, rdt_eval.run_id, report, plot_path)
    stages["evaluate"] = time.perf_counter() - t

    t = stage(4, "deploy the champion")
    url = deploy(serve_cfg)
    stages["deploy"] = time.perf_counter() - t

    t = stage(5, f"ask the served model a {cfg.question_hops}-hop question")
    headers = {}
    key_env = serve_cfg.http.api_key_env
    if key_env and os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    model_name = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    q = question(cfg.question_hops)
    answers = []
    for n in cfg.question_loops:
        body = {"model": model_name, "prompt": q["prompt"], "max_tokens": 1, "temperature": 0.0, "n_loops": n}
        resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
        resp.raise_for_status()
        c = resp.json()
        text = c["choices"][0]["text"]
        answers.append(Answer(n, text, c.get("mythos", {}).get("loops_used"), text.strip() == q["answer"].strip()))
    stages["request"] = time.perf_counter() - t
    return PipelineSummary(root, uri, stages, pre.mlflow_run_id, sweep_run, rdt_eval.run_id, champion,
                           report.markdown(), plot_path, report.deepest_solved(), pre_cfg.data.max_hops, url,
                           model_name, q, answers)


def _log_report(uri: str, root: Path, run_id: str | None, report, plot_path: Path) -> None:
    """The depth table, its metrics by hop count and the plot into the evaluation's MLflow run (a
    tracking outage is warned about by the Tracker; the files stay under the run root)."""
    from .config import TrackingConfig
    from .tracking import Tracker

    if not run_id:
        return
    tracker = Tracker(TrackingConfig(experiment="mythos-eval", tracking_uri=uri), root, run_id=run_id)
    tracker.log_artifact(plot_path, "results")
    tracker.log_text(report.markdown(), "results/depth_extrapolation.md")
    for h, metrics in report.metrics_by_hops().items():
        tracker.log_metrics(metrics, step=h)


def print_summary(s: PipelineSummary, metric: str = "val_acc", keep_serving: bool = False) -> None:
    """The summary; its last lines are the served model's answers to the deep question."""
    print("\n[mythos pipeline] ===== summary =====")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s.stages.items()) +
          f" (total {sum(s.stages.values()) / 60:.1f} min)")
    print(f"MLflow store: {s.tracking_uri}")
    print(f"  pretrain run {s.pretrain_run_id} | sweep parent run {s.sweep_run_id} | evaluation run {s.eval_run_id}")
    c = s.champion
    if c:
        parts = [f"pretrained model {metric} {_num(c.get('pretrained'))}"]
        if "sweep_best" in c:
            parts.append(f"best sweep trial ({c.get('sweep_trial')}) {metric} {_num(c.get('sweep_best'))}")
        winner = "the sweep's best trial" if c.get("version") and c.get("version") == c.get("sweep_version") \
            else "the pretrained model"
        print(f"  registry compared {', '.join(parts)} -> champion: {winner} "
              f"(models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS} = version {c.get('version')})")
    print(f"\naccuracy by problem depth (lm-eval, held-out problems; trained on <= {s.trained_hops} hops):\n")
    print(s.depth_table)
    print(f"loops = hops solves every depth up to {s.deepest_solved} hops at >= 0.95 "
          f"({s.deepest_solved / max(s.trained_hops, 1):.0f}x the trained depth)")
    if s.plot_path:
        print(f"plot: {s.plot_path}")
    if s.tracking_uri.startswith("sqlite:"):
        print(f"\nopen MLflow:    mlflow ui --backend-store-uri {s.tracking_uri} --host 127.0.0.1 --port 5000")
    prompt = s.question["prompt"]
    body = json.dumps({"model": s.model_name, "prompt": prompt, "max_tokens": 1, "n_loops": s.question["hops"]})
    print(f"query the API:  curl {s.url}/v1/completions -H 'Content-Type: application/json' -d '{body}'")
    if keep_serving:
        print("\nThe endpoint stays up while this job runs: press Ctrl-C (or `ray job stop <id>`) to stop it.")
    print(f"\nthe served model, asked a {s.question['hops']}-hop question (held out; the answer is "
          f"{s.question['answer'].strip()!r}):")
    print(f"  {prompt}")
    for a in s.answers:
        verdict = "right" if a.correct else "wrong"
        print(f"  n_loops={a.n_loops:<3d} -> {a.text.strip()!r}  ({verdict})")


def _num(v: Any) -> str:
    return "—" if v is None else f"{float(v):.3f}"
