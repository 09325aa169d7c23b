"""Accuracy versus inference loops: lm-eval tasks scored at several loop counts, on Ray.

    res = run_sweep(SweepConfig(model="runs/debug/export/debug", loops=[1, 2, 4, 8, 16],
                                tasks=["multihop"], exit_thresholds=[0.01, 0.05]))
    print(res.table_md)

One Ray task per (loop count, task) (and per (exit threshold, task) for the adaptive exit),
each asking for `cpus_per_task` CPUs (fractions are fine: 0.5 fits four at once on 2 CPUs);
results stream back as they finish. The driver logs into one MLflow run (experiment
"mythos-eval"): every metric as `<task>/<metric>` at step = n_loops, the adaptive exit as
`<task>/<metric>/exit_<threshold>` and `<task>/mean_loops/exit_<threshold>` at step = the loop
cap, a plot `results/accuracy_vs_loops.png`, and the tables `results/results.md`,
`results/results.csv` (one row per point) and `results/results.json`.

The model is resolved once on the driver (a models:/ URI is downloaded into the run folder)
and the workers load that folder: on a multi-node cluster `run_root` must be shared storage,
as for Ray Train's storage_path.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

from .catalog import TASKS_DIR, explain, resolve_tasks, task_manager

log = logging.getLogger("mythos.evals")

PRIMARY_METRICS = ("acc", "exact_match", "bits_per_byte", "perplexity", "word_perplexity")
QUIET_ENV = {"TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "DISABLE_MULTIPROC": "1"}


# ---------------------------------------------------------------------------- in-process evaluation
def evaluate_tasks(lm, tasks: Sequence[str], include_path=None, stock: bool = False, limit: float | None = None,
                   bootstrap_iters: int = 1000) -> dict[str, dict]:
    """Run lm-eval on `tasks` with an LM object -> {task: {"metrics", "stderr", "higher_is_better", "n"}}."""
    from lm_eval import simple_evaluate

    # lm-eval bootstraps some stderrs in a fork()ed multiprocessing pool; forking a process that
    # runs torch (and Ray) threads can deadlock the child (seen: Ray workers hung on a futex)
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(include_path, stock=stock),
                          limit=limit, log_samples=False, bootstrap_iters=bootstrap_iters)
    return summarize(out)


def summarize(results: dict) -> dict[str, dict]:
    """lm-eval's results dict -> per task: metric values, their stderr, direction and sample count."""
    summary = {}
    for task, values in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, filt = key.split(",", 1)
            name_out = name if filt == "none" else f"{name}.{filt}"
            if name.endswith("_stderr"):
                stderr[name_out.replace("_stderr", "", 1)] = float(value)
            else:
                metrics[name_out] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        summary[task] = {"metrics": metrics, "stderr": stderr, "n": int(n.get("effective", 0) or 0),
                         "higher_is_better": dict(results.get("higher_is_better", {}).get(task, {}))}
    return summary


def primary_metric(metrics: dict[str, float]) -> str:
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    return sorted(metrics)[0]


def floor_start_symbol(task: str, limit: float | None = None) -> float | None:
    """Score of always answering the start symbol, for local multi-hop tasks (None otherwise)."""
    rows = task_rows(task, limit)
    if not rows or "start" not in rows[0] or "answer" not in rows[0]:
        return None
    return sum(r["answer"].strip() == r["start"] for r in rows) / len(rows)


