"""The whole life cycle in one job, on the reasoning model: pretrain (with a baseline) -> sweep ->
evaluate at several loop counts on 1..16 hops -> deploy -> one deep question at two loop counts.

    python jobs/pipeline.py --config jobs/configs/pipeline-debug.yaml [--set KEY=VALUE ...]
    ray job submit --working-dir . -- python jobs/pipeline.py --set root=$PWD/runs/pipeline --set keep_serving=false

On the embedded defaults (a private local Ray on 127.0.0.1, SQLite MLflow, the generated reasoning
corpus) it takes about 8 minutes on 2 CPUs, prints a summary, and keeps the endpoint up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mythos_platform.config import ConfigError, load_config  # noqa: E402
from mythos_platform.pipeline import PipelineConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="jobs/configs/pipeline-debug.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, cls=PipelineConfig)
        from mythos_platform.pipeline import _stage_configs

        _stage_configs(cfg, Path(cfg.root).resolve())  # every stage's config, before any Ray work
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mythos_platform.pipeline import print_summary, run_pipeline

    summary = run_pipeline(cfg)
    print_summary(summary, cfg.metric, keep_serving=cfg.keep_serving)
    sys.stdout.flush()
    if cfg.keep_serving:
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        # Ray Tune and Train leave their own SIGINT handlers installed after their stages: one
        # Ctrl-C would then only print Tune's message while the endpoint keeps serving
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        from ray import serve

        serve.shutdown()
        print("[mythos pipeline] endpoint stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
