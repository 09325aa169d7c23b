"""What the local tasks' data files say on their own: rows, hop counts and the score floors.

Pure readers of `evals/tasks/data/<task>.jsonl` (written by `python -m mythos_platform.data.eval_tasks`);
tasks without a local data file have no rows, no hop count and no floor.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache

from .catalog import TASKS_DIR

__all__ = ["floor_start_symbol", "shallow_floor", "task_hops", "task_rows"]


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


def task_hops(task: str) -> int | None:
    """The hop count of a local task whose rows all share one (multihop_k*, pointer_k*), else None."""
    rows = task_rows(task)
    hops = {r.get("hops") for r in rows} if rows else {None}
    return int(hops.pop()) if len(hops) == 1 and None not in hops else None


def floor_start_symbol(task: str, limit: float | None = None) -> float | None:
    """Score of always answering the start symbol, for local multi-hop tasks (None otherwise)."""
    rows = task_rows(task, limit)
    if not rows or "start" not in rows[0] or "answer" not in rows[0]:
        return None
    return sum(r["answer"].strip() == r["start"] for r in rows) / len(rows)


def shallow_floor(task: str, trained_hops: int, limit: float | None = None) -> float | None:
    """The best score of answering f^j(start) for one fixed j < k and j <= trained_hops, on a task
    whose rows carry their chain (pointer_k*): what a model that never goes deeper than it was
    trained still scores, because a random function's orbits fall into short cycles."""
    rows = task_rows(task, limit)
    if not rows or "chain" not in rows[0]:
        return None
    k = int(rows[0]["hops"])
    return max(sum(r["chain"][j] == r["chain"][k] for r in rows) / len(rows) for j in range(min(k, trained_hops + 1)))