# ---------------------------------------------------------------------------- configuration, results
@dataclass
class SweepConfig:
    model: str
    """A model folder or an MLflow URI (models:/mythos-rdt@champion)."""
    loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    tasks: list[str] = field(default_factory=lambda: ["multihop"])
    """Task, tag or group names: local ones (evals/tasks) or lm-eval stock tasks."""
    exit_thresholds: list[float] = field(default_factory=list)
    """Adaptive exit thresholds, each run with n_loops = exit_max_loops as the cap."""
    exit_on: str = "all"
    """Adaptive exit: "all" positions converge, or the "last" of each sequence (one-token answers)."""
    exit_max_loops: int | None = None
    """Loop cap of the adaptive runs (default: the largest of `loops`)."""
    limit: float | None = None
    """Examples per task (an int count, or a fraction < 1), as lm-eval's --limit."""
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "auto"
    cpus_per_task: float = 0.5
    gpus_per_task: float = 0.0
    include_path: list[str] = field(default_factory=list)
    bootstrap_iters: int = 1000
    run_root: str = "./runs/eval"
    tracking_uri: str | None = None
    experiment: str = "mythos-eval"
    run_name: str | None = None
    track: bool = True
    loops_per_hop: list[int] = field(default_factory=list)
    """Also score every task of one hop count k (multihop_k*, pointer_k*) at n_loops = m * k for each
    m here: [1] adds loops = hops, [1, 2] also twice as many loops as hops."""

    def validate(self) -> None:
        if not self.loops or any(not isinstance(n, int) or n < 1 for n in self.loops):
            raise ValueError(f"loops must be positive ints, got {self.loops!r}")
        if any(t < 0 for t in self.exit_thresholds):
            raise ValueError(f"exit thresholds must be >= 0, got {self.exit_thresholds!r}")
        from mythos.recurrent import EXIT_ON

        if self.exit_on not in EXIT_ON:
            raise ValueError(f"exit_on must be 'all' or 'last', got {self.exit_on!r}")
        if self.exit_max_loops is not None and self.exit_max_loops < 1:
            raise ValueError(f"exit_max_loops must be >= 1, got {self.exit_max_loops}")
        if self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task must be > 0, got {self.cpus_per_task}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if any(not isinstance(m, int) or m < 1 for m in self.loops_per_hop):
            raise ValueError(f"loops_per_hop must be positive ints, got {self.loops_per_hop!r}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be > 0, got {self.limit}")


@dataclass
class EvalPoint:
    """The scores of one task at one loop setting."""

    task: str
    n_loops: int
    exit_threshold: float | None
    metrics: dict[str, float]
    stderr: dict[str, float]
    higher_is_better: dict[str, bool]
    mean_loops: float | None
    n_samples: int
    seconds: float

    @property
    def primary(self) -> str:
        return primary_metric(self.metrics)


@dataclass
class SweepResult:
    points: list[EvalPoint]
    failures: list[dict[str, Any]]
    table_md: str
    csv_text: str
    out_dir: Path
    plot_path: Path | None
    model_dir: Path
    run_id: str | None
    tracking_uri: str | None


# ---------------------------------------------------------------------------- one point (a Ray task body)
def evaluate_points(model_dir: str, tasks: Sequence[str], n_loops: int, exit_threshold: float | None,
                    stock: set[str], cfg: SweepConfig, threads: int = 1) -> list[EvalPoint]:
    """Load the model once and score `tasks` at one loop setting in one lm-eval run (a Ray task
    body, or inline)."""
    import torch

    torch.set_num_threads(max(1, threads))
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from .lm_model import MythosLM

    t0 = time.perf_counter()
    lm = MythosLM(pretrained=model_dir, n_loops=n_loops, exit_threshold=exit_threshold, exit_on=cfg.exit_on,
                  batch_size=cfg.batch_size,
                  device=cfg.device, dtype=cfg.dtype, progress=False)
    summary = evaluate_tasks(lm, list(tasks), cfg.include_path, stock=bool(stock & set(tasks)), limit=cfg.limit,
                             bootstrap_iters=cfg.bootstrap_iters)
    seconds = (time.perf_counter() - t0) / len(tasks)
    return [EvalPoint(task, n_loops, exit_threshold, summary[task]["metrics"], summary[task]["stderr"],
                      summary[task]["higher_is_better"], lm.mean_loops_used, summary[task]["n"], seconds)
            for task in tasks]


def task_hops(task: str) -> int | None:
    """The hop count of a local task whose rows all share one (multihop_k*, pointer_k*), else None."""
    rows = task_rows(task)
    hops = {r.get("hops") for r in rows} if rows else {None}
    return int(hops.pop()) if len(hops) == 1 and None not in hops else None


@lru_cache(maxsize=None)
def _read_rows(task: str) -> tuple[dict, ...]:
    """A local task's data file, read once per process (tables, floors and hop counts all ask)."""
    path = TASKS_DIR / "data" / f"{task}.jsonl"
    if not path.exists():
        return ()
    return tuple(json.loads(line) for line in path.read_text().splitlines() if line.strip())


def task_rows(task: str, limit: float | None = None) -> list[dict]:
    """The rows of a local task's data file ([] for other tasks); like lm-eval, an integer `limit`
    takes the first rows, a fraction that share of them."""
    rows = list(_read_rows(task))
    if limit is not None and rows:
        rows = rows[: int(math.ceil(len(rows) * limit)) if limit < 1 else int(limit)]
    return rows


