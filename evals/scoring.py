"""lm-eval in process: an LM object scored on tasks, and lm-eval's results reduced to what we report.

    from evals import MythosLM, evaluate_tasks
    evaluate_tasks(MythosLM(pretrained="runs/debug/export/debug", n_loops=8), ["multihop_k2"])
"""

from __future__ import annotations

import os
from typing import Sequence

from .catalog import task_manager

PRIMARY_METRICS = ("acc", "exact_match", "bits_per_byte", "perplexity", "word_perplexity")

__all__ = ["PRIMARY_METRICS", "evaluate_tasks", "primary_metric", "summarize"]


def evaluate_tasks(lm, tasks: Sequence[str], include_path=None, stock: bool = False, limit: float | None = None,
                   bootstrap_iters: int = 1000) -> dict[str, dict]:
    """Run lm-eval on `tasks` with an LM object -> {task: {"metrics", "stderr", "higher_is_better", "n"}}."""
    from lm_eval import simple_evaluate

    # lm-eval bootstraps some stderrs in a fork()ed multiprocessing pool; forking a process that
    # runs torch (and Ray) threads can deadlock the child (seen: Ray workers hung on a futex)
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    out = simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager(include_path, stock=stock),
                          limit=limit, log_samples=False, bootstrap_iters=bootstrap_iters)
    return summarize(out)


def summarize(results: dict) -> dict[str, dict]:
    """lm-eval's results dict -> per task: metric values, their stderr, direction and sample count."""
    summary = {}
    for task, values in results["results"].items():
        metrics, stderr = {}, {}
        for key, value in values.items():
            if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, filt = key.split(",", 1)
            name_out = name if filt == "none" else f"{name}.{filt}"
            if name.endswith("_stderr"):
                stderr[name_out.replace("_stderr", "", 1)] = float(value)
            else:
                metrics[name_out] = float(value)
        n = results.get("n-samples", {}).get(task, {})
        summary[task] = {"metrics": metrics, "stderr": stderr, "n": int(n.get("effective", 0) or 0),
                         "higher_is_better": dict(results.get("higher_is_better", {}).get(task, {}))}
    return summary


def primary_metric(metrics: dict[str, float]) -> str:
    """The metric a table shows for a task: the first of PRIMARY_METRICS it has, else the first by name."""
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    return sorted(metrics)[0]
