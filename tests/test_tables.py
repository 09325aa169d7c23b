"""The one table writer (CSV and markdown) and the one figure style every report uses."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from mythos_platform.figures import DPI, PANEL_SIZE, new_figure, new_panels, save_figure, style_axes
from mythos_platform.tables import MISSING, format_cell, frame, is_missing, markdown_row, markdown_table, to_csv

COLS = ["task", "n_loops", "acc"]


def test_format_cell_numbers_missing_and_text():
    assert format_cell(0.5) == "0.500" and format_cell(1 / 3, ".2f") == "0.33" and format_cell(3e-4, ".4g") == "0.0003"
    assert format_cell(np.float32(0.25)) == "0.250" and format_cell(np.float64(2.0), ".4g") == "2"
    assert format_cell(7) == "7" and format_cell(np.int64(12345), ".4g") == "12345"  # ints are never rounded
    assert format_cell(True) == "True" and format_cell("0.5 @ 2.0") == "0.5 @ 2.0"
    assert format_cell(None) == format_cell(float("nan")) == format_cell(np.nan) == MISSING
    assert format_cell(None, missing="") == ""
    assert format_cell(float("inf")) == "inf"
    assert is_missing(None) and is_missing(math.nan) and not is_missing(0) and not is_missing("")


def test_frame_takes_mappings_sequences_and_dataframes_in_column_order():
    rows = [{"acc": 0.5, "task": "a", "extra": "ignored", "n_loops": 1}, ["b", 2, None], {"task": "c"}]
    df = frame(rows, COLS)
    assert list(df.columns) == COLS and df.shape == (3, 3)
    assert df.iloc[0].tolist() == ["a", 1, 0.5] and df.iloc[2].tolist() == ["c", None, None]
    assert isinstance(df.iloc[1, 1], int)  # object dtype: an int column with a gap stays int
    again = frame(pd.DataFrame({"acc": [0.1], "n_loops": [4], "task": ["d"]}), COLS)
    assert list(again.columns) == COLS and again.iloc[0].tolist() == ["d", 4, 0.1]
    with pytest.raises(ValueError, match="2 cells"):
        frame([["a", 1]], COLS)


def test_csv_values_order_and_empty_cells():
    rows = [{"task": "a", "n_loops": 1, "acc": 1 / 3}, ["b,c", 16, None], ["d", None, float("nan")]]
    text = to_csv(rows, COLS)
    assert text == 'task,n_loops,acc\na,1,0.3333333333333333\n"b,c",16,\nd,,\n'  # full precision, quoted comma
    assert to_csv(rows[:1], COLS, headers=["T", "N", "A"]).splitlines()[0] == "T,N,A"
    assert to_csv([], COLS) == "task,n_loops,acc\n"
    back = pd.read_csv(io.StringIO(text))
    assert list(back.columns) == COLS and back["n_loops"].tolist()[:2] == [1, 16]


def test_markdown_table_format_headers_and_missing():
    rows = [{"task": "a", "n_loops": 1, "acc": 0.5}, ["b", None, float("nan")], ["c|d", 2, "0.1 @ 2 loops"]]
    md = markdown_table(rows, COLS)
    assert md == ("| task | n_loops | acc |\n|---|---|---|\n| a | 1 | 0.500 |\n| b | — | — |\n"
                  "| c\\|d | 2 | 0.1 @ 2 loops |\n")
    named = markdown_table(rows[:1], COLS, headers=["task", "loops", "accuracy"], spec=".4g", missing="")
    assert named.splitlines()[0] == "| task | loops | accuracy |" and named.splitlines()[2] == "| a | 1 | 0.5 |"
    assert markdown_table([], COLS) == "| task | n_loops | acc |\n|---|---|---|\n"
    assert markdown_row(["x", 1, "two\nlines"]) == "| x | 1 | two lines |"
    with pytest.raises(ValueError, match="2 headers"):
        markdown_table(rows, COLS, headers=["a", "b"])


def test_figures_share_one_style(tmp_path):
    fig, ax = new_figure()
    assert tuple(fig.get_size_inches()) == PANEL_SIZE and fig.dpi == DPI
    ax.plot([1, 2], [3, 4], label="line")
    style_axes(ax, title="t", xlabel="x", ylabel="y")
    assert ax.get_title() == "t" and ax.get_xlabel() == "x" and ax.get_legend() is not None
    png = save_figure(fig, tmp_path / "sub" / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    fig2, axes = new_panels(2)
    assert len(axes) == 2 and fig2.get_size_inches()[0] == 2 * PANEL_SIZE[0]
    style_axes(axes[0], legend="outside")  # nothing labelled: no legend
    assert axes[0].get_legend() is None
    with pytest.raises(ValueError):
        axes[1].plot([0], [0], label="p")
        style_axes(axes[1], legend="above")
