"""Driver side of pretraining: data, Ray Train TorchTrainer, MLflow run, export.

    result = run_pretrain(load_config("jobs/configs/debug.yaml"))

Re-launching with the same run name resumes: Ray Train finds the run's latest registered
checkpoint under the storage path, and the same MLflow run is continued.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

from ..config import PretrainConfig
from ..data.pipeline import build_datasets
from ..data.sharding import data_config
from ..ray_env import init_ray
from ..tracking import Tracker, git_tags
from .checkpointing import resumable_checkpoint, resume_step
from .loop import NonFiniteLossError
from .worker import stopped_file, train_loop_per_worker

log = logging.getLogger("mythos.train")

RUN_NAME_TAG = "mythos.run_name"
FINISHED_FILE = "pretrain_finished.json"
"""Written into the export folder when a run has finished: its config, last checkpoint and metrics."""


@dataclass
class PretrainResult:
    run_name: str
    run_root: Path
    metrics: dict[str, Any]
    checkpoint_path: str | None
    export_dir: Path
    mlflow_run_id: str | None
    tracking_uri: str


def _run_name(cfg: PretrainConfig) -> str:
    return cfg.run.name or cfg.tracking.run_name or "pretrain"


def run_pretrain(cfg: PretrainConfig, *, datasets: dict[str, Any] | None = None, callbacks: list | None = None,
                 tags: dict[str, str] | None = None, report_evals: bool = False) -> PretrainResult:
    """Train `cfg` on the current Ray cluster (starting a local one if needed).

    For callers that drive many runs (the Tune sweep): `datasets` are prebuilt {"train", "val"}
    Ray Datasets used instead of building them from `cfg.data`; `callbacks` go to Ray Train's
    RunConfig (e.g. a Tune report callback); `tags` are added to a new MLflow run (e.g.
    `mlflow.parentRunId`); `report_evals` makes the workers report metrics to Ray Train at every
    evaluation step too, not only at checkpoint steps.
    """
    cfg.preflight()  # folders, files, enough data: a ConfigError here, not a traceback in a worker
    name = _run_name(cfg)
    run_root = Path(cfg.run.root).resolve()
    run_root.mkdir(parents=True, exist_ok=True)
    storage = cfg.checkpoint.resolved_storage_path(str(run_root))  # a path or a URI (s3://, gs://)
    export_dir = _export_dir(cfg, name, run_root)
    done = None if callbacks else _done_earlier(cfg)
    if done is not None:
        return done
    init_ray()
    if datasets is None:
        train_ds, val_ds = build_datasets(cfg.data, cfg.data.build_tokenizer())
    else:
        train_ds, val_ds = datasets["train"], datasets.get("val")
    datasets = {"train": train_ds, **({"val": val_ds} if val_ds is not None else {})}

    tracker = Tracker(cfg.tracking, run_root)
    resumed = _open_mlflow_run(tracker, cfg, name, tags)
    loop_config = {"cfg": cfg.to_dict(), "run_root": str(run_root), "mlflow_run_id": tracker.run_id,
                   "export_dir": str(export_dir), "report_evals": report_evals, "run_name": name}
    trainer = _torch_trainer(cfg, name, str(storage), loop_config, datasets, callbacks)
    sc = cfg.scaling
    print(f"[mythos] training run '{name}' ({cfg.model.variant}, {sc.num_workers} workers, "
          f"{cfg.train.parallelism}){_resuming(cfg, resumed)}; checkpoints in {storage}/{name}", flush=True)
    stopped = stopped_file(export_dir)
    stopped.unlink(missing_ok=True)
    (export_dir / FINISHED_FILE).unlink(missing_ok=True)  # this launch trains: the earlier result is not it
    try:
        result = fit(trainer)
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise KeyboardInterrupt(f"training run '{name}' stopped (checkpoints in {storage}/{name}); the same "
                                f"command {_relaunch(cfg).format(run='it')}") from None
    except Exception:
        tracker.end("FAILED")
        raise
    if stopped.exists():  # the workers stopped the run (divergence): failed, nothing exported
        tracker.end("FAILED")
        raise NonFiniteLossError(f"training run '{name}' stopped: {json.loads(stopped.read_text())['error']}")
    _finish_mlflow_run(tracker, export_dir, name)
    metrics, checkpoint = _final(result, export_dir)
    res = PretrainResult(name, run_root, metrics, checkpoint, export_dir, tracker.run_id, tracker.uri)
    if export_dir.is_dir():
        (export_dir / FINISHED_FILE).write_text(json.dumps({"config": cfg.to_dict(), "checkpoint": res.checkpoint_path,
                                                             "metrics": res.metrics}, default=str))
    return res


def _resume_step(cfg: PretrainConfig) -> int | None | str:
    """The step a launch of `cfg` resumes from (its newest whole checkpoint), None for step 0, or
    "unknown" where the checkpoints are not a local folder (a URI: Ray Train finds them)."""
    storage = cfg.checkpoint.resolved_storage_path(str(Path(cfg.run.root).resolve()))
    if "://" in storage:
        return "unknown"
    return resume_step(Path(storage) / _run_name(cfg))


def _resuming(cfg: PretrainConfig, mlflow_run_continued: bool) -> str:
    """The start line's note on resuming: from which step, or that an earlier launch left no checkpoint."""
    step = _resume_step(cfg)
    if step == "unknown":
        return " — resuming" if mlflow_run_continued else ""
    if step is not None:
        return f" — resuming from step {step}"
    return " — from step 0: the earlier launch saved no checkpoint" if mlflow_run_continued else ""


