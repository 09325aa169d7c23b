"""The depth table and plot: accuracy by hop count, the looped model at several loop counts and at
loops = hops, beside a non-looped baseline, the shallow floor and chance.

Inputs are lm-eval points (`mythos_platform.evaluation.EvalPoint`) of the `pointer_k<hops>` tasks,
so the depth job and the pipeline report exactly what the evaluation job measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..figures import new_figure, save_figure, style_axes
from ..tables import MISSING, format_cell, markdown_table, to_csv


@dataclass
class DepthReport:
    grid: dict[tuple[int, int], float]
    """Looped model: accuracy per (hops, n_loops)."""
    baseline: dict[int, float] = field(default_factory=dict)
    """Baseline accuracy per hops (its one forward pass)."""
    floor: dict[int, float] = field(default_factory=dict)
    """Per hops: the shallow floor (best fixed answer f^j(start), j <= trained hops)."""
    trained_hops: int = 4
    n_symbols: int = 16
    loops: list[int] = field(default_factory=list)
    """The fixed loop counts shown as columns."""
    loops_per_hop: list[int] = field(default_factory=lambda: [1])
    """Columns at loops = m x hops (m = 1 always shown first)."""
    exits: dict[float, dict[int, tuple[float, float | None]]] = field(default_factory=dict)
    """Adaptive exit: per threshold, per hops, (accuracy, mean loops used)."""

    @property
    def hops(self) -> list[int]:
        return sorted({h for h, _ in self.grid})

    def at_loops_equal_hops(self, h: int) -> float | None:
        return self.grid.get((h, h))

    @property
    def multiples(self) -> list[int]:
        return [m for m in self.loops_per_hop if m != 1]

    def deepest_solved(self, threshold: float = 0.95) -> int:
        """The largest H such that loops = hops scores >= threshold on every hop count 1..H."""
        best = 0
        for h in self.hops:
            acc = self.at_loops_equal_hops(h)
            if acc is None or acc < threshold:
                break
            best = h
        return best

    def metrics_by_hops(self, prefix: str = "") -> dict[int, dict[str, float]]:
        """MLflow metrics with the hop count as step: the looped model (names under `prefix`) at
        loops = m x hops and with each adaptive exit, the baseline and the shallow floor."""
        out: dict[int, dict[str, float]] = {}
        for h in self.hops:
            m = out.setdefault(h, {})
            if self.at_loops_equal_hops(h) is not None:
                m[f"{prefix}acc_loops_eq_hops"] = self.at_loops_equal_hops(h)
            for k in self.multiples:
                if (h, k * h) in self.grid:
                    m[f"{prefix}acc_loops_eq_{k}x_hops"] = self.grid[(h, k * h)]
            for t, by_hops in self.exits.items():
                if h in by_hops:
                    acc, used = by_hops[h]
                    m[f"{prefix}acc_exit_{t:g}"] = acc
                    if used is not None:
                        m[f"{prefix}loops_used_exit_{t:g}"] = used
            if h in self.baseline:
                m["baseline_acc"] = self.baseline[h]
            if h in self.floor:
                m["shallow_floor"] = self.floor[h]
        return out

    # ------------------------------------------------------------------------------ tables
    def rows(self, missing: str = MISSING) -> tuple[list[str], list[list[str]]]:
        """The header and, per hop count, the formatted cells (`missing` where nothing was measured)."""
        def f(v: float | None, spec: str = ".2f") -> str:
            return format_cell(v, spec, missing)

        head = ["hops", "loops = hops", *[f"loops = {m} x hops" for m in self.multiples],
                *[f"{n} loops" for n in self.loops]]
        head += [f"exit {t:g}: acc @ mean loops" for t in sorted(self.exits)]
        head += ["baseline"] if self.baseline else []
        head += ["shallow floor", "chance"]
        out = []
        for h in self.hops:
            row = [f"{h}{'*' if h <= self.trained_hops else ''}", f(self.at_loops_equal_hops(h))]
            row += [f(self.grid.get((h, m * h))) for m in self.multiples]
            row += [f(self.grid.get((h, n))) for n in self.loops]
            for t in sorted(self.exits):
                acc, used = self.exits[t].get(h, (None, None))
                row.append(f(acc) if acc is None or used is None else f"{f(acc)} @ {f(used, '.1f')}")
            row += [f(self.baseline.get(h))] if self.baseline else []
            row += [f(self.floor.get(h)), f(1 / self.n_symbols)]
            out.append(row)
        return head, out

    def markdown(self) -> str:
        head, rows = self.rows()
        return markdown_table(rows, head) + (
            f"\n`*` hop counts seen in training (<= {self.trained_hops}); shallow floor: the best score of "
            f"answering f^j(start) for one fixed j <= {self.trained_hops} (a random function's orbits cycle, "
            f"so a model that never goes deeper still scores this); chance: 1/{self.n_symbols}.\n")

    def csv(self) -> str:
        """The table's cells as CSV: hop counts without the training mark, empty where nothing was measured."""
        head, rows = self.rows(missing="")
        return to_csv([[r[0].rstrip("*"), *r[1:]] for r in rows], head)

    # ------------------------------------------------------------------------------ plot
    def plot(self, path: str | Path, title: str = "") -> Path:
        import matplotlib

        hops = self.hops
        fig, ax = new_figure(size=(8.5, 4.8))
        cmap = matplotlib.colormaps["viridis"]
        for i, n in enumerate(self.loops):
            ax.plot(hops, [self.grid.get((h, n), float("nan")) for h in hops], marker="o", markersize=3,
                    linewidth=1, alpha=0.8, color=cmap(i / max(1, len(self.loops) - 1)), label=f"looped, {n} loops")
        ax.plot(hops, [_nan(self.at_loops_equal_hops(h)) for h in hops], color="crimson", linewidth=2.5,
                marker="D", label="looped, loops = hops")
        for m in self.multiples:
            ax.plot(hops, [_nan(self.grid.get((h, m * h))) for h in hops], color="darkorange", linewidth=2,
                    marker="^", label=f"looped, loops = {m} x hops")
        for t in sorted(self.exits):
            ax.plot(hops, [_nan(self.exits[t].get(h, (None,))[0]) for h in hops], color="purple", linewidth=1.5,
                    marker="x", label=f"looped, adaptive exit {t:g}")
        if self.baseline:
            ax.plot(hops, [self.baseline.get(h, float("nan")) for h in hops], "k--", marker="s",
                    label="baseline (no loop, same parameters)")
        if self.floor:
            ax.plot(hops, [self.floor.get(h, float("nan")) for h in hops], ":", color="grey", linewidth=2,
                    label=f"shallow floor (best f^j, j <= {self.trained_hops})")
        ax.axhline(1 / self.n_symbols, color="grey", linestyle="-.", linewidth=1, label=f"chance (1/{self.n_symbols})")
        ax.axvspan(0.5, self.trained_hops + 0.5, color="0.9", zorder=0, label="trained hop counts")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(hops)
        style_axes(ax, xlabel="hops (problem depth)", ylabel="accuracy", legend="outside",
                   title=title or f"More loops solve deeper problems: trained on <= {self.trained_hops} hops")
        return save_figure(fig, path)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def report_from_points(points: Sequence, baseline_points: Sequence = (), trained_hops: int = 4,
                       loops: Sequence[int] = (), n_symbols: int = 16, limit: float | None = None,
                       loops_per_hop: Sequence[int] = (1,)) -> DepthReport:
    """A DepthReport from lm-eval points of pointer_k<hops> tasks (other tasks are ignored)."""
    from evals.task_data import shallow_floor, task_hops

    grid, base, floor, exits = {}, {}, {}, {}
    for p in points:
        h = task_hops(p.task) if p.task.startswith("pointer_k") else None
        if h is None or "acc" not in p.metrics:
            continue
        if p.exit_threshold is not None:
            exits.setdefault(p.exit_threshold, {})[h] = (p.metrics["acc"], p.mean_loops)
            continue
        grid[(h, p.n_loops)] = p.metrics["acc"]
        fl = shallow_floor(p.task, trained_hops, limit)
        if fl is not None:
            floor[h] = fl
    for p in baseline_points:
        h = task_hops(p.task) if p.task.startswith("pointer_k") else None
        if h is not None and p.exit_threshold is None and "acc" in p.metrics:
            base[h] = p.metrics["acc"]
    return DepthReport(grid, base, floor, trained_hops, n_symbols, sorted(set(loops)), list(loops_per_hop), exits)
