"""lm-eval integration: the `mythos` model and the local task definitions (depends on `mythos` only).

Importing this package registers the lm-eval model `mythos` (lazily: torch and the model load
only when lm-eval instantiates it). lm-eval 0.4.13 has no plugin entry point for models, so a
command-line run goes through `python -m evals.cli`, which imports this package and then runs
lm-eval's own CLI (adding `--include_path evals/tasks` when none is given).

    from evals import MythosLM, TASKS_DIR, evaluate_tasks

The Ray fan-out over loop counts (MLflow, tables, plots) is the platform's:
`mythos_platform.evaluation` (`jobs/evaluate.py`).
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  (the stock entries: get_model() imports them only into an empty registry)
from lm_eval.api.registry import model_registry

from .catalog import TASKS_DIR, TaskError, TaskUnavailableError, UnknownTaskError, resolve_tasks, task_manager

MODEL_NAME = "mythos"
if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME, target="evals.lm_model:MythosLM")

__all__ = ["MODEL_NAME", "TASKS_DIR", "MythosLM", "TaskError", "TaskUnavailableError", "UnknownTaskError",
           "evaluate_tasks", "resolve_tasks", "task_manager"]


def __getattr__(name: str):
    # heavy imports (torch, the model) only when used
    if name == "MythosLM":
        from .lm_model import MythosLM

        return MythosLM
    if name == "evaluate_tasks":
        from .scoring import evaluate_tasks

        return evaluate_tasks
    raise AttributeError(f"module 'evals' has no attribute {name!r}")