def _relaunch(cfg: PretrainConfig) -> str:
    """What the same command does for `cfg`'s run after a stop, with `{run}` for the run's name."""
    step = _resume_step(cfg)
    if step == "unknown":
        return "resumes {run} from its last checkpoint"
    if step is not None:
        return f"resumes {{run}} from step {step}"
    every = cfg.checkpoint.every_steps
    return ("starts {run} again at step 0 (it stopped before its first checkpoint, "
            + (f"due every {every} steps)" if every else "saved only at the end)"))


def _final(result, export_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The run's last metrics and newest checkpoint. Ray Train's Result names the latest checkpoint
    in report order, which starts again at a relaunch, so after a resumed run it can name an older
    checkpoint (and its metrics): here the newest whole checkpoint by step wins, and the metrics are
    the ones rank 0 wrote at the end (training_summary.json)."""
    metrics = dict(result.metrics or {})
    summary = export_dir / "training_summary.json"
    if summary.is_file():
        metrics.update(json.loads(summary.read_text()))
    checkpoint = result.checkpoint.path if result.checkpoint else None
    if checkpoint and Path(checkpoint).is_dir():  # local storage (a URI is taken as Ray names it)
        newest, _ = resumable_checkpoint(checkpoint)
        checkpoint = str(newest) if newest is not None else checkpoint
    return metrics, checkpoint


def _export_dir(cfg: PretrainConfig, name: str, run_root: Path) -> Path:
    return Path(cfg.checkpoint.resolved_export_dir(str(run_root))) / name


def _finished(cfg: PretrainConfig) -> PretrainResult | None:
    """`finished_earlier` for `cfg`, its run name and folders derived from it."""
    name = _run_name(cfg)
    run_root = Path(cfg.run.root).resolve()
    return finished_earlier(cfg, name, run_root, _export_dir(cfg, name, run_root))


def _done_earlier(cfg: PretrainConfig) -> PretrainResult | None:
    """`_finished` for `cfg`, saying so when it did."""
    done = _finished(cfg)
    if done is not None:
        print(f"[mythos] training run '{done.run_name}' finished earlier with this config: using its export "
              f"{done.export_dir}", flush=True)
    return done


def finished_earlier(cfg: PretrainConfig, name: str, run_root: Path, export_dir: Path) -> PretrainResult | None:
    """The result of an earlier launch of this very config that finished: its export holds the
    config it was trained with (FINISHED_FILE) and its MLflow run is FINISHED. A relaunch (the
    pipeline run again after a Ctrl-C in a later stage) then needs no Ray Train run to find that
    nothing is left to do; any change to the config trains (and resumes from checkpoints) as usual."""
    path = export_dir / FINISHED_FILE
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if done.get("config") != cfg.recorded():
        return None
    tracker = Tracker(cfg.tracking, run_root)
    run_id = tracker.find_run(f"tags.`{RUN_NAME_TAG}` = '{name}' and attributes.status = 'FINISHED'")
    if run_id is None:
        return None
    return PretrainResult(name, run_root, done.get("metrics", {}), done.get("checkpoint"), export_dir, run_id,
                          tracker.uri)


def fit(trainer: TorchTrainer):
    """`trainer.fit()`, where one Ctrl-C (SIGINT) raises KeyboardInterrupt in the caller.

    On the main thread, Ray Train installs its own SIGINT handler: the first Ctrl-C asks the run to
    abort and the process then exits with code 1 and no message, and the handler stays installed
    after the run, so that later in the job a Ctrl-C only prints Train's notice. Called on the main
    thread, `fit` runs the trainer on a helper thread instead (where Train installs none) and waits
    with Python's own handler; the workers go with the process (or with the job's cluster)."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        thread = threading.Thread(target=target, name="ray-train-fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.25)
    finally:
        signal.signal(signal.SIGINT, previous)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _open_mlflow_run(tracker: Tracker, cfg: PretrainConfig, name: str, tags: dict[str, str] | None) -> bool:
    """Continue the MLflow run of an earlier launch with this name (True), or start one with the
    config as params and the model's shape as tags (False)."""
    run_id = tracker.find_run(f"tags.`{RUN_NAME_TAG}` = '{name}'")
    if run_id is not None:
        tracker.reopen(run_id)
    else:
        model_cfg = cfg.model.build()
        run_tags = {RUN_NAME_TAG: name, "mythos.job": "pretrain", "mythos.variant": cfg.model.variant,
                    "mythos.attn": model_cfg.attn_type, "mythos.loops.mean": model_cfg.train_loops_mean,
                    "mythos.loops.distribution": model_cfg.loop_distribution,
                    "mythos.loops.bptt": model_cfg.bptt_depth, **git_tags(Path(__file__).resolve().parents[2]),
                    **(tags or {})}
        tracker.start(run_name=name, tags=run_tags)
        tracker.log_params(cfg.to_dict())
        tracker.log_params({"model_resolved": model_cfg.to_dict()})
    tracker.log_dict(cfg.to_dict(), "config/pretrain.json")
    return run_id is not None


