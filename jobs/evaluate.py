"""Score a checkpoint with lm-eval at several inference loop counts (accuracy versus loops).

    python jobs/evaluate.py --model runs/debug/export/debug --loops 1,2,4,8,16,32 --tasks multihop
    python jobs/evaluate.py --model models:/mythos-rdt@champion --run-root runs/sweep \\
        --tasks multihop,multihop_choice,multihop_ppl --exit-thresholds 0.01,0.05
    ray job submit --working-dir . -- python jobs/evaluate.py --model <path|models:/name@alias> ...

One Ray task per loop setting (all tasks in one lm-eval run), each of --cpus-per-task CPUs (fractions allowed); progress
lines as they finish; one MLflow run (experiment "mythos-eval") with `<task>/<metric>` at
step = n_loops, the plot and the tables. Tasks: the local ones (multihop = multihop_k1..k8,
multihop_choice, multihop_gen, multihop_ppl; `mythos_local` = all) or lm-eval stock tasks by
name (hellaswag, arc_easy, ...), which need the Hugging Face hub. Exit status: 0 when every
point ran, 1 when some failed, 2 for bad arguments, an unknown task or model.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ray job submit`

from evals.catalog import TaskError, use_offline_mode_if_hub_unreachable  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="model folder or MLflow URI (models:/mythos-rdt@champion)")
    ap.add_argument("--loops", default="1,2,4,8,16,32", help="inference loop counts, e.g. 1,2,4,8")
    ap.add_argument("--tasks", default="multihop", help="task / tag names, comma separated")
    ap.add_argument("--exit-thresholds", default="", help="adaptive-exit thresholds, e.g. 0.01,0.05 (default: none)")
    ap.add_argument("--exit-on", default="all", choices=["all", "last"],
                    help="adaptive exit: all positions must converge, or the last of each sequence")
    ap.add_argument("--exit-max-loops", type=int, default=None,
                    help="loop cap of the adaptive runs (default: the largest of --loops)")
    ap.add_argument("--loops-per-hop", default="",
                    help="also score each task of one hop count k at m*k loops, e.g. 1,2 (default: none)")
    ap.add_argument("--limit", type=float, default=None, help="examples per task (count, or fraction < 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    ap.add_argument("--cpus-per-task", type=float, default=0.5, help="CPUs per Ray task (fractions allowed)")
    ap.add_argument("--gpus-per-task", type=float, default=0.0)
    ap.add_argument("--include-path", action="append", default=[], help="extra folder of task YAMLs (repeatable)")
    ap.add_argument("--run-root", default="./runs/eval", help="results folder; the embedded MLflow store lives here")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow store, also for models:/ references (default: MLFLOW_TRACKING_URI or the run root's)")
    ap.add_argument("--experiment", default="mythos-eval")
    ap.add_argument("--run-name", default=None)
    ap.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    use_offline_mode_if_hub_unreachable()  # before lm_eval/datasets are imported
    from evals.loop_sweep import SweepConfig, parse_list, run_sweep
    from mythos_platform.registry import ModelNotFoundError

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        cfg = SweepConfig(
            model=args.model, loops=parse_list(args.loops), tasks=parse_list(args.tasks, str),
            exit_thresholds=parse_list(args.exit_thresholds, float), exit_max_loops=args.exit_max_loops,
            loops_per_hop=parse_list(args.loops_per_hop), exit_on=args.exit_on,
            limit=limit, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
            cpus_per_task=args.cpus_per_task, gpus_per_task=args.gpus_per_task, include_path=args.include_path,
            run_root=args.run_root, tracking_uri=args.tracking_uri, experiment=args.experiment,
            run_name=args.run_name, track=not args.no_tracking)
        res = run_sweep(cfg)
    except (TaskError, ModelNotFoundError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(res.table_md)
    print(f"results: {res.out_dir}")
    if res.run_id:
        print(f"MLflow run {res.run_id} at {res.tracking_uri}")
    return 1 if res.failures or not res.points else 0


if __name__ == "__main__":
    sys.exit(main())
