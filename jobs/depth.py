"""Depth extrapolation: a looped model and a parameter-matched baseline on pointer chasing.

    python jobs/depth.py --config jobs/configs/depth-extrapolation.yaml [--set KEY=VALUE ...]
    ray job submit --working-dir . -- python jobs/depth.py --set root=$PWD/runs/depth

Two runs of the one trainer (jobs/configs/reasoning.yaml and reasoning-baseline.yaml) train side
by side on problems of <= 4 hops; lm-eval then scores both on 1..16 hops, the looped model at
every loop count of eval_loops and at loops = hops. Prints the accuracy table; logs the table,
the plot and the runs to MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mythos_platform.config import ConfigError, load_config  # noqa: E402
from mythos_platform.depth.config import DepthConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/depth-extrapolation.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=DepthConfig)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mythos_platform.depth import run_depth_experiment

    res = run_depth_experiment(cfg)
    print("\n" + res.table_md)
    print(f"parameters: {res.params}; wall time {res.seconds / 60:.1f} min")
    print(f"plot: {res.plot_path}\nMLflow run {res.run_id} in {res.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
