"""The sweep's results table (CSV and markdown) and its plot: learning curves, and all trials at equal steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .. import tables
from ..figures import new_panels, save_figure, style_axes


def table_columns(param_keys: Sequence[str]) -> list[str]:
    return ["trial_id", "status", *param_keys, "step", "metric", "best_metric", "time_s", "mlflow_run_id"]


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """One line per trial; parameters at full precision, None/NaN empty."""
    return tables.to_csv(rows, columns)


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], metric: str) -> str:
    """One line per trial, the metric columns named after `metric`; floats to 4 significant digits
    (learning rates stay readable), None/NaN as '—'."""
    names = [metric if c == "metric" else f"best {metric}" if c == "best_metric" else c for c in columns]
    return tables.markdown_table(rows, columns, headers=names, spec=".4g")


def common_step(rows: Sequence[dict[str, Any]]) -> int | None:
    """The last step every trial with a history reached: where all of them can be compared."""
    ends = [r["history"][-1][0] for r in rows if r.get("history")]
    return min(ends) if ends else None


def value_at(history: Sequence[tuple[int, float]], step: int) -> float | None:
    """The metric at `step` (the last report at or before it)."""
    before = [v for s, v in history if s <= step]
    return before[-1] if before else None


def metric_plot(rows: Sequence[dict[str, Any]], x: str, group: str, metric: str, path: str | Path,
                title: str = "", searched: Sequence[str] = ()) -> Path:
    """Two panels. Left: each trial's `metric` against the training step (`row["history"]`, pairs of
    (step, value)); a trial the scheduler stopped ends in a cross, dashed, with the step it reached,
    so its figure is not read as a finished trial's. Right: every trial at one step that all of them
    reached (`common_step`) against `x`, one line per `group` value: a comparison at equal training."""
    fig, (curves, equal) = new_panels(2)
    common = common_step(rows)
    for row in rows:
        hist = row.get("history") or []
        if not hist:
            continue
        label = ", ".join(f"{k.split('.')[-1]}={row.get(k)}" for k in searched) or str(row.get("trial_id"))
        stopped = row.get("status") != "completed"
        (line,) = curves.plot([s for s, _ in hist], [v for _, v in hist], linestyle="--" if stopped else "-",
                              marker=".", label=label + (f" (stopped at step {hist[-1][0]})" if stopped else ""))
        curves.plot([hist[-1][0]], [hist[-1][1]], marker="x" if stopped else "o", markersize=9,
                    color=line.get_color())
    if common is not None:
        curves.axvline(common, color="grey", linestyle=":", linewidth=1)
    style_axes(curves, xlabel="training step", ylabel=metric, legend="best",
               title=f"{title}: {metric} by step (dashed, x: stopped early by the scheduler)")
    groups: dict[Any, dict[Any, float]] = {}
    for row in rows:
        v = value_at(row.get("history") or [], common) if common is not None else None
        if v is not None and math.isfinite(v):
            at = groups.setdefault(row.get(group), {})
            at[row.get(x)] = v if row.get(x) not in at else max(at[row.get(x)], v)
    for g, at in sorted(groups.items(), key=lambda kv: str(kv[0])):
        xs = sorted(at, key=lambda v: (v is None, v))
        equal.plot(xs, [at[v] for v in xs], marker="o", label=f"{group.split('.')[-1]}={g}")
    from matplotlib.ticker import MaxNLocator

    equal.xaxis.set_major_locator(MaxNLocator(integer=True))
    style_axes(equal, xlabel=x.split(".")[-1], ylabel=f"{metric} at step {common}",
               title=f"{title}: every trial at step {common} (reached by all)")
    return save_figure(fig, path)
