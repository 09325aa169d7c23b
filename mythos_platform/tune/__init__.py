"""Ray Tune sweeps over loop depth, LoRA rank and learning rate, with the winner registered in MLflow."""

from .cleanup import Leftovers, leftovers
from .config import AshaConfig, PlotConfig, RegistryConfig, SearchConfig, SweepConfig, load_sweep_config
from .sweep import SweepResult, print_sweep_summary, run_sweep

__all__ = ["AshaConfig", "Leftovers", "PlotConfig", "RegistryConfig", "SearchConfig", "SweepConfig", "SweepResult",
           "leftovers", "load_sweep_config", "print_sweep_summary", "run_sweep"]
