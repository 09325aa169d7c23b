"""`run_loop_eval`: resolve model and tasks (failing early, in one line), fan out one Ray task per
loop setting, stream the points back, log them into one MLflow run and write the results."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from evals.catalog import explain, resolve_tasks
from evals.task_data import task_hops

from ..config import TrackingConfig
from ..tracking import Tracker
from .config import LoopEvalConfig
from .points import EvalPoint, evaluate_points
from .report import adaptive_table, describe_point, loops_figure, loops_table, point_metrics, points_csv, \
    results_markdown

__all__ = ["LoopEvalResult", "QUIET_ENV", "Setting", "plan_settings", "run_loop_eval"]

QUIET_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "DISABLE_MULTIPROC": "1"}
RESULT_FILES = ("results.md", "results.csv", "results.json", "accuracy_vs_loops.png")

Setting = tuple[int, float | None]
"""(n_loops, exit threshold or None): one Ray task scores all its tasks at this setting."""


@dataclass
class LoopEvalResult:
    points: list[EvalPoint]
    failures: list[dict[str, Any]]
    table_md: str
    csv_text: str
    out_dir: Path
    plot_path: Path | None
    model_dir: Path
    run_id: str | None
    tracking_uri: str | None
    reused: bool = False
    """True when an earlier launch finished this very evaluation (`finished_earlier`): nothing ran."""


def plan_settings(cfg: LoopEvalConfig, leaves: Sequence[str]) -> list[tuple[Setting, list[str]]]:
    """The loop settings and their tasks: every loop count, loops = m x hops for each task of one
    hop count, every exit threshold at the cap; adaptive last, the most loops first."""
    by_setting: dict[Setting, list[str]] = {}
    for n in cfg.loops:
        by_setting.setdefault((n, None), []).extend(leaves)
    for m in cfg.loops_per_hop:
        for task in leaves:
            k = task_hops(task)
            if k is not None and task not in by_setting.get((m * k, None), []):
                by_setting.setdefault((m * k, None), []).append(task)
    for thr in cfg.exit_thresholds:
        by_setting[(cfg.exit_cap, thr)] = list(leaves)
    return sorted(by_setting.items(), key=lambda kv: (kv[0][1] is not None, -kv[0][0]))


def _tracking(cfg: LoopEvalConfig) -> TrackingConfig:
    return TrackingConfig(experiment=cfg.experiment, tracking_uri=cfg.tracking_uri, run_name=cfg.run_name,
                          enabled=cfg.track)


def _resolve_model(cfg: LoopEvalConfig, out_dir: Path) -> Path:
    """The model folder the workers load: a models:/ URI is downloaded into the run folder."""
    from mythos.model_ref import MLFLOW_SCHEMES, resolve_model

    from_mlflow = cfg.model.startswith(MLFLOW_SCHEMES)
    model_uri = (cfg.tracking_uri or Tracker(_tracking(cfg), cfg.run_root).uri) if from_mlflow else None
    model_dir = resolve_model(cfg.model, tracking_uri=model_uri, dst=out_dir / "model" if from_mlflow else None)
    return Path(model_dir).resolve()


def _start_tracker(cfg: LoopEvalConfig, stamp: str, leaves: Sequence[str], model_dir: Path) -> Tracker:
    """The run: tags (git, model), the config as params (without the tracking switches), the
    resolved tasks and the model's config as `model.*`."""
    from mythos.checkpoint import load_config

    from ..tracking import flatten_params, git_tags

    mcfg = load_config(model_dir)  # fails here, not in every worker, if the folder is broken
    tracker = Tracker(_tracking(cfg), cfg.run_root)
    tracker.start(run_name=cfg.run_name or f"eval-{Path(cfg.model).name or 'model'}-{stamp}",
                  tags={**git_tags(Path(__file__).resolve().parents[2]), "mythos.model": cfg.model,
                        "mythos.job": "evaluate"})
    params = {k: v for k, v in cfg.to_dict().items() if k not in ("tracking_uri", "track")}
    params.update(tasks_resolved=list(leaves), model_dir=str(model_dir))
    tracker.log_params({**params, **{f"model.{k}": v for k, v in flatten_params(mcfg.to_dict()).items()}})
    return tracker


