"""`mythos plan` as a script: `python jobs/plan.py [--config FILE] [--set KEY=VALUE ...] [--gpu-memory GIB ...]`
(see mythos_platform/cli.py, or `python jobs/plan.py --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: the working directory of a Ray job

from mythos_platform.cli import run_job  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_job("plan"))