def shallow_floor(task: str, trained_hops: int, limit: float | None = None) -> float | None:
    """The best score of answering f^j(start) for one fixed j < k and j <= trained_hops, on a task
    whose rows carry their chain (pointer_k*): what a model that never goes deeper than it was
    trained still scores, because a random function's orbits fall into short cycles."""
    rows = task_rows(task, limit)
    if not rows or "chain" not in rows[0]:
        return None
    k = int(rows[0]["hops"])
    return max(sum(r["chain"][j] == r["chain"][k] for r in rows) / len(rows) for j in range(min(k, trained_hops + 1)))


# ---------------------------------------------------------------------------- tables and plot
def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _rows_by_task(points: Sequence[EvalPoint]) -> dict[str, list[EvalPoint]]:
    out: dict[str, list[EvalPoint]] = {}
    for p in points:
        out.setdefault(p.task, []).append(p)
    return out


def loops_table(points: Sequence[EvalPoint], limit: float | None = None, task_order: Sequence[str] = (),
                loops: Sequence[int] | None = None, loops_per_hop: Sequence[int] = (), trained_hops: int = 4) -> str:
    """Markdown: one row per task (its primary metric), one column per loop count (and at
    loops = the task's hop count), the 'answer = start symbol' floor and, for tasks that carry
    their chains, the shallow floor beside it."""
    fixed = [p for p in points if p.exit_threshold is None]
    loops = sorted(set(loops) if loops is not None else {p.n_loops for p in fixed})
    by_task = _rows_by_task(fixed)
    order = [t for t in task_order if t in by_task] + sorted(t for t in by_task if t not in task_order)
    shallow = any(shallow_floor(t, trained_hops) is not None for t in order)
    head = ["task", "metric", "floor (answer = start)"] + ([f"shallow floor (j <= {trained_hops})"] if shallow else [])
    head += [f"n_loops={n}" for n in loops] + [f"loops = {'' if m == 1 else f'{m} x '}hops" for m in loops_per_hop]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in order:
        pts = {p.n_loops: p for p in by_task[task]}
        metric = by_task[task][0].primary
        cells = [task, metric, _fmt(floor_start_symbol(task, limit))]
        if shallow:
            cells.append(_fmt(shallow_floor(task, trained_hops, limit)))
        cells += [_fmt(pts[n].metrics.get(metric)) if n in pts else "—" for n in loops]
        k = task_hops(task)
        for m in loops_per_hop:
            cells.append(_fmt(pts[m * k].metrics.get(metric)) if k is not None and m * k in pts else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def adaptive_table(points: Sequence[EvalPoint], task_order: Sequence[str] = ()) -> str:
    """Markdown: per task, the primary metric and the mean loops used at each exit threshold."""
    adaptive = [p for p in points if p.exit_threshold is not None]
    if not adaptive:
        return ""
    thresholds = sorted({p.exit_threshold for p in adaptive})
    cap = max(p.n_loops for p in adaptive)
    by_task = _rows_by_task(adaptive)
    order = [t for t in task_order if t in by_task] + sorted(t for t in by_task if t not in task_order)
    lines = [f"| task | metric | " + " | ".join(f"exit {t:g} (cap {cap})" for t in thresholds) + " |",
             "|---|---|" + "---|" * len(thresholds)]
    for task in order:
        pts = {p.exit_threshold: p for p in by_task[task]}
        metric = by_task[task][0].primary
        cells = [f"{_fmt(pts[t].metrics.get(metric))} @ {_fmt(pts[t].mean_loops, 2)} loops" if t in pts else "—"
                 for t in thresholds]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def points_csv(points: Sequence[EvalPoint], limit: float | None = None) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "metric", "n_loops", "exit_threshold", "value", "stderr", "mean_loops", "n_samples",
                "seconds", "floor_answer_is_start"])
    for p in sorted(points, key=lambda p: (p.task, p.exit_threshold is not None, p.exit_threshold or 0, p.n_loops)):
        floor = floor_start_symbol(p.task, limit)
        for metric, value in sorted(p.metrics.items()):
            w.writerow([p.task, metric, p.n_loops, "" if p.exit_threshold is None else p.exit_threshold, value,
                        p.stderr.get(metric, ""), "" if p.mean_loops is None else p.mean_loops, p.n_samples,
                        round(p.seconds, 2), "" if floor is None else floor])
    return buf.getvalue()


