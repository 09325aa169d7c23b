"""`LoopEvalConfig`: what the evaluation job scores (a model, tasks, loop settings) and on what
resources; the section of `jobs/evaluate.py` (`--config jobs/configs/evaluate-debug.yaml`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ..config import Section

__all__ = ["LoopEvalConfig"]


class LoopEvalConfig(Section):
    """lm-eval tasks scored at several inference loop counts (and adaptive-exit thresholds), one
    Ray task per loop setting, logged to one MLflow run."""

    model: str = ""
    """A model folder or an MLflow URI (models:/mythos-rdt@champion)."""
    loops: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    """Inference loop counts; every task is scored at each."""
    tasks: list[str] = Field(default_factory=lambda: ["multihop"])
    """Task, tag or group names: local ones (evals/tasks) or lm-eval stock tasks."""
    exit_thresholds: list[float] = Field(default_factory=list)
    """Adaptive exit thresholds, each run with n_loops = exit_max_loops as the cap."""
    exit_on: Literal["all", "last"] = "all"
    """Adaptive exit: "all" positions converge, or the "last" of each sequence (one-token answers)."""
    exit_max_loops: int | None = None
    """Loop cap of the adaptive runs (null: the largest of `loops`)."""
    loops_per_hop: list[int] = Field(default_factory=list)
    """Also score every task of one hop count k (multihop_k*, pointer_k*) at n_loops = m * k for each
    m here: [1] adds loops = hops, [1, 2] also twice as many loops as hops."""
    limit: float | None = None
    """Examples per task, as lm-eval's --limit: a count (>= 1, kept as an int) or a fraction < 1; null: all."""
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (bf16 on CUDA, fp32 otherwise)."""
    cpus_per_task: float = 0.5
    """CPUs each Ray task asks for (fractions allowed: 0.5 fits four at once on 2 CPUs)."""
    gpus_per_task: float = 0.0
    include_path: list[str] = Field(default_factory=list)
    """Extra folders of task YAMLs."""
    bootstrap_iters: int = 1000
    """lm-eval's bootstrap iterations for stderrs (0: none)."""
    run_root: str = "./runs/eval"
    """Results folder (<run_root>/eval/<run_name>); the embedded MLflow store lives here."""
    tracking_uri: str | None = None
    """MLflow store, also for models:/ references (null: MLFLOW_TRACKING_URI or the run root's)."""
    experiment: str = "mythos-eval"
    run_name: str | None = None
    """MLflow run name and results folder (null: from the time)."""
    track: bool = True
    """Log to MLflow."""

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, v: float | None) -> float | int | None:
        """A limit >= 1 is a count of examples: an int, as lm-eval and the task readers take it."""
        return int(v) if v is not None and v >= 1 else v

    def check(self) -> None:
        self.need(bool(self.model), "model", "give a model folder or an MLflow URI (models:/mythos-rdt@champion)",
                  self.model)
        self.need(bool(self.loops) and all(n >= 1 for n in self.loops), "loops", "must be positive ints",
                  self.loops)
        self.need(bool(self.tasks), "tasks", "give at least one task, tag or group name", self.tasks)
        self.need(all(t >= 0 for t in self.exit_thresholds), "exit_thresholds", "must be >= 0",
                  self.exit_thresholds)
        self.need(self.exit_max_loops is None or self.exit_max_loops >= 1, "exit_max_loops", "must be >= 1 or null",
                  self.exit_max_loops)
        self.need(all(m >= 1 for m in self.loops_per_hop), "loops_per_hop", "must be positive ints",
                  self.loops_per_hop)
        self.need(self.limit is None or self.limit > 0, "limit", "must be > 0 or null", self.limit)
        self.need(self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        self.need(self.cpus_per_task > 0, "cpus_per_task", "must be > 0", self.cpus_per_task)
        self.need(self.gpus_per_task >= 0, "gpus_per_task", "must be >= 0", self.gpus_per_task)
        self.need(self.bootstrap_iters >= 0, "bootstrap_iters", "must be >= 0", self.bootstrap_iters)
        self.need(bool(self.experiment), "experiment", "must be a non-empty name")

    def preflight(self) -> None:
        """The checks against this machine (see mythos_platform/preflight.py), before any Ray work."""
        from ..preflight import writable_folder

        writable_folder(self.run_root, "run_root")

    @property
    def exit_cap(self) -> int:
        """The loop cap of the adaptive-exit runs."""
        return self.exit_max_loops or max(self.loops)
