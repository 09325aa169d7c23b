"""Configuration of the depth-extrapolation experiment (jobs/depth.py): two pretraining configs of
the one trainer (the looped model and its parameter-matched baseline) and how to evaluate them."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from ..config import PretrainConfig, Section


def _pretrain(path: str) -> PretrainConfig:
    return PretrainConfig.from_dict({"extends": path})


class DepthConfig(Section):
    """Train a looped model and a non-looped baseline of about its size (two pretraining runs),
    then score both with lm-eval on pointer_k1..pointer_k<eval_max_hops>: the looped model at every
    loop count of eval_loops and at loops = hops, the baseline in its one pass."""

    name: str = "depth"
    """Name of the report's MLflow run; the training runs are <name>-rdt and <name>-baseline."""
    root: str = "./runs/depth"
    """Run root of both runs and of the evaluation (one MLflow store)."""
    experiment: str = "mythos-depth"
    """MLflow experiment of the report run (the training runs log to mythos-pretrain)."""
    rdt: PretrainConfig = Field(default_factory=lambda: _pretrain("jobs/configs/reasoning.yaml"))
    """The looped model's pretraining config (e.g. {extends: jobs/configs/reasoning.yaml, train:
    {steps: 3000}}); its run root is set to `root`."""
    baseline: PretrainConfig | None = Field(default_factory=lambda: _pretrain("jobs/configs/reasoning-baseline.yaml"))
    """The baseline's pretraining config; null: no baseline."""
    eval_loops: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], min_length=1)
    eval_loops_per_hop: list[int] = Field(default_factory=lambda: [1])
    """The looped model is also scored at loops = m x hops for each m ([1, 2]: k and 2k loops)."""
    eval_exit_thresholds: list[float] = Field(default_factory=list)
    """Adaptive exit thresholds (relative state change), capped at the largest of eval_loops."""
    eval_exit_on: Literal["all", "last"] = "last"
    """Which positions must converge for the exit: all, or the answering (last) one."""
    eval_max_hops: int = Field(16, ge=1, le=16)
    """Evaluation tasks pointer_k1..pointer_k<eval_max_hops> (1..16 exist)."""
    eval_limit: int | None = Field(200, ge=1)
    """Problems per hop count (200 exist per task)."""
    eval_cpus_per_task: float = Field(0.5, gt=0)

    def check(self) -> None:
        self.need(all(n >= 1 for n in self.eval_loops), "eval_loops", "must be ints >= 1", self.eval_loops)
        self.need(1 in self.eval_loops_per_hop and all(m >= 1 for m in self.eval_loops_per_hop),
                  "eval_loops_per_hop", "must hold 1 (loops = hops) and ints >= 1", self.eval_loops_per_hop)
        self.need(all(t > 0 for t in self.eval_exit_thresholds), "eval_exit_thresholds", "must be > 0",
                  self.eval_exit_thresholds)
        self.need(self.rdt.data.source == "pointer", "rdt.data.source", "must be pointer (the reasoning corpus)",
                  self.rdt.data.source)

    def preflight(self) -> None:
        """The checks against this machine (see mythos_platform/preflight.py), before any Ray work."""
        from ..preflight import writable_folder

        writable_folder(self.root, "root")
        rdt, base = self.stage_configs()
        rdt.preflight("rdt.")
        if base is not None:
            base.preflight("baseline.")

    def stage_configs(self) -> tuple[PretrainConfig, PretrainConfig | None]:
        """The two pretraining configs, under this root, with their run names."""
        root = str(Path(self.root).resolve())

        def under_root(cfg: PretrainConfig, role: str) -> PretrainConfig:
            return cfg.updated({"run.root": root, "run.name": cfg.run.name or f"{self.name}-{role}"})

        return under_root(self.rdt, "rdt"), (under_root(self.baseline, "baseline") if self.baseline else None)