def _torch_trainer(cfg: PretrainConfig, name: str, storage: str, loop_config: dict[str, Any],
                   datasets: dict[str, Any], callbacks: list | None) -> TorchTrainer:
    sc = cfg.scaling
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                               resources_per_worker=sc.worker_resources(),
                                               placement_strategy=sc.placement_strategy),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=list(callbacks) if callbacks else None,
        ),
        datasets=datasets,
        dataset_config=data_config(cfg.data.resolved_order),
    )


def _finish_mlflow_run(tracker: Tracker, export_dir: Path, name: str) -> None:
    """The loss curve plot and the exported model as artifacts; the run FINISHED."""
    history = tracker.metric_history("loss")
    if history:
        tracker.log_loss_curve({"loss": history, "val_loss": tracker.metric_history("val_loss")},
                               title=f"{name}: loss by step")
    if export_dir.exists():
        tracker.log_artifact(str(export_dir), artifact_path="model")
    tracker.end("FINISHED")


def print_summary(res: PretrainResult) -> None:
    loss = res.metrics.get("loss")
    val = res.metrics.get("val_loss")
    print("\n[mythos] done.")
    if loss is not None:
        print(f"  final loss {loss:.3f}" + (f", validation loss {val:.3f}" if val is not None else ""))
    if res.metrics.get("val_acc") is not None:
        loops = sorted(k for k in res.metrics if k.startswith("val_acc_loop_"))
        curve = " ".join(f"{res.metrics[k]:.2f}" for k in loops)
        print(f"  validation accuracy {res.metrics['val_acc']:.3f}" + (f" (after loops 1..{len(loops)}: {curve})"
                                                                      if loops else ""))
    print(f"  exported model : {res.export_dir}")
    print(f"  last checkpoint: {res.checkpoint_path}")
    print(f"  MLflow run     : {res.mlflow_run_id} in {res.tracking_uri}")
    if res.tracking_uri.startswith("sqlite:"):
        print(f"  open the UI    : mlflow ui --backend-store-uri {res.tracking_uri} --host 127.0.0.1 --port 5000")


