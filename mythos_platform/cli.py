"""The `mythos` command: every job, with the same two flags for its configuration.

    mythos pretrain --config jobs/configs/debug.yaml --set train.steps=50
    mythos sweep    --config jobs/configs/sweep-debug.yaml --set search.num_samples=2
    mythos evaluate --config jobs/configs/evaluate-debug.yaml --model runs/debug/export/debug
    mythos serve    --model models:/mythos-rdt@champion [--detach]
    mythos pipeline [--set keep_serving=false]        # what `make demo` runs
    mythos depth    --config jobs/configs/depth-extrapolation.yaml
    mythos plan     --variant 1t --gpus 384 --ep 384 --ac block --micro-batch 1 --seq-len 2048 --gpu-memory 80

`--config FILE` is a YAML file of the job's config (defaults: the job's shipped debug config) and
each `--set key=value` overrides one dotted key (the value is read as YAML: numbers, lists,
mappings). The config is validated before any Ray work starts; an invalid key or value prints
`error: <dotted key>: ...` and exits with code 2. The scripts in jobs/ are this command for
`ray job submit ... -- python jobs/<job>.py` (a working directory without an installed package).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from .config import ConfigError, load_config


@dataclass(frozen=True)
class Job:
    summary: str
    config_class: str
    """"module:Class" of the job's config (imported when the job runs, so `mythos --help` is fast)."""
    default_config: str | None
    run: str
    """"module:function" taking (config, parsed arguments) and returning the exit code."""
    flags: list[tuple[str, str, str]] = field(default_factory=list)
    """Shorthand flags for a config key: (flag, dotted key, help), e.g. ("--model", "model.source", ...);
    the value is taken as a string (a name or path, not read as YAML), "a,b" as a list for `tasks`."""
    options: Callable[[argparse.ArgumentParser], None] | None = None
    """Flags of the command that are not configuration (e.g. serve's --detach)."""
    runs_job: bool = True
    """False for a command that only reads its config (`plan`): no checks against this machine
    (files, data), no routing of library output to the run root."""


def _serve_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--detach", action="store_true", help="return once healthy, leaving the app on the cluster")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app to become healthy")


def _plan_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default 80)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 TFLOP/s per GPU (default 989, H100)")
    ap.add_argument("--hfu", type=float, default=0.40, help="assumed hardware FLOPs utilisation (default 0.40)")
    ap.add_argument("--headroom", type=float, default=0.10, help="fraction of the GPU kept free (default 0.10)")
    ap.add_argument("--runtime-gb", type=float, default=3.0, help="CUDA context, NCCL, allocator GiB (default 3)")
    ap.add_argument("--fsdp", type=int, default=None, help="FSDP degree (default: every GPU, as the trainer does)")
    ap.add_argument("--loops", type=int, default=None, help="loop count (default: train_loops_max for memory, "
                                                             "train_loops_mean for throughput)")


_PLAN_FLAGS = [("--variant", "model.variant", "model size: debug, 1b, 3b, 10b, 50b, 100b, 500b, 1t"),
               ("--gpus", "scaling.num_workers", "GPUs (one worker each)"),
               ("--ep", "train.expert_parallel", "expert-parallel degree"),
               ("--ac", "train.activation_checkpointing", "activation checkpointing: none, block, iteration"),
               ("--micro-batch", "train.batch_size", "sequences per GPU per micro-batch"),
               ("--seq-len", "data.seq_len", "tokens per sequence"),
               ("--bptt", "model.overrides.bptt_depth", "loop iterations under autograd"),
               ("--dtype", "train.mixed_precision", "bf16 or fp32")]

