"""What each `mythos <job>` does with its validated config (see mythos_platform/cli.py): run the
job, print its summary, return the exit code. Ray is imported here, never before the config is
valid."""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def pretrain(cfg, args: argparse.Namespace) -> int:
    from .train import print_summary, run_pretrain

    print_summary(run_pretrain(cfg))
    return 0


def sweep(cfg, args: argparse.Namespace) -> int:
    from .tune import print_sweep_summary, run_sweep

    res = run_sweep(cfg)
    print_sweep_summary(res, cfg.search.metric)
    return 0 if res.best is not None else 1


def depth(cfg, args: argparse.Namespace) -> int:
    from .depth import run_depth_experiment

    res = run_depth_experiment(cfg)
    print("\n" + res.table_md)
    print(f"parameters: {res.params}; wall time {res.seconds / 60:.1f} min")
    print(f"plot: {res.plot_path}\nMLflow run {res.run_id} in {res.tracking_uri}")
    return 0


def pipeline(cfg, args: argparse.Namespace) -> int:
    from .pipeline import print_summary, run_pipeline

    summary = run_pipeline(cfg)
    stop = arm_stop() if cfg.keep_serving else None  # before the summary says "press Ctrl-C"
    print_summary(summary, cfg.metric, keep_serving=cfg.keep_serving)
    sys.stdout.flush()
    if stop is not None:
        from .pipeline import stop_serving

        wait_for_stop(stop)
        stop_serving(cfg.serve.deployment.app_name)
        print("[mythos pipeline] endpoint stopped.")
    return 0


def serve(cfg, args: argparse.Namespace) -> int:
    from .registry import ModelNotFoundError
    from .serve.deploy import example_request, resolve_served_model

    try:  # fail fast here rather than in replicas that retry
        cfg = resolve_served_model(cfg)
    except (ModelNotFoundError, ValueError) as exc:
        print(f"error: model.source: {exc}", file=sys.stderr)
        return 2
    from ray import serve as ray_serve

    from .ray_env import init_ray
    from .serve.deploy import deploy

    init_ray()
    url = deploy(cfg, timeout_s=args.timeout)
    stop = None if args.detach else arm_stop()  # before "Ctrl-C to stop." is printed
    print(f"\nServing {cfg.model.served_name!r} ({cfg.model.source}) at {url}\n")
    print(example_request(url, cfg.model.served_name, cfg.http.api_key_env), flush=True)
    if args.detach:
        print(f"\nDetached: the app stays on the cluster. Stop it with `serve delete {cfg.deployment.app_name}` "
              "or `serve shutdown -y` (RAY_AUTH_MODE=token for a cluster with token auth).")
        return 0
    print("\nCtrl-C to stop.", flush=True)
    wait_for_stop(stop)
    print("stopping ...")
    ray_serve.delete(cfg.deployment.app_name)
    return 0


def arm_stop() -> threading.Event:
    """From now on Ctrl-C (SIGINT) and SIGTERM (`ray job stop`, kill) set the returned event
    instead of raising: armed before a job prints "press Ctrl-C", so a press right after that line
    stops the job the way it said, never as an interruption (a press in the gap between the line
    and the wait used to exit 130). SIGINT is caught even when the process was started in the
    background (where it is ignored by default) and whatever handler an earlier stage left (Ray
    Tune and Train leave theirs installed, and one Ctrl-C would only print Tune's message)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def wait_for_stop(stop: threading.Event) -> None:
    """Block until `stop` (from arm_stop) is set; afterwards a second Ctrl-C interrupts the
    shutdown at once."""
    stop.wait()
    signal.signal(signal.SIGINT, signal.default_int_handler)


def evaluate(cfg, args: argparse.Namespace) -> int:
    """lm-eval at every loop setting of a LoopEvalConfig: 0 when every point ran, 1 when some
    failed, 2 for an unknown task or model (found before any Ray work)."""
    import logging

    from evals.catalog import TaskError, use_offline_mode_if_hub_unreachable
    from mythos.model_ref import ModelNotFoundError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    use_offline_mode_if_hub_unreachable()  # before `datasets` is imported
    from .evaluation import run_loop_eval

    try:
        res = run_loop_eval(cfg)
    except (TaskError, ModelNotFoundError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"\n{res.table_md}\nresults: {res.out_dir}")
    if res.run_id:
        print(f"MLflow run {res.run_id} at {res.tracking_uri}")
    return 1 if res.failures or not res.points else 0




def plan(cfg, args: argparse.Namespace) -> int:
    """Print the memory plan per GPU and the throughput estimate; exit 1 when it does not fit
    (with what overflows and nearby settings that fit), 2 for a bad setting."""
    from .config import ConfigError
    from .plan import Hardware, format_plan, make_plan, overflow_message

    hw = Hardware(gpu_memory_gb=args.gpu_memory, gpu_tflops=args.gpu_tflops, hfu=args.hfu, headroom=args.headroom,
                  runtime_gb=args.runtime_gb, fsdp=args.fsdp, loops=args.loops)
    try:
        p = make_plan(cfg, hw)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plan(p))
    if not p.fits:
        print(f"error: {overflow_message(p)}", file=sys.stderr)
        return 1
    return 0
