"""Depth extrapolation: do more loops at inference solve deeper problems than were trained?"""

from .config import DepthConfig
from .experiment import DepthResult, run_depth_experiment
from .report import DepthReport, report_from_points

__all__ = ["DepthConfig", "DepthReport", "DepthResult", "report_from_points", "run_depth_experiment"]
