"""Result tables as CSV and markdown: one copy for every report (evaluation, depth, sweep, benchmarks).

    columns = ["task", "n_loops", "acc"]
    rows = [{"task": "pointer_k1", "n_loops": 1, "acc": 0.5}, ["pointer_k2", 2, None]]
    to_csv(rows, columns)              # 'task,n_loops,acc\\npointer_k1,1,0.5\\npointer_k2,2,\\n'
    markdown_table(rows, columns)      # '| task | n_loops | acc |\\n|---|---|---|\\n| pointer_k1 | 1 | 0.500 |\\n...'

Rows are mappings (cells picked by column name, missing keys empty, extra keys ignored),
sequences in column order, or a pandas DataFrame. Both writers go through one DataFrame
(`frame`), so a table has the same columns, in the same order, in either form.

CSV: pandas' `DataFrame.to_csv`, values written as they are (full precision), None and NaN as
empty cells, '\\n' line ends. Markdown: floats formatted with one format spec, None and NaN as
'—'; strings (cells a caller formatted itself, e.g. 'acc @ loops') pass through.

The markdown writer is our own few lines, not `DataFrame.to_markdown`: that needs `tabulate`
(here only as a dependency of sacrebleu, through lm-eval) and pads every cell to its column's
width, which makes a one-number change rewrite whole tables in diffs and MLflow artifacts.
Compact rows (`| a | b |`) render the same on GitHub and MLflow and stay greppable.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MISSING", "format_cell", "frame", "is_missing", "markdown_row", "markdown_table", "to_csv"]

MISSING = "—"
"""What a markdown table shows for a value that is None or NaN."""


def is_missing(value: Any) -> bool:
    """None, or a NaN of any float type."""
    return value is None or (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)
                             and math.isnan(value))


def format_cell(value: Any, spec: str = ".3f", missing: str = MISSING) -> str:
    """A markdown cell: `missing` for None/NaN, floats by `spec` (e.g. '.3f', '.4g'), others by str()."""
    if is_missing(value):
        return missing
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        return format(value, spec)
    return str(value)


def frame(rows: Iterable[Mapping[str, Any] | Sequence[Any]] | "pd.DataFrame", columns: Sequence[str]) -> "pd.DataFrame":
    """The rows as a DataFrame of `columns` (object dtype: ints stay ints, None stays None)."""
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        return rows.loc[:, list(columns)].astype(object)
    data = []
    for row in rows:
        cells = [row.get(c) for c in columns] if isinstance(row, Mapping) else list(row)
        if len(cells) != len(columns):
            raise ValueError(f"a row has {len(cells)} cells, the table {len(columns)} columns: {cells!r}")
        data.append(cells)
    return pd.DataFrame(data, columns=list(columns), dtype=object)


def to_csv(rows: Iterable[Mapping[str, Any] | Sequence[Any]] | "pd.DataFrame", columns: Sequence[str],
           headers: Sequence[str] | None = None) -> str:
    """CSV text: a header line (`headers`, default the column names), then one line per row."""
    return frame(rows, columns).to_csv(index=False, header=list(headers or columns), na_rep="", lineterminator="\n")


def markdown_row(cells: Iterable[Any]) -> str:
    """One markdown table line, `| a | b |` ('|' in a cell escaped, line breaks folded)."""
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def markdown_table(rows: Iterable[Mapping[str, Any] | Sequence[Any]] | "pd.DataFrame", columns: Sequence[str],
                   headers: Sequence[str] | None = None, spec: str = ".3f", missing: str = MISSING) -> str:
    """A markdown table: the header (`headers`, default the column names), the rule, a line per row;
    cells by `format_cell(value, spec, missing)`. Ends with a newline."""
    head = list(headers or columns)
    if len(head) != len(columns):
        raise ValueError(f"{len(head)} headers for {len(columns)} columns")
    lines = [markdown_row(head), "|" + "---|" * len(head)]
    for record in frame(rows, columns).itertuples(index=False, name=None):
        lines.append(markdown_row(format_cell(v, spec, missing) for v in record))
    return "\n".join(lines) + "\n"
