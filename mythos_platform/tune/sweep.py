"""Ray Tune sweeps over the pretraining spine, tracked in MLflow, with the winner registered.

    result = run_sweep(load_sweep_config("jobs/configs/sweep-debug.yaml"))
    result.best, result.registration          # models:/mythos-rdt@champion

Each trial is a Tune function (`_trial`) that runs one full `run_pretrain` (a TorchTrainer,
Train V2): the workers report metrics at every evaluation step and a `TuneReportCallback`
forwards them to Tune, where ASHA stops the weak trials. The trial reports its final metrics
itself, after the trainer has exported the model, so a stop decision at the last step cannot
cut the export short.

MLflow: one parent run per sweep (experiment `cfg.experiment`) and one child run per trial
(`mlflow.parentRunId`), all in the store under the sweep root. The parent run gets the results
table and the plot; the best completed trial's exported model is registered under
`registry.model_name` and the alias moves only if it beats the current holder.

Resuming: re-running a sweep with the same name and root restores the Tune experiment
(unfinished and errored trials run again, each resuming from its Ray Train checkpoint) and
continues the same parent run.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray.tune.integration.ray_train import TuneReportCallback

from ..config import PretrainConfig
from ..ray_env import init_ray
from ..registry import Registration, register_model
from ..tracking import Tracker, git_tags
from .cleanup import STATE_API_TIMEOUT_S, Leftovers, leftovers, release_job_placement_groups
from .config import SweepConfig
from .progress import SweepProgress
from .results import metric_plot, table_columns, to_csv, to_markdown
from .space import Param

log = logging.getLogger("mythos.tune")

SWEEP_TAG = "mythos.sweep.name"
TRIAL_TAG = "mythos.sweep.trial_id"
STATUS_TAG = "mythos.sweep.status"


@dataclass
class SweepResult:
    name: str
    root: Path
    parent_run_id: str | None
    tracking_uri: str
    trials: list[dict[str, Any]]
    """One row per trial: trial_id, status (completed / early_stopped / error), the searched values
    under their dotted keys, step, metric (last), best_metric, time_s, mlflow_run_id, export_dir."""
    best: dict[str, Any] | None
    """The row of the best completed trial (the registered one)."""
    registration: Registration | None
    timings: dict[str, float] = field(default_factory=dict)
    """Wall seconds: ray_start, data, trials, results, register, total."""
    leftovers: Leftovers = field(default_factory=Leftovers)
    """What the sweep left on the cluster (after releasing `released`): should be empty."""
    released: list[str] = field(default_factory=list)
    """Placement groups of stopped trials that Ray did not remove and the sweep released."""


# ---------------------------------------------------------------------------------------
# Inside a trial
# ---------------------------------------------------------------------------------------
class _EvalReportCallback(TuneReportCallback):
    """Forwards the workers' evaluation reports to Tune, except the last step's.

    Reports without the metric (checkpoint-only steps before the first evaluation) would fail
    Tune's metric check; the final report is made by the trial itself once the model is exported.
    """

    def __init__(self, metric: str, final_step: int) -> None:
        super().__init__()
        self.metric = metric
        self.final_step = final_step

    def after_report(self, run_context, metrics, checkpoint) -> None:
        first = metrics[0] if metrics else {}
        if self.metric in first and first.get("step", 0) < self.final_step:
            super().after_report(run_context, metrics, checkpoint)


def _trial(values: dict[str, Any], *, sweep: dict[str, Any], datasets: dict | None = None,
           parent_run_id: str | None = None) -> None:
    """One Tune trial: a full pretraining run with the trial's values, reported through Tune."""
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    run_name = f"{sweep['name']}-{trial_id}"
    data = _apply(sweep["base"], values, run_name)
    pcfg = PretrainConfig.from_dict(data)
    tags = {TRIAL_TAG: trial_id, SWEEP_TAG: sweep["name"], "mythos.job": "sweep-trial",
            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    from ..train.trainer import run_pretrain

    res = run_pretrain(pcfg, datasets=datasets, tags=tags, report_evals=True,
                       callbacks=[_EvalReportCallback(sweep["metric"], pcfg.train.steps)])
    metrics = {k: v for k, v in res.metrics.items() if isinstance(v, (int, float))}
    tune.report({**metrics, "step": pcfg.train.steps, "completed": 1, "export_dir": str(res.export_dir),
                 "mlflow_run_id": res.mlflow_run_id or ""})


def _apply(base: dict[str, Any], values: dict[str, Any], run_name: str) -> dict[str, Any]:
    from .space import apply_params

    data = apply_params(base, values)
    data["run"]["name"] = run_name
    data["tracking"]["run_name"] = run_name
    return data


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------
def max_concurrency(cfg: SweepConfig, base: PretrainConfig) -> int:
    """Trials that fit the cluster at once: its CPUs (and GPUs) over what one trial holds."""
    res = ray.cluster_resources()
    sc = base.scaling
    per_trial = cfg.trial_cpus + sc.num_workers * sc.cpus_per_worker
    n = int(res.get("CPU", 1.0) / per_trial + 1e-9)
    if sc.use_gpu:
        n = min(n, int(res.get("GPU", 0.0) / sc.num_workers + 1e-9))
    n = max(1, n)
    if cfg.search.max_concurrent_trials is not None:
        n = min(n, cfg.search.max_concurrent_trials)
    return n


def _searcher(cfg: SweepConfig, concurrency: int):
    if cfg.search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.search.seed)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.search.seed, max_concurrent=concurrency)  # limits itself