JOBS: dict[str, Job] = {
    "pretrain": Job("pretrain a Recurrent-Depth Transformer (Ray Train, FSDP2/DDP)",
                    "mythos_platform.config:PretrainConfig", "jobs/configs/debug.yaml",
                    "mythos_platform.commands:pretrain"),
    "sweep": Job("search loop depth, LoRA rank, ... with Ray Tune; register the winner",
                 "mythos_platform.tune.config:SweepConfig", "jobs/configs/sweep-debug.yaml",
                 "mythos_platform.commands:sweep"),
    "evaluate": Job("lm-eval a model at several loop counts, one Ray task per loop setting",
                    "mythos_platform.evaluation.config:LoopEvalConfig", "jobs/configs/evaluate-debug.yaml",
                    "mythos_platform.commands:evaluate",
                    flags=[("--model", "model", "model folder or MLflow URI (models:/name@alias)"),
                           ("--tasks", "tasks", "task names or tags, comma separated: pointer_k4,pointer_k8")]),
    "serve": Job("serve a model behind an OpenAI-style API (Ray Serve)",
                 "mythos_platform.serve.config:ServeConfig", "jobs/configs/serve-debug.yaml",
                 "mythos_platform.commands:serve",
                 flags=[("--model", "model.source", "model folder or MLflow URI (models:/mythos-rdt@champion)")],
                 options=_serve_options),
    "pipeline": Job("the whole life cycle: pretrain -> sweep -> evaluate -> serve -> ask",
                    "mythos_platform.pipeline:PipelineConfig", "jobs/configs/pipeline-debug.yaml",
                    "mythos_platform.commands:pipeline"),
    "depth": Job("depth extrapolation: a looped model and its baseline on 1..16-hop problems",
                 "mythos_platform.depth.config:DepthConfig", "jobs/configs/depth-extrapolation.yaml",
                 "mythos_platform.commands:depth"),
    "plan": Job("memory per GPU and throughput of a training config on a cluster (no Ray)",
                "mythos_platform.config:PretrainConfig", None, "mythos_platform.commands:plan",
                flags=_PLAN_FLAGS, options=_plan_options, runs_job=False),
}


def _flag_value(key: str) -> Callable[[str], str]:
    """A shorthand flag's value as a `--set` whose value is JSON (valid YAML), so that a name such
    as `on` or `1e3` stays a string; `tasks` takes a comma-separated list."""
    if key == "tasks":
        return lambda v: f"{key}={json.dumps(v.replace(',', ' ').split())}"
    return lambda v: f"{key}={json.dumps(v)}"


def _load(ref: str) -> Any:
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def parser(jobs: dict[str, Job] = JOBS, only: str | None = None) -> argparse.ArgumentParser:
    """`mythos <job> ...`, or with `only` the parser of that one job (the scripts in jobs/)."""
    top = argparse.ArgumentParser(prog="mythos", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="job", required=True, metavar="JOB")
    for name, job in jobs.items():
        if only and name != only:
            continue
        ap = sub.add_parser(name, help=job.summary, description=job.summary)
        ap.add_argument("--config", default=job.default_config, help=f"YAML config (default {job.default_config})")
        ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a dotted config key, e.g. --set train.lr=1e-3 (repeatable)")
        for flag, key, text in job.flags:
            ap.add_argument(flag, dest="overrides", action="append", type=_flag_value(key), metavar="VALUE",
                            help=f"{text}; the same as --set {key}=VALUE")
        ap.add_argument("--verbose", action="store_true",
                        help="show every library's output here too (by default it goes to <run root>/logs/)")
        if job.options:
            job.options(ap)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    job = JOBS[args.job]
    try:
        cfg = load_config(args.config, args.overrides, cls=_load(job.config_class))
        if job.runs_job and hasattr(cfg, "preflight"):  # what the config alone cannot tell: folders, files, data size
            cfg.preflight()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .console import finish, route_output
    from .train.loop import NonFiniteLossError

    log = route_output(_run_root(cfg), args.job, args.verbose) if job.runs_job else None
    try:
        try:
            return int(_load(job.run)(cfg, args) or 0)
        finally:
            finish()  # progress bars end where they stand, above whatever is printed next
    except NonFiniteLossError as exc:  # a run stopped on an error a retry would repeat: no traceback
        print(f"error: {getattr(exc, 'cause', None) or exc}", file=sys.stderr)
        return 1
    except Exception:
        if log is not None:
            print(f"[mythos] the libraries' side of this error is in {log}", file=sys.stderr, flush=True)
        raise
    except KeyboardInterrupt as exc:  # Ctrl-C: what was stopped and how to go on, if the job says
        # the exit still shuts the job's Ray down; another SIGINT meanwhile (a second press, or the
        # terminal's Ctrl-C stopping the cluster's processes under it) ends the process at once, as 130
        signal.signal(signal.SIGINT, lambda *_: os._exit(130))
        print(f"\n[mythos] interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr, flush=True)
        return 130


def _run_root(cfg: Any) -> str:
    """Where a job's files go (its `root`, `run.root` or `run_root`); ./runs for a job without one."""
    for get in (lambda c: c.root, lambda c: c.run.root, lambda c: c.run_root):
        try:
            return str(get(cfg))
        except AttributeError:
            continue
    return "./runs"


def run_job(name: str, argv: list[str] | None = None) -> int:
    """What `jobs/<name>.py` runs: `mythos <name>` with the script's arguments."""
    return main([name, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
