"""Depth extrapolation: do more loops at inference solve deeper problems than were trained?"""

from .config import DepthConfig
from .experiment import DepthResult, run_depth_experiment

__all__ = ["DepthConfig", "DepthResult", "run_depth_experiment"]