def _scheduler(cfg: SweepConfig, base: PretrainConfig):
    if not cfg.asha.enabled:
        return None
    from ray.tune.schedulers import ASHAScheduler

    a = cfg.asha
    return ASHAScheduler(time_attr="step", max_t=a.max_t or base.train.steps, grace_period=a.grace_period,
                         reduction_factor=a.reduction_factor, brackets=a.brackets)


def _child_runs(tracker: Tracker, parent_id: str | None) -> dict[str, str]:
    """trial_id -> MLflow run id of the parent's child runs."""
    if parent_id is None:
        return {}
    runs = tracker.search_runs(f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=10000)
    return {r.data.tags[TRIAL_TAG]: r.info.run_id for r in runs if TRIAL_TAG in r.data.tags}


def _rows(grid, params: list[Param], metric: str, mode: str, children: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    searched = [p.key for p in params if p.kind != "fixed"]
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or Path(res.path).name
        history: list[tuple[int, float]] = []
        try:
            df = res.metrics_dataframe
            if df is not None and metric in df and "step" in df:
                history = [(int(s), float(v)) for s, v in zip(df["step"].tolist(), df[metric].tolist())
                           if v == v and s == s]
        except Exception:  # no result file
            pass
        best = (min if mode == "min" else max)(v for _, v in history) if history else float("nan")
        status = "error" if res.error else "completed" if m.get("completed") else "early_stopped"
        row = {"trial_id": trial_id, "status": status, "step": m.get("step"),
               "metric": float(m[metric]) if metric in m else float("nan"), "best_metric": best,
               "time_s": round(float(m.get("time_total_s", 0.0)), 1),
               "mlflow_run_id": m.get("mlflow_run_id") or children.get(trial_id),
               "export_dir": m.get("export_dir"), "error": str(res.error).splitlines()[0] if res.error else None,
               "history": history}
        for key in searched:
            row[key] = (res.config or {}).get(key)
        for p in params:
            if p.kind == "fixed":
                row[p.key] = p.args[0]
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def _finish_children(tracker: Tracker, rows: list[dict[str, Any]], metric: str) -> None:
    """Child runs of stopped or failed trials were killed mid-run: give them a final status."""
    for row in rows:
        run_id = row["mlflow_run_id"]
        if not run_id:
            continue
        child = Tracker(tracker.cfg, tracker.run_root, run_id=run_id)
        child.set_tags({STATUS_TAG: row["status"]})
        child.log_metrics({f"sweep/best_{metric}": row["best_metric"]}, step=int(row["step"] or 0))
        if row["status"] == "early_stopped":
            child.end("KILLED")
        elif row["status"] == "error":
            child.end("FAILED")


def _pick_best(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    done = [r for r in rows if r["status"] == "completed" and r["mlflow_run_id"] and math.isfinite(r["metric"])]
    if not done:
        return None
    return (min if mode == "min" else max)(done, key=lambda r: r["metric"])


def _register(cfg: SweepConfig, tracker: Tracker, best: dict[str, Any]) -> Registration | None:
    if not cfg.registry.enabled:
        return None
    try:
        previous = tracker.client.get_run(tracker.run_id).data.tags.get("mythos.sweep.registered_run")
    except Exception:
        previous = None
    reg_kw = dict(name=cfg.registry.model_name, alias=cfg.registry.alias)
    if previous == best["mlflow_run_id"]:  # a resumed, already finished sweep: do not register twice
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracker.uri, registry_uri=tracker.uri)
        mine = client.search_model_versions(f"name = '{reg_kw['name']}' and run_id = '{previous}'")
        champ = client.get_model_version_by_alias(reg_kw["name"], reg_kw["alias"])
        return Registration(reg_kw["name"], str(mine[0].version) if mine else "", reg_kw["alias"], False,
                            str(champ.version), float(champ.tags.get(cfg.search.metric, "nan")))
    reg = register_model(tracker.uri, best["mlflow_run_id"], best["metric"], metric_name=cfg.search.metric,
                         artifact_path="model", lower_is_better=cfg.search.mode == "min", **reg_kw)
    tracker.set_tags({"mythos.sweep.registered_run": best["mlflow_run_id"],
                      "mythos.sweep.registered_version": reg.version})
    return reg


TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"


class SweepInterrupted(KeyboardInterrupt):
    """The sweep was stopped by Ctrl-C before every trial ended (its Tune state is saved)."""


@contextmanager
def interruptible():
    """Ctrl-C (SIGINT) during `Tuner.fit`: remembered in the yielded Event and passed on to Tune
    as SIGUSR1, its graceful stop (trials stopped, state saved, fit returns); a second Ctrl-C
    stops at once. Tune's own SIGINT handler is switched off meanwhile: after it, a sweep could
    not tell an interrupted trial from one that ASHA stopped."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def on_sigint(signum, frame):
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        print("\n[mythos] Ctrl-C: stopping the sweep's trials and saving its state (Ctrl-C again to stop now)",
              flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous, env = signal.getsignal(signal.SIGINT), os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"
    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)
        if env is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = env


def run_sweep(cfg: SweepConfig) -> SweepResult:
    """Run (or resume) the sweep `cfg` on the current Ray cluster, starting a local one if needed."""
    clock = _Laps()
    params = cfg.params()
    base = cfg.pretrain_base()
    root = Path(cfg.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    init_ray()
    clock.lap("ray_start")

    tracker = Tracker(base.tracking, root)
    _open_parent_run(tracker, cfg, base, params)
    datasets = _shared_datasets(base, params)
    clock.lap("data")

    tuner = _tuner(cfg, base, params, root, datasets, tracker.run_id)
    try:
        with interruptible() as interrupted:
            grid = tuner.fit()
    except BaseException:
        tracker.end("KILLED")
        raise
    if interrupted.is_set():  # Tune stopped the trials, saved its state and returned
        _release_leftovers(tracker, interrupted=True)
        tracker.end("KILLED")
        # Tune marks the stopped trials TERMINATED too: unfinished is what did not report completion
        unfinished = sum(1 for r in grid if r.error is None and not (r.metrics or {}).get("completed"))
        raise SweepInterrupted(f"sweep '{cfg.name}' was interrupted with {unfinished} of "
                               f"{len(grid)} trials unfinished; nothing was registered. Its state is saved: run "
                               f"the same command again (same name and root, {root}) to resume the unfinished "
                               "trials")
    clock.lap("trials")

    rows = _rows(grid, params, cfg.search.metric, cfg.search.mode, _child_runs(tracker, tracker.run_id))
    _finish_children(tracker, rows, cfg.search.metric)
    best = _pick_best(rows, cfg.search.mode)
    _log_results(tracker, cfg, params, rows, best)
    clock.lap("results")

    registration = None
    if best is not None:
        tracker.set_tags({"mythos.sweep.best_trial": best["trial_id"], "mythos.sweep.best_run": best["mlflow_run_id"]})
        registration = _register(cfg, tracker, best)
    clock.lap("register")

    left, released = _release_leftovers(tracker)
    timings = clock.timings()
    tracker.log_metrics({f"time/{k}_s": v for k, v in timings.items()}, step=0)
    tracker.end("FINISHED" if best is not None else "FAILED")
    return SweepResult(cfg.name, root, tracker.run_id, tracker.uri, rows, best, registration, timings, left, released)


class _Laps:
    """Wall seconds of the sweep's phases, each since the previous one, and the total."""

    def __init__(self) -> None:
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = now - self.last
        self.last = now

    def timings(self) -> dict[str, float]:
        return {**self.laps, "total": time.perf_counter() - self.t0}


def _open_parent_run(tracker: Tracker, cfg: SweepConfig, base: PretrainConfig, params: list[Param]) -> None:
    """Continue the parent run of an earlier launch of this sweep, or start one with the space,
    the search settings and both configs."""
    parent = tracker.find_run(f"tags.`{SWEEP_TAG}` = '{cfg.name}' and tags.`mythos.job` = 'sweep'")
    if parent is not None:
        tracker.reopen(parent)
        return
    tracker.start(run_name=cfg.name, tags={SWEEP_TAG: cfg.name, "mythos.job": "sweep",
                                           **git_tags(Path(__file__).resolve().parents[2])})
    tracker.log_params({"space": {p.key: p.describe() for p in params}, "search": cfg.search.to_dict(),
                        "asha": cfg.asha.to_dict(), "trial_cpus": cfg.trial_cpus})
    tracker.log_dict(cfg.to_dict(), "config/sweep.json")
    tracker.log_dict(base.to_dict(), "config/base.json")


def _shared_datasets(base: PretrainConfig, params: list[Param]) -> dict[str, Any] | None:
    """One {"train", "val"} for all trials, unless the space searches data keys (then None: each
    trial builds its own)."""
    if any(p.key.startswith("data.") for p in params):
        return None
    from ..data.pipeline import build_datasets

    train_ds, val_ds = build_datasets(base.data, base.data.build_tokenizer())
    return {"train": train_ds, **({"val": val_ds} if val_ds is not None else {})}


def _tuner(cfg: SweepConfig, base: PretrainConfig, params: list[Param], root: Path, datasets: dict | None,
           parent_run_id: str | None):
    """The Tuner of a new sweep, or the restored one of an interrupted sweep with this name."""
    from ray import tune

    concurrency = max_concurrency(cfg, base)
    payload = {"name": cfg.name, "base": cfg.base_dict(), "metric": cfg.search.metric}
    trainable = tune.with_resources(
        tune.with_parameters(_trial, sweep=payload, datasets=datasets, parent_run_id=parent_run_id),
        {"CPU": cfg.trial_cpus})
    tune_root = root / "tune"
    exp_dir = tune_root / cfg.name
    if tune.Tuner.can_restore(str(exp_dir)):
        print(f"[mythos] resuming sweep '{cfg.name}' from {exp_dir}", flush=True)
        return tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_unfinished=True, resume_errored=True)
    print(f"[mythos] sweep '{cfg.name}': {cfg.num_trials()} trials ({cfg.search.algorithm}), up to {concurrency} "
          f"at once; MLflow parent run {parent_run_id}", flush=True)
    return tune.Tuner(
        trainable,
        param_space={p.key: p.to_tune(cfg.search.algorithm) for p in params},
        tune_config=tune.TuneConfig(metric=cfg.search.metric, mode=cfg.search.mode,
                                    search_alg=_searcher(cfg, concurrency), scheduler=_scheduler(cfg, base),
                                    num_samples=cfg.search.num_samples,
                                    max_concurrent_trials=concurrency if cfg.search.algorithm == "optuna" else None),
        run_config=tune.RunConfig(name=cfg.name, storage_path=str(tune_root), verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[SweepProgress(cfg.search.metric, cfg.num_trials(),
                                                           [p.key for p in params], cfg.name)]),
    )


