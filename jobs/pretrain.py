"""Pretrain a Recurrent-Depth Transformer.

    python jobs/pretrain.py --config jobs/configs/debug.yaml [--set train.steps=50 --set model.overrides.n_loops=8]
    ray job submit --working-dir . -- python jobs/pretrain.py --config jobs/configs/debug.yaml

Starts a local Ray (bound to 127.0.0.1) when none is running; under `ray job submit` it uses
the cluster it was submitted to. The configuration is validated before any Ray work starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ray job submit`

from mythos_platform.config import ConfigError, PretrainConfig, load_config  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/debug.yaml", help="YAML experiment file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=PretrainConfig)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mythos_platform.train import print_summary, run_pretrain

    print_summary(run_pretrain(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
