"""What a loop evaluation reports: markdown tables, the CSV of every point, the score-vs-loops
plot, the MLflow metric names of a point and its progress line."""

from __future__ import annotations

import re

from typing import Any, Sequence

from evals.task_data import floor_start_symbol, shallow_floor, task_hops

from ..figures import new_panels, style_axes
from ..tables import MISSING, format_cell, markdown_table, to_csv
from .points import EvalPoint

__all__ = ["adaptive_table", "describe_point", "loops_figure", "loops_table", "point_metrics", "points_csv",
           "results_markdown"]


def _rows_by_task(points: Sequence[EvalPoint]) -> dict[str, list[EvalPoint]]:
    out: dict[str, list[EvalPoint]] = {}
    for p in points:
        out.setdefault(p.task, []).append(p)
    return out


def _ordered(by_task: dict[str, list[EvalPoint]], task_order: Sequence[str]) -> list[str]:
    """Tasks in `task_order` first, the others by name."""
    return [t for t in task_order if t in by_task] + sorted(t for t in by_task if t not in task_order)


def loops_table(points: Sequence[EvalPoint], limit: float | None = None, task_order: Sequence[str] = (),
                loops: Sequence[int] | None = None, loops_per_hop: Sequence[int] = (), trained_hops: int = 4) -> str:
    """Markdown: one row per task (its primary metric), one column per loop count (and at
    loops = the task's hop count), the 'answer = start symbol' floor and, for tasks that carry
    their chains, the shallow floor beside it."""
    fixed = [p for p in points if p.exit_threshold is None]
    loops = sorted(set(loops) if loops is not None else {p.n_loops for p in fixed})
    by_task = _rows_by_task(fixed)
    order = _ordered(by_task, task_order)
    shallow = any(shallow_floor(t, trained_hops) is not None for t in order)
    head = ["task", "metric", "floor (answer = start)"] + ([f"shallow floor (j <= {trained_hops})"] if shallow else [])
    head += [f"n_loops={n}" for n in loops] + [f"loops = {'' if m == 1 else f'{m} x '}hops" for m in loops_per_hop]
    rows = []
    for task in order:
        pts = {p.n_loops: p for p in by_task[task]}
        metric = by_task[task][0].primary
        k = task_hops(task)
        wanted = [*loops, *[m * k if k is not None else None for m in loops_per_hop]]
        rows.append([task, metric, floor_start_symbol(task, limit)]
                    + ([shallow_floor(task, trained_hops, limit)] if shallow else [])
                    + [pts[n].metrics.get(metric) if n in pts else None for n in wanted])
    return markdown_table(rows, head, spec=".3f")


def _exit_cell(p: EvalPoint, metric: str) -> str:
    return f"{format_cell(p.metrics.get(metric))} @ {format_cell(p.mean_loops, '.2f')} loops"


def adaptive_table(points: Sequence[EvalPoint], task_order: Sequence[str] = ()) -> str:
    """Markdown: per task, the primary metric and the mean loops used at each exit threshold."""
    adaptive = [p for p in points if p.exit_threshold is not None]
    if not adaptive:
        return ""
    thresholds = sorted({p.exit_threshold for p in adaptive})
    cap = max(p.n_loops for p in adaptive)
    by_task = _rows_by_task(adaptive)
    head = ["task", "metric", *[f"exit {t:g} (cap {cap})" for t in thresholds]]
    rows = []
    for task in _ordered(by_task, task_order):
        pts = {p.exit_threshold: p for p in by_task[task]}
        metric = by_task[task][0].primary
        rows.append([task, metric, *[_exit_cell(pts[t], metric) if t in pts else MISSING for t in thresholds]])
    return markdown_table(rows, head)


def results_markdown(model: str, table: str, adaptive: str, failures: Sequence[dict[str, Any]]) -> str:
    """The results page: the loops table, the adaptive-exit table and the failed points, if any."""
    md = f"# {model}: score vs inference loops\n\n{table}"
    if adaptive:
        md += f"\n## Adaptive exit\n\n{adaptive}"
    if failures:
        md += "\n## Failed points\n\n" + "".join(
            f"- {f['task']} loops={f['n_loops']} exit={f['exit_threshold']}: {f['error']}\n" for f in failures)
    return md


