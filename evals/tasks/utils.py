"""Helpers the task YAMLs of this folder call with `!function utils.<name>`.

lm-eval imports this file by path (not as `evals.tasks.utils`), so it depends on the standard
library and `datasets` only.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).resolve().parent / "data"


def load_local(file: str, split: str = "test", **_metadata) -> dict[str, datasets.Dataset]:
    """`custom_dataset` loader: {split: rows of data/<file>}. lm-eval passes the task metadata
    (and the model arguments) as extra keywords; they are ignored."""
    path = DATA_DIR / file
    if not path.exists():
        raise FileNotFoundError(f"{path}: task data missing; run `python -m mythos_platform.data.eval_tasks`")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {split: datasets.Dataset.from_list(rows)}