def run_pretrains(cfgs: list[PretrainConfig], driver_cpus: float = 0.05) -> list[PretrainResult]:
    """Several pretraining runs side by side (e.g. a model and its baseline): each `run_pretrain`
    drives its own TorchTrainer from a Ray task of `driver_cpus` CPUs. Each run's workers ask for
    what its `scaling` section says; runs that do not fit at once wait for resources."""
    # runs that finished earlier with the same config are known here, in the driver: no Ray task
    # (a worker process importing the trainer, about 10 s of a 2-core machine) just to find that out.
    # (The pipeline and the depth experiment preflight these configs before any Ray work, and
    # run_pretrain does again for the runs that train.)
    done: dict[int, PretrainResult] = {}
    for i, cfg in enumerate(cfgs):
        result = _done_earlier(cfg)
        if result is not None:
            done[i] = result
    todo = [cfg for i, cfg in enumerate(cfgs) if i not in done]
    trained = iter(_train_side_by_side(todo, driver_cpus) if todo else [])
    return [done[i] if i in done else next(trained) for i in range(len(cfgs))]


def _train_side_by_side(cfgs: list[PretrainConfig], driver_cpus: float) -> list[PretrainResult]:
    init_ray()
    if len(cfgs) == 1:
        return [run_pretrain(cfgs[0])]
    for cfg in cfgs:
        tracker = Tracker(cfg.tracking, Path(cfg.run.root).resolve())
        try:
            tracker.create_experiment()
        except Exception as exc:  # an outage: the runs warn and train on
            log.warning("could not prepare MLflow at %s: %s", tracker.uri, exc)
    remote = ray.remote(run_pretrain).options(num_cpus=driver_cpus, max_retries=0)
    refs = [remote.remote(cfg) for cfg in cfgs]
    try:
        return ray.get(refs)
    except BaseException as exc:
        for ref in refs:
            ray.cancel(ref, force=True)
        if isinstance(exc, KeyboardInterrupt):  # the runs' drivers died with their tasks: end their MLflow runs
            for cfg in cfgs:
                _end_run_of(cfg, "KILLED")
            raise KeyboardInterrupt(_stopped_side_by_side(cfgs)) from None
        raise


def _stopped_side_by_side(cfgs: list[PretrainConfig]) -> str:
    """After Ctrl-C: which runs stopped (a run may have finished before it) and what the same command does."""
    done_flags = [_finished(c) is not None for c in cfgs]
    finished = [c for c, done in zip(cfgs, done_flags) if done]
    stopped = [c for c, done in zip(cfgs, done_flags) if not done]
    names = lambda group: ", ".join(repr(_run_name(c)) for c in group)  # noqa: E731
    if not stopped:
        return f"training runs {names(finished)} had finished; the same command goes on from them"
    done = f" ({names(finished)} had finished)" if finished else ""
    what = " and ".join(_relaunch(c).format(run=repr(_run_name(c))) for c in stopped)
    return f"training run{'s' if len(stopped) > 1 else ''} {names(stopped)} stopped{done}; the same command {what}"


def _end_run_of(cfg: PretrainConfig, status: str) -> None:
    """Mark the MLflow run of `cfg`'s run name `status` if it is still RUNNING."""
    tracker = Tracker(cfg.tracking, Path(cfg.run.root).resolve())
    run_id = tracker.find_run(f"tags.`{RUN_NAME_TAG}` = '{_run_name(cfg)}' and attributes.status = 'RUNNING'")
    if run_id is not None:
        Tracker(cfg.tracking, Path(cfg.run.root).resolve(), run_id=run_id).end(status)