def loops_figure(points: Sequence[EvalPoint], limit: float | None = None):
    """Primary metric versus loops, one line per task (higher-is-better metrics left, others right);
    dotted lines: the 'answer = start symbol' floor of the same task."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fixed = [p for p in points if p.exit_threshold is None]
    by_task = _rows_by_task(fixed)
    up = {t: ps for t, ps in by_task.items() if ps[0].higher_is_better.get(ps[0].primary, True)}
    down = {t: ps for t, ps in by_task.items() if t not in up}
    panels = [("higher is better", up)] + ([("lower is better", down)] if down else [])
    fig = Figure(figsize=(6.5 * len(panels), 4.5), dpi=100)
    for i, (title, group) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for task, ps in sorted(group.items()):
            ps = sorted(ps, key=lambda p: p.n_loops)
            metric = ps[0].primary
            line, = ax.plot([p.n_loops for p in ps], [p.metrics.get(metric, float("nan")) for p in ps], marker="o",
                            label=f"{task} ({metric})")
            floor = floor_start_symbol(task, limit)
            if floor is not None:
                ax.axhline(floor, color=line.get_color(), linestyle=":", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("inference loops")
        ax.set_title(f"score vs loops ({title}; dotted: answer = start)" if i == 0 else f"score vs loops ({title})")
        ax.grid(alpha=0.3)
        if group:
            ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------- the sweep
def _metric_key(*parts: str) -> str:
    return "/".join(p.replace(",", ".").replace("@", "_") for p in parts)


def point_metrics(p: EvalPoint) -> dict[str, float]:
    if p.exit_threshold is None:
        return {_metric_key(p.task, m): v for m, v in p.metrics.items()}
    suffix = f"exit_{p.exit_threshold:g}"
    out = {_metric_key(p.task, m, suffix): v for m, v in p.metrics.items()}
    if p.mean_loops is not None:
        out[_metric_key(p.task, "mean_loops", suffix)] = p.mean_loops
    return out


def _describe(p: EvalPoint) -> str:
    setting = f"loops={p.n_loops}" if p.exit_threshold is None else \
        f"exit={p.exit_threshold:g} (cap {p.n_loops}, used {_fmt(p.mean_loops, 2)})"
    return f"{p.task} {setting}: {p.primary}={_fmt(p.metrics.get(p.primary))} n={p.n_samples} ({p.seconds:.1f} s)"


def run_sweep(cfg: SweepConfig, progress: Callable[[str], None] | None = print) -> SweepResult:
    """Resolve model and tasks (failing early, in one line), fan out on Ray, track in MLflow."""
    import ray

    from mythos.checkpoint import load_config
    from mythos_platform.config import TrackingConfig
    from mythos_platform.ray_env import init_ray
    from mythos_platform.registry import MLFLOW_SCHEMES, resolve_model
    from mythos_platform.tracking import Tracker, flatten_params, git_tags

    say = progress or (lambda _msg: None)
    cfg.validate()
    resolved = resolve_tasks(cfg.tasks, cfg.include_path)  # TaskError: unknown / needs the hub
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(cfg.run_root).expanduser().resolve() / "eval" / (cfg.run_name or stamp)
    out_dir.mkdir(parents=True, exist_ok=True)
    tcfg = TrackingConfig(experiment=cfg.experiment, tracking_uri=cfg.tracking_uri, run_name=cfg.run_name,
                          enabled=cfg.track)
    from_mlflow = cfg.model.startswith(MLFLOW_SCHEMES)
    model_uri = (cfg.tracking_uri or Tracker(tcfg, cfg.run_root).uri) if from_mlflow else None
    model_dir = resolve_model(cfg.model, tracking_uri=model_uri, dst=out_dir / "model" if from_mlflow else None)
    model_dir = Path(model_dir).resolve()
    mcfg = load_config(model_dir)  # fails here, not in every worker, if the folder is broken
    cap = cfg.exit_max_loops or max(cfg.loops)
    by_setting: dict[tuple[int, float | None], list[str]] = {}
    for n in cfg.loops:
        by_setting.setdefault((n, None), []).extend(resolved.leaves)
    for m in cfg.loops_per_hop:
        for task in resolved.leaves:
            k = task_hops(task)
            if k is not None and task not in by_setting.get((m * k, None), []):
                by_setting.setdefault((m * k, None), []).append(task)
    for thr in cfg.exit_thresholds:
        by_setting[(cap, thr)] = list(resolved.leaves)
    jobs = sorted(by_setting.items(), key=lambda kv: (kv[0][1] is not None, -kv[0][0]))
    n_points = sum(len(tasks) for _, tasks in jobs)

    tracker = Tracker(tcfg, cfg.run_root)
    tracker.start(run_name=cfg.run_name or f"eval-{Path(cfg.model).name or 'model'}-{stamp}",
                  tags={**git_tags(Path(__file__).resolve().parents[1]), "mythos.model": cfg.model,
                        "mythos.job": "evaluate"})
    params = {k: v for k, v in asdict(cfg).items() if k not in ("tracking_uri", "track")}
    params.update(tasks_resolved=resolved.leaves, model_dir=str(model_dir))
    tracker.log_params({**params, **{f"model.{k}": v for k, v in flatten_params(mcfg.to_dict()).items()}})

    init_ray()
    threads = max(1, int(cfg.cpus_per_task))
    remote = ray.remote(evaluate_points).options(
        num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task, max_retries=0,
        runtime_env={"env_vars": QUIET_ENV})
    stock = set(resolved.stock)
    pending = {remote.remote(str(model_dir), tasks, n, thr, stock, cfg, threads): (tasks, n, thr)
               for (n, thr), tasks in jobs}
    say(f"evaluating {model_dir} on {len(resolved.leaves)} task(s) x {len(cfg.loops)} loop count(s)"
        f"{''.join(f' + loops = {m} x hops' for m in cfg.loops_per_hop)}"
        f"{f' + {len(cfg.exit_thresholds)} exit threshold(s)' if cfg.exit_thresholds else ''}: {n_points} points in "
        f"{len(jobs)} Ray tasks (one per loop setting) of {cfg.cpus_per_task:g} CPU")
    points: list[EvalPoint] = []
    failures: list[dict[str, Any]] = []
    done = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        tasks, n, thr = pending.pop(ready[0])
        try:
            got = ray.get(ready[0])
        except Exception as exc:  # one failed loop setting does not lose the others
            cause = getattr(exc, "cause", None) or exc
            done += len(tasks)
            for task in tasks:
                failures.append({"task": task, "n_loops": n, "exit_threshold": thr, "error": explain(cause)})
            say(f"[{done:>3}/{n_points}] FAILED loops={n}{'' if thr is None else f' exit={thr:g}'} "
                f"({len(tasks)} task(s)): {explain(cause)}")
            continue
        for p in got:
            done += 1
            points.append(p)
            tracker.log_metrics(point_metrics(p), step=p.n_loops)
            say(f"[{done:>3}/{n_points}] {_describe(p)}")

    table = loops_table(points, cfg.limit, resolved.leaves, loops=cfg.loops, loops_per_hop=cfg.loops_per_hop)
    adaptive = adaptive_table(points, resolved.leaves)
    md = f"# {cfg.model}: score vs inference loops\n\n{table}"
    if adaptive:
        md += f"\n## Adaptive exit\n\n{adaptive}"
    if failures:
        md += "\n## Failed points\n\n" + "".join(
            f"- {f['task']} loops={f['n_loops']} exit={f['exit_threshold']}: {f['error']}\n" for f in failures)
    csv_text = points_csv(points, cfg.limit)
    (out_dir / "results.md").write_text(md)
    (out_dir / "results.csv").write_text(csv_text)
    (out_dir / "results.json").write_text(json.dumps(
        {"config": asdict(cfg), "model_dir": str(model_dir), "points": [asdict(p) for p in points],
         "failures": failures}, indent=2, default=str))
    plot_path = None
    if points:
        fig = loops_figure(points, cfg.limit)
        plot_path = out_dir / "accuracy_vs_loops.png"
        fig.savefig(plot_path)
    for name in ("results.md", "results.csv", "results.json", "accuracy_vs_loops.png"):
        if (out_dir / name).exists():
            tracker.log_artifact(out_dir / name, "results")
    tracker.end("FAILED" if failures or not points else "FINISHED")
    return SweepResult(points, failures, md, csv_text, out_dir, plot_path, model_dir, tracker.run_id,
                       tracker.uri if tracker.active else None)


def parse_list(text: str | Sequence, kind: Callable = int) -> list:
    """'1,2,4' or '1 2 4' -> [1, 2, 4]."""
    items = text if not isinstance(text, str) else text.replace(",", " ").split()
    return [kind(x) for x in items]

