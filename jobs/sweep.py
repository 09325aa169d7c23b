"""Sweep loop depth, LoRA rank and learning rate with Ray Tune; register the winner in MLflow.

    python jobs/sweep.py --config jobs/configs/sweep-debug.yaml [--set search.num_samples=2 --set base.train.steps=60]
    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/configs/sweep-debug.yaml

Each trial is a full TorchTrainer run of the pretraining spine; ASHA stops weak trials on the
validation loss. Re-running with the same sweep name and root resumes a stopped sweep. The
configuration, including every search-space entry, is validated before any Ray work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ray job submit`

from mythos_platform.config import ConfigError  # noqa: E402
from mythos_platform.tune.config import load_sweep_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/sweep-debug.yaml", help="YAML sweep file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a value, e.g. --set base.train.steps=60 or "
                         "--set space.model.overrides.lora_rank=[4,8] (repeatable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_sweep_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mythos_platform.tune import print_sweep_summary, run_sweep

    res = run_sweep(cfg)
    print_sweep_summary(res, cfg.search.metric)
    return 0 if res.best is not None else 1


if __name__ == "__main__":
    sys.exit(main())
