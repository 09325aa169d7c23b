"""Configuration of the depth-extrapolation experiment (jobs/depth.py): two pretraining configs of
the one trainer (the looped model and its parameter-matched baseline) and how to evaluate them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import PretrainConfig, Section, _join, load_config


@dataclass
class DepthConfig(Section):
    """Train a looped model and a non-looped baseline of about its size (two pretraining runs),
    then score both with lm-eval on pointer_k1..pointer_k<eval_max_hops>: the looped model at every
    loop count of eval_loops and at loops = hops, the baseline in its one pass."""

    name: str = "depth"
    """Name of the report's MLflow run."""
    root: str = "./runs/depth"
    """Run root of both runs and of the evaluation (one MLflow store)."""
    experiment: str = "mythos-depth"
    """MLflow experiment of the report run (the training runs log to mythos-pretrain)."""
    rdt_config: str = "jobs/configs/reasoning.yaml"
    rdt_overrides: list[str] = field(default_factory=list)
    baseline_config: str | None = "jobs/configs/reasoning-baseline.yaml"
    """null: no baseline."""
    baseline_overrides: list[str] = field(default_factory=list)
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    eval_loops_per_hop: list[int] = field(default_factory=lambda: [1])
    """The looped model is also scored at loops = m x hops for each m ([1, 2]: k and 2k loops)."""
    eval_exit_thresholds: list[float] = field(default_factory=list)
    """Adaptive exit thresholds (relative state change), capped at the largest of eval_loops."""
    eval_exit_on: Literal["all", "last"] = "last"
    """Which positions must converge for the exit: all, or the answering (last) one."""
    eval_max_hops: int = 16
    """Evaluation tasks pointer_k1..pointer_k<eval_max_hops> (1..16 exist)."""
    eval_limit: int | None = 200
    """Problems per hop count (200 exist per task)."""
    eval_cpus_per_task: float = 0.5

    def check(self, path: str) -> None:
        for key in ("rdt_config", "baseline_config"):
            value = getattr(self, key)
            self.need(value is None or Path(value).is_file(), _join(path, key), "config file does not exist", value)
        self.need(1 <= self.eval_max_hops <= 16, _join(path, "eval_max_hops"), "must be in 1..16", self.eval_max_hops)
        self.need(bool(self.eval_loops) and all(n >= 1 for n in self.eval_loops), _join(path, "eval_loops"),
                  "must be a non-empty list of ints >= 1", self.eval_loops)
        self.need(1 in self.eval_loops_per_hop and all(m >= 1 for m in self.eval_loops_per_hop),
                  _join(path, "eval_loops_per_hop"), "must hold 1 (loops = hops) and ints >= 1", self.eval_loops_per_hop)
        self.need(all(t > 0 for t in self.eval_exit_thresholds), _join(path, "eval_exit_thresholds"),
                  "must be > 0", self.eval_exit_thresholds)
        self.need(self.eval_limit is None or self.eval_limit >= 1, _join(path, "eval_limit"), "must be >= 1 or null",
                  self.eval_limit)
        self.need(self.eval_cpus_per_task > 0, _join(path, "eval_cpus_per_task"), "must be > 0",
                  self.eval_cpus_per_task)
        self.stage_configs()

    def stage_configs(self) -> tuple[PretrainConfig, PretrainConfig | None]:
        """The two pretraining configs, under this root (ConfigError names the bad override)."""
        root = str(Path(self.root).resolve())
        rdt = load_config(self.rdt_config, [*self.rdt_overrides, f"run.root={root}"], cls=PretrainConfig)
        base = None
        if self.baseline_config:
            base = load_config(self.baseline_config, [*self.baseline_overrides, f"run.root={root}"],
                               cls=PretrainConfig)
        self.need(rdt.data.source == "pointer", "rdt_config", "must train on data.source=pointer",
                  rdt.data.source)
        return rdt, base
