"""Figures: one style for every plot the platform writes (evaluation, depth, sweep, loss curves, benchmarks).

    fig, ax = new_figure()
    ax.plot(steps, losses, label="train/loss")
    style_axes(ax, xlabel="step", ylabel="loss", title="loss")
    save_figure(fig, "runs/x/loss.png")

Figures are built on matplotlib's non-interactive Agg canvas (no display, no pyplot state, safe in
Ray workers and threads) with the tight layout applied whenever they are drawn or saved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["DPI", "PANEL_SIZE", "new_figure", "new_panels", "save_figure", "style_axes"]

PANEL_SIZE = (6.5, 4.5)
"""Inches of one panel; a figure of n panels side by side is n times as wide."""
DPI = 110
GRID_ALPHA = 0.3
TITLE_SIZE = 10
LEGEND_SIZE = 7


def new_panels(n: int, size: tuple[float, float] | None = None) -> tuple[Any, list[Any]]:
    """A Figure on the Agg backend with `n` axes side by side -> (fig, [ax, ...]).
    `size`: the whole figure in inches (default PANEL_SIZE per panel)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    width, height = size or (PANEL_SIZE[0] * n, PANEL_SIZE[1])
    fig = Figure(figsize=(width, height), dpi=DPI, layout="tight")
    return fig, [fig.add_subplot(1, n, i + 1) for i in range(n)]


def new_figure(size: tuple[float, float] | None = None) -> tuple[Any, Any]:
    """A Figure on the Agg backend with one axes -> (fig, ax)."""
    fig, (ax,) = new_panels(1, size)
    return fig, ax


def style_axes(ax: Any, *, title: str = "", xlabel: str = "", ylabel: str = "", legend: str | None = "best") -> None:
    """Labels, title, grid and legend in the one style. `legend`: 'best' (inside, where it hides least),
    'outside' (right of the axes, for many lines) or None; no legend is drawn when nothing has a label."""
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=TITLE_SIZE)
    ax.grid(alpha=GRID_ALPHA)
    if legend is None or not ax.get_legend_handles_labels()[0]:
        return
    if legend == "outside":
        ax.legend(fontsize=LEGEND_SIZE, loc="center left", bbox_to_anchor=(1.0, 0.5))
    elif legend == "best":
        ax.legend(fontsize=LEGEND_SIZE, loc="best")
    else:
        raise ValueError(f"legend must be 'best', 'outside' or None, not {legend!r}")


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """The figure as an image at `path` (format from the suffix, parents created) -> the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
