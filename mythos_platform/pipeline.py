"""The whole life cycle as one job, on the reasoning model: pretrain (the looped model and its
parameter-matched baseline, side by side) -> sweep loop depth x LoRA rank -> evaluate the champion
with lm-eval at several loop counts on 1..16 hops -> deploy it -> ask the served model one deep
question at two loop counts. Every stage is the same code its own job runs; all stages share one
run root, so one MLflow store holds their runs and the Model Registry.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field

from .config import PretrainConfig, Section
from .registry import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, register_model, version_params
from .serve.config import ServeConfig
from .tune.config import SweepConfig



def _from_file(cls, path: str):
    return lambda: cls.from_dict({"extends": path})


class PipelineConfig(Section):
    """The stages' configs, each in its own job's shape (usually `extends:` that job's YAML and
    changes a few values), and what the pipeline compares, evaluates and asks. The pipeline sets
    every stage's run root to `root`, the run names, and the served model (the champion)."""

    root: str = "./runs/pipeline"
    """Run root of every stage: checkpoints, exports, the MLflow store and registry."""
    pretrain: PretrainConfig = Field(default_factory=_from_file(PretrainConfig, "jobs/configs/reasoning.yaml"))
    """The looped model's pretraining."""
    baseline: PretrainConfig | None = Field(
        default_factory=_from_file(PretrainConfig, "jobs/configs/reasoning-baseline.yaml"))
    """The parameter-matched non-looped baseline, trained beside the looped model (null: none)."""
    sweep: SweepConfig | None = Field(default_factory=_from_file(SweepConfig, "jobs/configs/sweep-reasoning.yaml"))
    """The sweep; its base starts from the pretrained model (base.train.init_from is set to its
    export). null: no sweep."""
    metric: str = "val_acc"
    """What the pretrained model and the sweep's trials are compared on for the registry."""
    mode: Literal["min", "max"] = "max"
    eval_loops: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    eval_max_hops: int = Field(16, ge=1, le=16)
    """lm-eval tasks pointer_k1..pointer_k<eval_max_hops>; every task is also scored at loops = hops."""
    eval_limit: int | None = Field(100, ge=1)
    """Problems per hop count."""
    eval_cpus_per_task: float = Field(0.5, gt=0)
    serve: ServeConfig = Field(default_factory=_from_file(ServeConfig, "jobs/configs/serve-debug.yaml"))
    """The Serve application; it serves models:/<registry name>@champion."""
    question_hops: int = Field(8, ge=1, le=16)
    """The demo's last lines: one held-out question of this many hops ..."""
    question_loops: list[int] = Field(default_factory=lambda: [8, 2], min_length=1)
    """... asked of the served model at each of these loop counts."""
    keep_serving: bool = True
    """Keep the endpoint up (until Ctrl-C) after the summary; false ends the job with it."""

    def check(self) -> None:
        self.need(all(n >= 1 for n in self.eval_loops), "eval_loops", "must be ints >= 1", self.eval_loops)
        self.need(all(n >= 1 for n in self.question_loops), "question_loops", "must be ints >= 1",
                  self.question_loops)
        search = self.sweep.search if self.sweep is not None else None
        self.need(search is None or (search.metric, search.mode) == (self.metric, self.mode), "metric",
                  f"the sweep ranks on {search and search.metric} ({search and search.mode}) but the pipeline "
                  f"registers the pretrained model on {self.metric} ({self.mode}): make them agree")

    def preflight(self) -> None:
        """The checks against this machine (see mythos_platform/preflight.py), before any Ray work."""
        from .preflight import writable_folder

        writable_folder(self.root, "root")
        pre, base, swp, _ = self.stage_configs()
        pre.preflight("pretrain.")
        if base is not None:
            base.preflight("baseline.")
        if swp is not None:
            swp.pretrain_base().preflight("sweep.base.")

    def stage_configs(self) -> tuple[PretrainConfig, PretrainConfig | None, SweepConfig | None, ServeConfig]:
        """Every stage's config under this root, with its run name; the server serves the champion."""
        root = str(Path(self.root).resolve())
        common = {"run.root": root, "tracking.experiment": "mythos-pretrain"}
        pre = self.pretrain.updated({**common, "run.name": "pipeline-pretrain"})
        base = self.baseline.updated({**common, "run.name": "pipeline-baseline"}) if self.baseline else None
        swp = self.sweep.updated({"root": root}) if self.sweep is not None else None
        srv = self.serve.updated({"model.source": f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"})
        return pre, base, swp, srv


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


def question(hops: int) -> dict[str, Any]:
    """A held-out question of the lm-eval task pointer_k<hops>: the first whose answer after fewer
    loops (any j < hops) differs from the right one, so a shallow answer shows as wrong. Chosen
    from the data alone, never from what a model answers."""
    from evals.task_data import task_rows

    rows = task_rows(f"pointer_k{hops}")
    for row in rows:
        chain = row["chain"]
        if all(chain[j] != chain[hops] for j in range(hops)):
            return row
    return rows[0]


def run_pipeline(cfg: PipelineConfig) -> PipelineSummary:
    """Run every stage in turn on the current Ray cluster (a local one is started if needed)."""
    run = PipelineRun(cfg)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # one Ctrl-C: KeyboardInterrupt, in any stage
    try:
        pre, base_export = run.pretrain()
        sweep_run = run.sweep(pre.export_dir) if run.sweep_cfg is not None else None
        eval_run, report, plot_path = run.evaluate(base_export)
        url = run.deploy()
        model_name, q, answers = run.ask(url)
    except KeyboardInterrupt as exc:
        raise KeyboardInterrupt(run.stopped(exc)) from None
    return PipelineSummary(run.root, run.uri, run.stages, pre.mlflow_run_id, sweep_run, eval_run, run.champion,
                           report.markdown(), plot_path, report.deepest_solved(), report.trained_hops, url,
                           model_name, q, answers)


class PipelineRun:
    """The stages of one pipeline run; each prints its banner and records its wall time."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.root = Path(cfg.root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.root}/mlflow.db"
        self.pre_cfg, self.base_cfg, self.sweep_cfg, serve_cfg = cfg.stage_configs()
        self.serve_cfg = serve_cfg.updated({"model.tracking_uri": self.uri})
        self.stages: dict[str, float] = {}
        self.champion: dict[str, Any] = {}
        self.current = "0/0 (starting)"
        self.deployed = False
        self._number, self._total = 0, 5 if self.sweep_cfg is not None else 4

    @contextmanager
    def stage(self, key: str, title: str):
        self._number += 1
        self.current = f"{self._number}/{self._total} ({title})"
        from .console import finish

        finish()  # the last stage's bars end where they stand
        print(f"\n[mythos pipeline] ===== {self._number}/{self._total} {title} =====", flush=True)
        t = time.perf_counter()
        yield
        self.stages[key] = time.perf_counter() - t

    def pretrain(self):
        """Train the looped model (and the baseline beside it); register the looped one."""
        from .ray_env import init_ray
        from .train.trainer import run_pretrains

        cfg = self.cfg
        with self.stage("pretrain", "pretrain the looped model" + (" and its baseline, side by side"
                                                                   if self.base_cfg else "")):
            init_ray()
            runs = run_pretrains([self.pre_cfg] + ([self.base_cfg] if self.base_cfg is not None else []))
            pre = runs[0]
            metric = pre.metrics.get(cfg.metric)
            self.champion["pretrained"] = metric
            if pre.mlflow_run_id and metric is not None:
                reg = register_model(self.uri, pre.mlflow_run_id, metric=float(metric), metric_name=cfg.metric,
                                     lower_is_better=cfg.mode == "min")
                self.champion.update(version=reg.champion_version, pretrained_version=reg.version)
        return pre, (runs[1].export_dir if len(runs) > 1 else None)

    def sweep(self, pretrained: Path) -> str | None:
        """The sweep, starting from the pretrained model; its best trial may become the champion."""
        from .tune.sweep import run_sweep

        with self.stage("sweep", "sweep loop depth x LoRA rank, starting from the pretrained model"):
            sres = run_sweep(self.sweep_cfg.updated({"base.train.init_from": str(pretrained)}))
            if sres.best:
                self.champion.update(sweep_best=sres.best["metric"], sweep_trial=sres.best["trial_id"])
            if sres.registration:
                self.champion.update(version=sres.registration.champion_version,
                                     sweep_version=sres.registration.version)
        return sres.parent_run_id

    def evaluate(self, baseline_export: Path | None):
        """lm-eval of the champion at the loop counts (and the baseline), the depth table and plot."""
        from .depth.experiment import evaluate_depth
        from .depth.report import report_from_points

        cfg, root, uri = self.cfg, self.root, self.uri
        with self.stage("evaluate", "evaluate the champion (and the baseline) with lm-eval at several loop counts"):
            model_uri = f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"
            rdt = evaluate_depth(model_uri, root, uri, cfg.eval_loops, cfg.eval_max_hops, cfg.eval_limit,
                                 cfg.eval_cpus_per_task, "pipeline-eval")
            base = None
            if baseline_export is not None:
                base = evaluate_depth(str(baseline_export), root, uri, [1], cfg.eval_max_hops, cfg.eval_limit,
                                      cfg.eval_cpus_per_task, "pipeline-eval-baseline", looped=False)
            hops = self.champion_trained_hops()
            report = report_from_points(rdt.points, base.points if base else (), trained_hops=hops,
                                        loops=cfg.eval_loops, n_symbols=self.pre_cfg.data.n_symbols,
                                        limit=cfg.eval_limit)
            plot_path = report.plot(root / "depth_extrapolation.png",
                                    title=f"champion {model_uri}: trained on <= {hops} hops")
            (root / "depth_extrapolation.md").write_text(report.markdown())
            if not rdt.reused or not _report_logged(uri, root, rdt.run_id):
                _log_report(uri, root, rdt.run_id, report, plot_path)
        return rdt.run_id, report, plot_path

    def champion_trained_hops(self) -> int:
        """The deepest chains the champion was trained on: the pretraining's, and when the champion is
        a sweep trial (fine-tuned from the pretrained model), the deeper of those and its own run's
        `data.max_hops` (a sweep may train on deeper chains, or search over them)."""
        hops = self.pre_cfg.data.max_hops
        c = self.champion
        if c.get("version") is not None and c.get("version") == c.get("sweep_version"):
            trial = version_params(self.uri, str(c["version"])).get("data.max_hops")
            if trial is not None and trial.isdigit():
                hops = max(hops, int(trial))
        return hops

    def deploy(self) -> str:
        from .serve.deploy import deploy

        with self.stage("deploy", "deploy the champion"):
            self._check_training_is_gone()
            self.deployed = True
            return deploy(self.serve_cfg)

    @staticmethod
    def _check_training_is_gone() -> None:
        """The endpoint must not share the cluster with the training stages' actors (Ray Train's
        controller and workers, Ray Data's coordinators: about 1 GB on the demo's machine). They end
        when their runs end; this waits for that (briefly) and says so if some did not."""
        from .tune.cleanup import leftovers

        try:
            left = leftovers(timeout_s=20.0)
        except Exception as exc:  # noqa: BLE001 - the state API not answering must not stop the demo
            print(f"[mythos pipeline] (could not list the cluster's actors: {exc})", flush=True)
            return
        if left:
            print(f"[mythos pipeline] warning: training left {len(left.actors)} actors and "
                  f"{len(left.placement_groups)} placement groups alive: {', '.join(left.actors[:6])}", flush=True)

    def stopped(self, exc: KeyboardInterrupt) -> str:
        """After Ctrl-C: the endpoint (if this run deployed it) deleted; what stopped and how to go on."""
        if self.deployed:
            stop_serving(self.serve_cfg.deployment.app_name)
        why = f": {exc}" if str(exc) else ""
        return (f"the pipeline stopped in stage {self.current}{why}. What finished is kept under {self.root}; "
                "the same command goes on from there (training resumes from its checkpoints, a finished "
                "sweep is not run again)")

    def ask(self, url: str):
        """The deep question, asked of the served model at each of question_loops."""
        cfg = self.cfg
        with self.stage("request", f"ask the served model a {cfg.question_hops}-hop question"):
            headers = {}
            key_env = self.serve_cfg.http.api_key_env
            if key_env and os.environ.get(key_env):
                headers["Authorization"] = f"Bearer {os.environ[key_env]}"
            model_name = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
            q = question(cfg.question_hops)
            answers = []
            for n in cfg.question_loops:
                body = {"model": model_name, "prompt": q["prompt"], "max_tokens": 1, "temperature": 0.0,
                        "n_loops": n}
                resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
                resp.raise_for_status()
                c = resp.json()
                text = c["choices"][0]["text"]
                answers.append(Answer(n, text, c.get("mythos", {}).get("loops_used"),
                                      text.strip() == q["answer"].strip()))
        return model_name, q, answers


def stop_serving(app_name: str) -> None:
    """Delete the Serve application `app_name` (the pipeline's endpoint), if Serve still runs."""
    from ray import serve

    try:
        serve.delete(app_name)
    except Exception as exc:  # Serve or the cluster already gone: nothing left to stop
        print(f"[mythos pipeline] (the endpoint could not be deleted: {exc})", flush=True)


def _log_report(uri: str, root: Path, run_id: str | None, report, plot_path: Path) -> None:
    """The depth table, its metrics by hop count and the plot into the evaluation's MLflow run (a
    tracking outage is warned about by the Tracker; the files stay under the run root)."""
    if not run_id:
        return
    tracker = _eval_run(uri, root, run_id)
    tracker.log_artifact(plot_path, "results")
    tracker.log_text(report.markdown(), "results/depth_extrapolation.md")
    for h, metrics in report.metrics_by_hops().items():
        tracker.log_metrics(metrics, step=h)
    tracker.set_tags({REPORT_TAG: "logged"})


REPORT_TAG = "mythos.depth_report"
"""Set on the evaluation's run once the depth report is in it: a relaunch that reuses the finished
evaluation (`run_loop_eval`'s `finished_earlier`) logs the report again only if it is missing."""


def _report_logged(uri: str, root: Path, run_id: str | None) -> bool:
    return bool(run_id) and _eval_run(uri, root, run_id).tag(REPORT_TAG) == "logged"


def _eval_run(uri: str, root: Path, run_id: str):
    """A Tracker on the evaluation's MLflow run `run_id`."""
    from .config import TrackingConfig
    from .tracking import Tracker

    return Tracker(TrackingConfig(experiment="mythos-eval", tracking_uri=uri), root, run_id=run_id)


def print_summary(s: PipelineSummary, metric: str = "val_acc", keep_serving: bool = False) -> None:
    """The summary; its last lines are the served model's answers to the deep question."""
    print("\n[mythos pipeline] ===== summary =====")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s.stages.items()) +
          f" (total {sum(s.stages.values()) / 60:.1f} min)")
    print(f"MLflow store: {s.tracking_uri}")
    from .console import routed_log

    if routed_log() is not None:
        print(f"library output (Ray, Tune, MLflow): {routed_log()}")
    print(f"  pretrain run {s.pretrain_run_id} | sweep parent run {s.sweep_run_id} | evaluation run {s.eval_run_id}")
    c = s.champion
    if c:
        def version(key: str) -> str:
            return f", version {c[key]}" if c.get(key) is not None else ""

        parts = [f"pretrained model ({version('pretrained_version')[2:] or 'not registered'}) {metric} "
                 f"{_num(c.get('pretrained'))}"]
        if "sweep_best" in c:
            parts.append(f"best sweep trial ({c.get('sweep_trial')}{version('sweep_version')}) {metric} "
                         f"{_num(c.get('sweep_best'))}")
        winner = "the sweep's best trial" if c.get("version") and c.get("version") == c.get("sweep_version") \
            else "the pretrained model"
        print(f"  registry compared {', '.join(parts)} -> champion: {winner} "
              f"(models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS} = version {c.get('version')})")
    print(f"\naccuracy by problem depth (lm-eval, held-out problems; trained on <= {s.trained_hops} hops):\n")
    print(s.depth_table)
    print(f"loops = hops solves every depth up to {s.deepest_solved} hops at >= 0.95 "
          f"({s.deepest_solved / max(s.trained_hops, 1):.3g}x the trained depth)")
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