def _fan_out(cfg: LoopEvalConfig, model_dir: Path, jobs: list[tuple[Setting, list[str]]], stock: set[str],
             tracker: Tracker, say: Callable[[str], None]) -> tuple[list[EvalPoint], list[dict[str, Any]]]:
    """One Ray task per loop setting; points are logged as they come, a failed setting is recorded
    (its tasks, the error) without losing the others."""
    import ray

    from ..ray_env import init_ray

    init_ray()
    remote = ray.remote(evaluate_points).options(
        num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=0, runtime_env={"env_vars": QUIET_ENV})
    threads = max(1, int(cfg.cpus_per_task))
    pending = {remote.remote(str(model_dir), tasks, n, thr, stock, cfg, threads): (tasks, n, thr)
               for (n, thr), tasks in jobs}
    n_points = sum(len(tasks) for _, tasks in jobs)
    points: list[EvalPoint] = []
    failures: list[dict[str, Any]] = []
    try:
        _collect(pending, n_points, points, failures, tracker, say)
    except KeyboardInterrupt:
        for ref in pending:  # the remaining settings' tasks stop with the job
            ray.cancel(ref, force=True)
        raise
    return points, failures


def _collect(pending: dict, n_points: int, points: list[EvalPoint], failures: list[dict[str, Any]],
             tracker: Tracker, say: Callable[[str], None]) -> None:
    """Wait for the loop settings' tasks in the order they finish; log and say each point."""
    import ray

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        tasks, n, thr = pending.pop(ready[0])
        try:
            got = ray.get(ready[0])
        except Exception as exc:  # one failed loop setting does not lose the others
            cause = getattr(exc, "cause", None) or exc
            failures += [{"task": task, "n_loops": n, "exit_threshold": thr, "error": explain(cause)}
                         for task in tasks]
            _point_done(say, len(points) + len(failures), n_points, f"FAILED loops={n}"
                        f"{'' if thr is None else f' exit={thr:g}'} ({len(tasks)} task(s)): {explain(cause)}")
            continue
        for p in got:
            points.append(p)
            tracker.log_metrics(point_metrics(p), step=p.n_loops)
            _point_done(say, len(points) + len(failures), n_points, describe_point(p))


def _point_done(say: Callable[[str], None], done: int, total: int, text: str) -> None:
    """`[ 3/20] text`; printed (the default `say`), it is a progress bar on a routed terminal."""
    line = f"[{done:>3}/{total}] {text}"
    if say is print:
        from ..console import progress

        progress("evaluation", done, total, line, "points")
    else:
        say(line)


def _announce(cfg: LoopEvalConfig, model_dir: Path, leaves: Sequence[str], jobs: list, say) -> None:
    n_points = sum(len(tasks) for _, tasks in jobs)
    say(f"evaluating {model_dir} on {len(leaves)} task(s) x {len(cfg.loops)} loop count(s)"
        f"{''.join(f' + loops = {m} x hops' for m in cfg.loops_per_hop)}"
        f"{f' + {len(cfg.exit_thresholds)} exit threshold(s)' if cfg.exit_thresholds else ''}: {n_points} points in "
        f"{len(jobs)} Ray tasks (one per loop setting) of {cfg.cpus_per_task:g} CPU")