def _log_results(tracker: Tracker, cfg: SweepConfig, params: list[Param], rows: list[dict[str, Any]],
                 best: dict[str, Any] | None) -> None:
    """The results table (CSV, Markdown), the metric plot and the trial counts on the parent run."""
    columns = table_columns([p.key for p in params])
    metric = cfg.search.metric
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "results.csv").write_text(to_csv(rows, columns))
        Path(tmp, "results.md").write_text(to_markdown(rows, columns, metric))
        tracker.log_artifact(Path(tmp, "results.csv"), "results")
        tracker.log_artifact(Path(tmp, "results.md"), "results")
        png = metric_plot(rows, cfg.plot.x, cfg.plot.group, metric, Path(tmp, f"{metric}_vs_loops.png"),
                          title=f"sweep {cfg.name}", searched=[p.key for p in params if p.kind != "fixed"])
        tracker.log_artifact(png, "plots")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "early_stopped", "error")}
    tracker.log_metrics({"trials": len(rows), **{f"trials_{k}": v for k, v in counts.items()},
                         **({f"best_{metric}": best["metric"]} if best else {})}, step=0)


INTERRUPTED_REQUEST_TIMEOUT_S = 3
"""Of each state API request after Ctrl-C: a dashboard that is gone fails in 2 s instead of 24 s."""


