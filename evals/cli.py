"""lm-eval's command line with the `mythos` model registered and the local tasks on the path.

    mythos-lm-eval --model mythos --model_args pretrained=runs/debug/export/debug,n_loops=8 \\
        --tasks multihop_k2,multihop_choice --limit 50
    mythos-lm-eval run --model mythos --model_args pretrained=models:/mythos-rdt@champion ...

`mythos-lm-eval` is this module's console script (pyproject [project.scripts]); `python -m
evals.cli` is the same command.

Every argument is lm-eval's (`python -m evals.cli run --help`). What the wrapper adds:
- the model `mythos` (lm-eval 0.4.13 has no plugin entry point for models, so it must be
  imported before lm-eval's CLI runs);
- `--include_path evals/tasks` when no --include_path is given, and `--batch_size 32` when no
  batch size is given (lm-eval's default of 1 is slow for a recurrent model);
- the task names are checked first: an unknown task, or a stock task whose dataset needs an
  unreachable Hugging Face hub, ends in one line and exit status 2, not a traceback; when all
  tasks are local, lm-eval's scan of its ~10k built-in task files is skipped;
- with the hub unreachable, datasets run in offline mode (cached ones still load).
Other failures also end in one line (MYTHOS_EVAL_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import os
import sys

COMMANDS = ("run", "ls", "validate")


def _option_values(argv: list[str], *names: str) -> list[str] | None:
    """Values of an nargs='+' option (`--tasks a b`, `--tasks=a,b`), None when absent."""
    for i, a in enumerate(argv):
        for name in names:
            if a == name:
                vals = []
                for v in argv[i + 1:]:
                    if v.startswith("-"):
                        break
                    vals.append(v)
                return vals
            if a.startswith(name + "="):
                return [a.split("=", 1)[1]]
    return None


def _local_task_manager_only() -> None:
    """Make lm-eval's CLI build TaskManagers without its built-in tasks (all requested tasks are local)."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    class LocalTaskManager(TaskManager):
        def __init__(self, *args, include_defaults: bool = False, **kwargs):
            super().__init__(*args, include_defaults=include_defaults, **kwargs)

    lm_eval.tasks.TaskManager = LocalTaskManager


def main(argv: list[str] | None = None) -> int:
    from evals.catalog import TASKS_DIR, TaskError, explain, resolve_tasks, use_offline_mode_if_hub_unreachable

    argv = list(sys.argv[1:] if argv is None else argv)
    use_offline_mode_if_hub_unreachable()  # before lm_eval / datasets read the environment
    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's fork()ed bootstrap pool can hang beside torch threads
    running = bool(argv) and argv[0] not in ("ls", "validate") and not {"-h", "--help"} & set(argv)
    if running:
        include = _option_values(argv, "--include_path")
        if include is None:
            argv += ["--include_path", str(TASKS_DIR)]
        if _option_values(argv, "--batch_size", "-b") is None:
            argv += ["--batch_size", "32"]
        tasks = _option_values(argv, "--tasks", "-t")
        if tasks and not any(t.endswith(".yaml") or os.path.isdir(t) for t in tasks):
            try:
                resolved = resolve_tasks(tasks, include_path=include)
            except TaskError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            if not resolved.needs_stock:
                _local_task_manager_only()

    import evals  # noqa: F401  (registers the model `mythos`)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except Exception as exc:
        if os.environ.get("MYTHOS_EVAL_DEBUG"):
            raise
        print(f"error: {explain(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