def model_digest(model_dir: Path) -> str:
    """sha256 over the model folder's files (names and bytes, in name order): what the evaluation
    scored, whichever way it was reached (a folder, or a registry alias that may move)."""
    h = hashlib.sha256()
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(model_dir)).encode() + b"\0")
        with path.open("rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def finished_earlier(cfg: LoopEvalConfig, out_dir: Path, model_dir: Path, digest: str | None) -> LoopEvalResult | None:
    """The result of an earlier launch of this very evaluation that finished: a named run
    (`run_name`) whose results folder records the same config, the same model bytes and no failed
    point, and whose MLflow run is FINISHED. A relaunched pipeline (after a Ctrl-C while deploying
    or serving) then scores nothing again; any change to the config or the model evaluates as usual."""
    if not cfg.run_name or digest is None:
        return None
    try:
        done = json.loads((out_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if (done.get("config") != cfg.recorded() or done.get("model_sha256") != digest or done.get("failures")
            or not done.get("points")):
        return None
    run_id, uri = done.get("run_id"), None
    if cfg.track:
        tracker = Tracker(_tracking(cfg), cfg.run_root, run_id=run_id)
        if not run_id or tracker.status() != "FINISHED":
            return None
        uri = tracker.uri
    plot = out_dir / "accuracy_vs_loops.png"
    return LoopEvalResult([EvalPoint(**p) for p in done["points"]], [], (out_dir / "results.md").read_text(),
                          (out_dir / "results.csv").read_text(), out_dir, plot if plot.exists() else None,
                          model_dir, run_id, uri, reused=True)


def _write_results(cfg: LoopEvalConfig, out_dir: Path, model_dir: Path, leaves: Sequence[str],
                   points: list[EvalPoint], failures: list[dict[str, Any]], digest: str | None,
                   run_id: str | None) -> tuple[str, str, Path | None]:
    """results.md, results.csv, results.json and the plot under `out_dir` -> (markdown, csv, plot)."""
    table = loops_table(points, cfg.limit, leaves, loops=cfg.loops, loops_per_hop=cfg.loops_per_hop)
    md = results_markdown(cfg.model, table, adaptive_table(points, leaves), failures)
    csv_text = points_csv(points, cfg.limit)
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.csv").write_text(csv_text)
    (out_dir / "results.json").write_text(json.dumps(
        {"config": cfg.to_dict(), "model_dir": str(model_dir), "model_sha256": digest, "run_id": run_id,
         "points": [asdict(p) for p in points], "failures": failures}, indent=2, default=str))
    plot_path = None
    if points:
        plot_path = out_dir / "accuracy_vs_loops.png"
        loops_figure(points, cfg.limit, name=f"{cfg.run_name or 'evaluation'} of {cfg.model}").savefig(plot_path)
    return md, csv_text, plot_path


def run_loop_eval(cfg: LoopEvalConfig, progress: Callable[[str], None] | None = print) -> LoopEvalResult:
    """Resolve model and tasks (failing early, in one line), fan out on Ray, track in MLflow."""
    say = progress or (lambda _msg: None)
    resolved = resolve_tasks(cfg.tasks, cfg.include_path)  # TaskError: unknown / needs the hub
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run_root).expanduser().resolve() / "eval" / (cfg.run_name or stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = _resolve_model(cfg, out_dir)
    digest = model_digest(model_dir) if cfg.run_name else None  # only a named run is found again
    earlier = finished_earlier(cfg, out_dir, model_dir, digest)
    if earlier is not None:
        say(f"evaluation '{cfg.run_name}' finished earlier with this config and model: using its results in "
            f"{out_dir} (delete that folder to score it again)")
        return earlier
    jobs = plan_settings(cfg, resolved.leaves)
    tracker = _start_tracker(cfg, stamp, resolved.leaves, model_dir)
    _announce(cfg, model_dir, resolved.leaves, jobs, say)
    try:
        points, failures = _fan_out(cfg, model_dir, jobs, set(resolved.stock), tracker, say)
    except KeyboardInterrupt:
        tracker.end("KILLED")  # the points logged so far stay in the run
        raise
    md, csv_text, plot_path = _write_results(cfg, out_dir, model_dir, resolved.leaves, points, failures, digest,
                                           tracker.run_id if tracker.active else None)
    for name in RESULT_FILES:
        if (out_dir / name).exists():
            tracker.log_artifact(out_dir / name, "results")
    tracker.end("FAILED" if failures or not points else "FINISHED")
    return LoopEvalResult(points, failures, md, csv_text, out_dir, plot_path, model_dir, tracker.run_id,
                          tracker.uri if tracker.active else None)