POINT_COLUMNS = ["task", "metric", "n_loops", "exit_threshold", "value", "stderr", "mean_loops", "n_samples",
                 "seconds", "floor_answer_is_start"]


def points_csv(points: Sequence[EvalPoint], limit: float | None = None) -> str:
    """One line per (point, metric), fixed loop counts first; values at full precision, None/NaN empty."""
    rows = []
    for p in sorted(points, key=lambda p: (p.task, p.exit_threshold is not None, p.exit_threshold or 0, p.n_loops)):
        floor = floor_start_symbol(p.task, limit)
        for metric, value in sorted(p.metrics.items()):
            rows.append([p.task, metric, p.n_loops, p.exit_threshold, value, p.stderr.get(metric), p.mean_loops,
                         p.n_samples, round(p.seconds, 2), floor])
    return to_csv(rows, POINT_COLUMNS)


def loops_figure(points: Sequence[EvalPoint], limit: float | None = None, name: str = ""):
    """Primary metric versus loops, one line per task (higher-is-better metrics left, others right);
    dotted lines: the 'answer = start symbol' floor of the same task; `name` (the run and model) heads
    the titles. Tight layout: `fig.savefig(path)` is all
    that is left to do."""
    by_task = _rows_by_task([p for p in points if p.exit_threshold is None])
    up = {t: ps for t, ps in by_task.items() if ps[0].higher_is_better.get(ps[0].primary, True)}
    down = {t: ps for t, ps in by_task.items() if t not in up}
    panels = [("higher is better", up)] + ([("lower is better", down)] if down else [])
    fig, axes = new_panels(len(panels))
    for i, (ax, (title, group)) in enumerate(zip(axes, panels)):
        for task, ps in sorted(group.items(), key=lambda kv: _natural(kv[0])):  # pointer_k2 before _k10
            ps = sorted(ps, key=lambda p: p.n_loops)
            metric = ps[0].primary
            line, = ax.plot([p.n_loops for p in ps], [p.metrics.get(metric, float("nan")) for p in ps], marker="o",
                            label=f"{task} ({metric})")
            floor = floor_start_symbol(task, limit)
            if floor is not None:
                ax.axhline(floor, color=line.get_color(), linestyle=":", alpha=0.6)
        ax.set_xscale("log", base=2)
        ax.set_ylabel("score (the task's primary metric)")
        style_axes(ax, xlabel="inference loops", legend="outside" if len(group) > 6 else "best",
                   title=f"score vs loops ({title}; dotted: answer = start)" if i == 0 else f"score vs loops ({title})")
    if name:
        fig.suptitle(name, fontsize=10)
    return fig


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _metric_key(*parts: str) -> str:
    return "/".join(p.replace(",", ".").replace("@", "_") for p in parts)


def point_metrics(p: EvalPoint) -> dict[str, float]:
    """MLflow metrics of a point: `<task>/<metric>` (step = n_loops), or for the adaptive exit
    `<task>/<metric>/exit_<threshold>` and `<task>/mean_loops/exit_<threshold>` (step = the cap)."""
    if p.exit_threshold is None:
        return {_metric_key(p.task, m): v for m, v in p.metrics.items()}
    suffix = f"exit_{p.exit_threshold:g}"
    out = {_metric_key(p.task, m, suffix): v for m, v in p.metrics.items()}
    if p.mean_loops is not None:
        out[_metric_key(p.task, "mean_loops", suffix)] = p.mean_loops
    return out


def describe_point(p: EvalPoint) -> str:
    """A progress line: task, loop setting, primary metric, samples, seconds."""
    setting = f"loops={p.n_loops}" if p.exit_threshold is None else \
        f"exit={p.exit_threshold:g} (cap {p.n_loops}, used {format_cell(p.mean_loops, '.2f')})"
    score = format_cell(p.metrics.get(p.primary))
    return f"{p.task} {setting}: {p.primary}={score} n={p.n_samples} ({p.seconds:.1f} s)"
