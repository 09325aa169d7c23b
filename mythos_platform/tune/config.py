"""Typed configuration of a Ray Tune sweep over the pretraining spine.

    cfg = load_sweep_config("jobs/configs/sweep-debug.yaml", ["search.num_samples=2"])
    cfg.pretrain_base()            # the PretrainConfig every trial starts from
    cfg.params()                   # the searched keys, validated

A sweep's `base` is the pretraining config every trial starts from, in that config's own shape
(usually `extends:` a pretraining YAML and changes some values), and `space` names dotted keys
of it to search (see `mythos_platform.tune.space`). Validation builds the base and checks every
search-space entry before any Ray work starts; errors name the dotted key (`base.train.lr`).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from ..config import ConfigError, PretrainConfig, Section, load_config
from .space import Param, grid_size, parse_space, validate_space


class SearchConfig(Section):
    """How trials are drawn from the space and what they compete on."""

    algorithm: Literal["grid", "random", "optuna"] = "grid"
    """grid: every combination of the lists; random: lists crossed, ranges sampled; optuna: TPE (needs optuna)."""
    num_samples: int = 1
    """grid: repeats of the grid; random/optuna: trials (times the grid, for random)."""
    seed: int | None = 0
    """Seed of random/optuna sampling."""
    metric: str = "val_loss"
    """The metric trials are ranked and stopped on (reported at every evaluation step)."""
    mode: Literal["min", "max"] = "min"
    max_concurrent_trials: int | None = None
    """null: as many trials as the cluster's CPUs (GPUs) hold at once, see `trial_cpus` and base.scaling."""

    def check(self) -> None:
        self.need(self.num_samples >= 1, "num_samples", "must be >= 1", self.num_samples)
        self.need(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1,
                  "max_concurrent_trials", "must be >= 1 or null", self.max_concurrent_trials)
        if self.algorithm == "optuna":
            try:
                import optuna  # noqa: F401
            except ImportError:
                raise ConfigError("algorithm", "optuna is not installed (pip install optuna -c "
                                                            "constraints.txt), or use grid / random") from None


class AshaConfig(Section):
    """Asynchronous successive halving on the search metric, in training steps."""

    enabled: bool = True
    grace_period: int = 100
    """Steps every trial runs before it can be stopped (the first rung)."""
    reduction_factor: float = 2.0
    """Keep the best 1/reduction_factor of trials at each rung (rungs at grace_period * rf^k)."""
    brackets: int = 1
    max_t: int | None = None
    """Steps of a full trial; null: base.train.steps."""

    def check(self) -> None:
        self.need(self.grace_period >= 1, "grace_period", "must be >= 1", self.grace_period)
        self.need(self.reduction_factor > 1, "reduction_factor", "must be > 1", self.reduction_factor)
        self.need(self.brackets >= 1, "brackets", "must be >= 1", self.brackets)
        self.need(self.max_t is None or self.max_t >= self.grace_period, "max_t",
                  f"must be >= grace_period={self.grace_period} or null", self.max_t)


class RegistryConfig(Section):
    """Where the best trial's exported model is registered (evaluation and serving resolve it)."""

    enabled: bool = True
    model_name: str = "mythos-rdt"
    alias: str = "champion"
    """Moves to the new version only if it beats the alias's current version on search.metric."""

    def check(self) -> None:
        self.need(bool(self.model_name), "model_name", "must be a name")
        self.need(bool(self.alias) and not self.alias.isdigit(), "alias",
                  "must be a name (not a number)", self.alias)


class PlotConfig(Section):
    """The parent run's plot: the metric against `x`, one line per value of `group`."""

    x: str = "model.overrides.train_loops_mean"
    group: str = "model.overrides.lora_rank"


class SweepConfig(Section):
    """Everything `jobs/sweep.py` needs."""

    name: str = "sweep"
    """The sweep's name: its Tune experiment, MLflow parent run and trial-name prefix. Re-running
    a sweep with the same name and root resumes it."""
    root: str = "./runs/sweep"
    """Run root shared by every trial: MLflow store + registry, checkpoints, exports, Tune state."""
    experiment: str = "mythos-sweep"
    """MLflow experiment of the parent run and its child (trial) runs."""
    base: PretrainConfig = Field(default_factory=PretrainConfig)
    """The pretraining config the trials start from, e.g. {extends: jobs/configs/debug.yaml, train:
    {steps: 200}}. The sweep sets each trial's run root and name, MLflow experiment and run name,
    and checkpoint paths (under the sweep's root)."""
    space: dict[str, Any] = Field(default_factory=dict)
    """Dotted pretrain-config keys to search (see mythos_platform.tune.space)."""
    search: SearchConfig = Field(default_factory=SearchConfig)
    asha: AshaConfig = Field(default_factory=AshaConfig)
    trial_cpus: float = 0.1
    """CPUs of each trial's driver (the Tune function that runs the TorchTrainer); its train workers
    ask for base.scaling.cpus_per_worker each on top, and the Train controller for none."""
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    plot: PlotConfig = Field(default_factory=PlotConfig)

    def check(self) -> None:
        self.need(bool(self.name) and "/" not in self.name, "name", "must be a name without '/'",
                  self.name)
        self.need(bool(self.root), "root", "must be a path")
        self.need(self.trial_cpus > 0, "trial_cpus", "must be > 0", self.trial_cpus)
        self.need(bool(self.space), "space", "must name at least one key to search")
        base = self.pretrain_base()
        self.need(base.train.eval_every >= 1, "base.train.eval_every",
                  f"must be >= 1: trials report {self.search.metric} at evaluation steps")
        self.need(base.train.eval_every <= self.asha.grace_period or not self.asha.enabled, "asha.grace_period",
                  f"must be >= base.train.eval_every={base.train.eval_every} (a rung needs an evaluation)",
                  self.asha.grace_period)
        params = self.params()
        if self.asha.enabled and self.asha.max_t is None and any(p.key == "train.steps" for p in params):
            raise ConfigError("asha.max_t", "must be set when train.steps is searched")

    def preflight(self) -> None:
        """The checks against this machine (see mythos_platform/preflight.py), before any Ray work."""
        from ..preflight import writable_folder

        writable_folder(self.root, "root")
        self.pretrain_base().preflight("base.")

    # --- derived ------------------------------------------------------------------------
    def base_dict(self) -> dict[str, Any]:
        """The base pretrain config as a plain dict, with what the sweep sets for every trial."""
        data = self.base.to_dict()
        data["run"]["root"] = os.path.abspath(self.root)
        data["tracking"].update(experiment=self.experiment, run_name=self.name)
        data["checkpoint"].update(storage_path=None, export_dir=None)  # trials keep theirs under the sweep root
        return data

    def pretrain_base(self) -> PretrainConfig:
        return PretrainConfig.from_dict(self.base_dict(), "base")

    def params(self) -> list[Param]:
        params = parse_space(self.space)
        validate_space(params, self.base_dict(), self.search.algorithm)
        return params

    def num_trials(self) -> int:
        return grid_size(self.params(), self.search.algorithm, self.search.num_samples)


def load_sweep_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> SweepConfig:
    """Defaults < YAML at `path` < `overrides` ('a.b=c'), with the base and the space validated."""
    return load_config(path, overrides, cls=SweepConfig)