def _release_leftovers(tracker: Tracker, interrupted: bool = False) -> tuple[Leftovers, list[str]]:
    """What the trials left on the cluster, after releasing the placement groups of stopped trials
    whose clean-up Ray missed (returned as the second item). The check reads the cluster through the
    dashboard's state API; when that does not answer (an overloaded head), the sweep is not failed
    for it: a warning says so. After Ctrl-C every trial has stopped, so the job's placement groups
    are released at once instead of after a wait for Ray's own clean-up (the user is waiting)."""
    released: list[str] = []
    # after Ctrl-C the user is waiting, and a local cluster's dashboard may be gone with the signal
    wait_s, request_s = (3.0, INTERRUPTED_REQUEST_TIMEOUT_S) if interrupted else (10.0, STATE_API_TIMEOUT_S)
    try:
        if interrupted:
            released = release_job_placement_groups(request_timeout_s=request_s)
        left = leftovers(timeout_s=wait_s, request_timeout_s=request_s)
        if left.placement_groups:
            released += release_job_placement_groups(request_timeout_s=request_s)
            log.warning("released %d placement groups that stopped trials left behind: %s", len(released),
                        released)
            left = leftovers(timeout_s=wait_s, request_timeout_s=request_s)
    except Exception as exc:  # the state API timed out or is unavailable
        # after Ctrl-C a local cluster's dashboard has stopped with the signal, and the cluster ends
        # with this job: expected, not worth a warning (on a running cluster the check answers)
        (log.info if interrupted else log.warning)(
            "could not check what the trials left on the cluster (Ray's state API: %s)", exc)
        return Leftovers(), released
    if left:
        log.warning("the sweep left placement groups %s and actors %s on the cluster", left.placement_groups,
                    left.actors)
    tracker.set_tags({"mythos.sweep.released_placement_groups": len(released)})
    return left, released


def print_sweep_summary(res: SweepResult, metric: str = "val_loss") -> None:
    print(f"\n[mythos] sweep '{res.name}' done: {len(res.trials)} trials", flush=True)
    for r in res.trials:
        print(f"  {r['trial_id']}: {r['status']:<13} step {r['step']}  {metric} {r['metric']:.4f}")
    if res.best:
        print(f"  best trial     : {res.best['trial_id']} ({metric} {res.best['metric']:.4f})")
    if res.registration:
        reg = res.registration
        moved = "moved to it" if reg.alias_moved else f"stays on v{reg.champion_version} ({reg.champion_metric:.4f})"
        print(f"  registered     : models:/{reg.name}/{reg.version}; alias @{reg.alias} {moved}")
        print(f"  resolve with   : models:/{reg.name}@{reg.alias}  (tracking/registry URI {res.tracking_uri})")
    print(f"  MLflow parent  : {res.parent_run_id}")
    print("  wall time      : " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()))
