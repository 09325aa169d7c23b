"""`EvalPoint`, the scores of one task at one loop setting, and the Ray task body that makes them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Sequence

from evals.scoring import evaluate_tasks, primary_metric

from .config import LoopEvalConfig

__all__ = ["EvalPoint", "evaluate_points"]


@dataclass
class EvalPoint:
    """The scores of one task at one loop setting."""

    task: str
    n_loops: int
    exit_threshold: float | None
    metrics: dict[str, float]
    stderr: dict[str, float]
    higher_is_better: dict[str, bool]
    mean_loops: float | None
    n_samples: int
    seconds: float

    @property
    def primary(self) -> str:
        return primary_metric(self.metrics)


def evaluate_points(model_dir: str, tasks: Sequence[str], n_loops: int, exit_threshold: float | None,
                    stock: set[str], cfg: LoopEvalConfig, threads: int = 1) -> list[EvalPoint]:
    """Load the model once and score `tasks` at one loop setting in one lm-eval run (a Ray task
    body, or inline)."""
    import torch

    torch.set_num_threads(max(1, threads))
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from evals.lm_model import MythosLM

    t0 = time.perf_counter()
    lm = MythosLM(pretrained=model_dir, n_loops=n_loops, exit_threshold=exit_threshold, exit_on=cfg.exit_on,
                  batch_size=cfg.batch_size,
                  device=cfg.device, dtype=cfg.dtype, progress=False)
    summary = evaluate_tasks(lm, list(tasks), cfg.include_path, stock=bool(stock & set(tasks)), limit=cfg.limit,
                             bootstrap_iters=cfg.bootstrap_iters)
    seconds = (time.perf_counter() - t0) / len(tasks)
    return [EvalPoint(task, n_loops, exit_threshold, summary[task]["metrics"], summary[task]["stderr"],
                      summary[task]["higher_is_better"], lm.mean_loops_used, summary[task]["n"], seconds)
            for task in tasks]
