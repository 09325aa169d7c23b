"""The sweep's results table (CSV and markdown) and its plot: the metric against loop depth, one line per rank."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Sequence

from ..tracking import agg_figure, save_figure


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def table_columns(param_keys: Sequence[str]) -> list[str]:
    return ["trial_id", "status", *param_keys, "step", "metric", "best_metric", "time_s", "mlflow_run_id"]


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buf.getvalue()


def to_markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str], metric: str) -> str:
    names = [metric if c == "metric" else f"best {metric}" if c == "best_metric" else c for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def metric_plot(rows: Sequence[dict[str, Any]], x: str, group: str, metric: str, path: str | Path,
                title: str = "") -> Path:
    """The best metric each trial reached against `x`, one line per `group` value; stopped trials hollow."""
    fig, ax = agg_figure()
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
    ax.set_xlabel(x.split(".")[-1] + " (loop depth)")
    ax.set_ylabel(f"best {metric} (hollow: stopped early)")
    ax.set_title(title or f"{metric} against loop depth")
    return save_figure(fig, path, legend=bool(groups))
