"""The sweep's results table (CSV and markdown) and its plot: the metric against loop depth, one line per rank."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from .. import tables
from ..figures import new_figure, save_figure, style_axes


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


def metric_plot(rows: Sequence[dict[str, Any]], x: str, group: str, metric: str, path: str | Path,
                title: str = "") -> Path:
    """The best metric each trial reached against `x`, one line per `group` value; stopped trials hollow."""
    fig, ax = new_figure()
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        if isinstance(row.get("best_metric"), float) and math.isfinite(row["best_metric"]):
            groups.setdefault(row.get(group), []).append(row)
    for g, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        # several trials at one x (e.g. other learning rates): the line joins the best of them
        best: dict[Any, float] = {}
        for r in members:
            xv = r.get(x)
            best[xv] = min(best.get(xv, math.inf), r["best_metric"])
        xs = sorted(best, key=lambda v: (v is None, v))
        (line,) = ax.plot(xs, [best[v] for v in xs], marker="o", label=f"{group.split('.')[-1]}={g}")
        stopped = [r for r in members if r.get("status") != "completed"]
        if stopped:
            ax.scatter([r.get(x) for r in stopped], [r["best_metric"] for r in stopped], facecolors="none",
                       edgecolors=line.get_color(), s=60)
    style_axes(ax, xlabel=x.split(".")[-1] + " (loop depth)", ylabel=f"best {metric} (hollow: stopped early)",
               title=title or f"{metric} against loop depth")
    return save_figure(fig, path)
