"""The training worker: what Ray Train's TorchTrainer runs on every rank.

    train_loop_per_worker(config) == Trainer(config).run()

`run` composes the steps: build (model, optimizer, schedule) -> restore (the last Ray Train
checkpoint, if any) -> open_data (this rank's shard from the restored position, validation
batches) -> per optimizer step: step, then at log / eval / checkpoint steps log (metrics, with
evaluate, to MLflow and the progress line) and report (to Ray Train, with a checkpoint) -> export.

The pieces of a step (loss, loop schedule, validation, model preparation) live in `loop.py`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import ray.train
import torch

from mythos.loop_schedule import LoopSample
from mythos.moe import load_imbalance
from mythos.sizing import flops_per_token

from ..config import PretrainConfig
from ..perf import matmul_peak
from ..tracking import Tracker
from .checkpointing import (
    CheckpointError,
    TrainState,
    export_model,
    load_checkpoint,
    resumable_checkpoint,
    save_checkpoint,
)
from .faults import Fault
from .loop import (
    NonFiniteLossError,
    _loss,
    answer_accuracy,
    apply_update,
    at_answer,
    batch_stream,
    needs_preparation,
    prepare_model,
    split_batch,
    step_loops,
    task_loss,
    val_batches,
    validate,
)
from .metrics import Window, progress_line, say
from .expert_parallel import reduce_expert_grads
from .grad_clip import clip_grad_norm_
from .optim import build_optimizer, build_scheduler
from .pair_embedding import merge
from .parallel import all_reduce_mean, all_reduce_min, all_reduce_sum_, autocast, build_model, no_sync, unwrap, use_bf16


def stopped_file(export_dir: str | Path) -> Path:
    """Where a run that stopped itself (see Trainer.stop) leaves its error for the driver."""
    export_dir = Path(export_dir)
    return export_dir.with_name(export_dir.name + ".stopped.json")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point. `config`: {"cfg": PretrainConfig.to_dict(), "run_root",
    "mlflow_run_id", "export_dir" (optional), "report_evals" (optional)}."""
    Trainer(config).run()


class Due(NamedTuple):
    """What a step is due for."""
    log: bool
    eval: bool
    checkpoint: bool


@dataclass
class StepResult:
    loss: float
    """The task loss, averaged over the micro-batches (this rank)."""
    grad_norm: float
    sample: LoopSample
    applied: bool
    """False where the non-finite guard skipped the update."""
    state_norms: list[float] | None
    expert_loads: list[torch.Tensor]
    """Per MoE layer, the load the router biases were updated from (empty without MoE)."""


class Trainer:
    def __init__(self, config: dict[str, Any]) -> None:
        self.cfg = cfg = PretrainConfig.from_dict(config["cfg"])
        self.tcfg = cfg.train
        self.export_dir = config.get("export_dir")
        self.run_name = config.get("run_name")
        self.report_evals = bool(config.get("report_evals"))  # also report (no checkpoint) at eval steps
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
        self.model_cfg = cfg.model.build()
        self.bf16 = use_bf16(self.tcfg.mixed_precision, self.device)
        self.fsdp = self.tcfg.parallelism == "fsdp" and self.world > 1
        self.answers_only = cfg.data.source == "pointer"  # answer-only rows: report accuracy too
        self.tokens_per_step = self.tcfg.batch_size * cfg.data.row_len * self.tcfg.grad_accum * self.world
        self.tracker = Tracker(cfg.tracking, Path(config["run_root"]), run_id=config.get("mlflow_run_id"),
                               active=self.rank == 0)
        self.fault = Fault.from_env(self.world)
        self.state = TrainState()
        self.logged_through = 0
        """The last step already in MLflow (a resumed run replays steps after its checkpoint: they are
        trained again, with the same batches, but not logged twice)."""
        self._flops: dict[tuple[int, int], float] = {}

    # --- the run -------------------------------------------------------------------------
    def run(self) -> None:
        self.build()
        self.restore()
        self.open_data()
        # measured after the restore, as it draws from the (restored) RNG
        self.peak = matmul_peak(self.device, self.matmul_dtype, reps=3)
        self.window = Window(self.device)
        self.model.train()
        while self.state.step < self.tcfg.steps:
            try:
                result = self.step()
            except NonFiniteLossError as exc:  # every rank agreed on it: end the run, not the worker
                self.stop(exc)
                return
            self.window.add_step(result.loss, result.sample.n_loops, self.step_flops(result.sample), result.applied)
            due = self.due(self.state.step)
            if due.log or due.eval or due.checkpoint:
                self.log(result, evaluate=due.eval)
            if due.checkpoint or (self.report_evals and due.eval):
                self.report({**self.state.metrics, "step": self.state.step}, save=due.checkpoint)
            if self.fault:
                self.fault.maybe_kill(self.state.step, self.rank)
        self.export()

    def due(self, step: int) -> Due:
        """What the state after optimizer step `step` (1-based) is due for."""
        t, every_ckpt = self.tcfg, self.cfg.checkpoint.every_steps
        return Due(log=step % t.log_every == 0 or step == t.steps,
                   eval=t.eval_every > 0 and (step % t.eval_every == 0 or step == t.steps),
                   checkpoint=every_ckpt > 0 and step % every_ckpt == 0 or step == t.steps)

    # --- build and restore ---------------------------------------------------------------
    def build(self) -> None:
        """The model (wrapped for DDP or FSDP2, prepared as the config asks), optimizer, schedule."""
        t, cfg = self.tcfg, self.cfg
        prepare = (lambda m: prepare_model(m, cfg)) if needs_preparation(cfg) else None
        self.model = build_model(self.model_cfg, t.parallelism, self.device, self.bf16, t.seed, prepare=prepare,
                                 activation_checkpointing=t.activation_checkpointing,
                                 expert_parallel=t.expert_parallel, compile=t.compile)
        self.core = unwrap(self.model)
        self.opt = build_optimizer(self.model, t.lr, t.betas, t.weight_decay, self.device)
        self.sched = build_scheduler(self.opt, t.warmup_steps, t.steps, t.lr, t.min_lr)

    def restore(self) -> None:
        """Weights, optimizer, schedule, RNG and data position from the newest whole checkpoint:
        Ray Train's latest, or, when that one is damaged (a truncated shard, a missing file), the
        newest earlier one beside it; what was skipped is said and tagged on the MLflow run."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as latest:
            folder, skipped = resumable_checkpoint(latest)
            if folder is None:
                raise CheckpointError("no checkpoint of this run can be resumed from: " + "; ".join(skipped))
            self.state = load_checkpoint(folder, self.model, self.opt, self.sched, self.rank)
        if self.rank == 0:
            s = self.state
            self.logged_through = max((step for step, _ in self.tracker.metric_history("loss")), default=0)
            self.tracker.log_metrics({"resumed_from_step": s.step}, step=s.step)
            for problem in skipped:
                say(f"[mythos] skipped a damaged checkpoint: {problem}")
            if skipped:
                self.tracker.set_tags({"mythos.resume.skipped": "; ".join(skipped)[:5000]})
            say(f"[mythos] resumed from checkpoint at step {s.step} (epoch {s.data_epoch}, "
                f"batch {s.data_batches} of this rank's shard){' ' + folder.name if skipped else ''}")

    def open_data(self) -> None:
        """This rank's endless training batches, from the (restored) data position, and its
        validation batches, as many on every rank (each is a collective forward)."""
        self.train_batches = batch_stream(ray.train.get_dataset_shard("train"), self.tcfg.batch_size, self.state)
        try:
            val_shard = ray.train.get_dataset_shard("val")
        except (KeyError, ValueError):
            val_shard = None
        val = val_batches(val_shard, self.tcfg.batch_size, self.tcfg.val_batches)
        self.val = val[:all_reduce_min(len(val))]

    # --- one optimizer step --------------------------------------------------------------
    def step(self) -> StepResult:
        """One optimizer step: grad_accum micro-batches, clipping, the non-finite guard (every rank
        agrees to apply or skip the update), the schedule, the MoE router-bias update."""
        t = self.tcfg
        collect = self.due(self.state.step + 1).log
        loss = torch.zeros(())
        norms = None
        for micro in range(t.grad_accum):
            out, task, sample = self._micro_step(micro, collect_stats=collect and micro == 0)
            loss += task.detach().float().cpu() / t.grad_accum
            if norms is None and out.state_norms:
                norms = [float(n) for n in out.state_norms]
        reduce_expert_grads(self.core)  # expert parallelism: the gradients DDP / FSDP2 do not average
        grad_norm = clip_grad_norm_(self.model.parameters(), t.grad_clip)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm.detach().cpu())
        finite = bool(all_reduce_mean(finite.float()) == 1.0)
        applied = apply_update(finite, t, self.state, self.state.step + 1, float(loss), float(grad_norm))
        if applied:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        # aux-loss-free balancing: every rank applies the step from the load summed over ranks
        loads = all_reduce_sum_([m.expert_load for m in self.core.moe_layers()])
        used = self.core.update_router_biases(loads)
        self.state.step += 1
        self.state.tokens += self.tokens_per_step
        return StepResult(float(loss), float(grad_norm), sample, applied, norms, used)

    def _micro_step(self, micro: int, collect_stats: bool):
        """Forward and backward of one micro-batch (DDP syncs gradients on the last one only);
        returns (output, task loss, loop sample)."""
        t = self.tcfg
        inputs, targets, loop_labels = split_batch(next(self.train_batches), self.device)
        sample = step_loops(self.model_cfg, t, self.state.step, loop_labels)
        with no_sync(self.model, micro < t.grad_accum - 1), autocast(self.device, self.bf16, self.fsdp):
            out = self.model(inputs, targets=targets, n_loops=sample.n_loops, bptt_depth=sample.bptt_depth,
                             return_loop_logits=t.deep_supervision or t.loop_schedule == "trajectory",
                             collect_stats=collect_stats)
            task = task_loss(out, t, loop_labels)
            loss = _loss(out, targets, t, loop_labels, task=task)
            if self.fault:
                loss = loss * self.fault.loss_factor(self.state.step + 1)
                task = task * self.fault.loss_factor(self.state.step + 1)
        (loss / t.grad_accum).backward()
        if self.answers_only:
            # the last loop's labels: under a trajectory longer than the chain they are f^T, not f^k
            final = at_answer(targets, loop_labels[:, -1]) if t.loop_schedule == "trajectory" else targets
            self.window.add_answers(*answer_accuracy(out.logits.detach(), final))
        return out, task, sample

    def step_flops(self, sample: LoopSample) -> float:
        """Training FLOPs per token of a step with this loop count and backprop depth."""
        key = (sample.n_loops, sample.bptt_depth)
        if key not in self._flops:
            self._flops[key] = flops_per_token(self.model_cfg, *key, self.cfg.data.row_len).train_step
        return self._flops[key]

    def peak_probe(self) -> float:
        """A short matmul burst at every log (about 40 ms on the 2-core CPU, torch.mm and oneDNN): the
        MFU divides by the best FLOP/s this worker has measured so far. The run's first measurement can be taken while
        other runs on the same CPUs are busy (a sweep's trials start together), and a peak measured
        low made the MFU of later steps, with the CPUs to itself, read above 100% (109% in a 3-trial sweep).
        Its random matrices do not draw from the training's generator."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the training's random stream stays as it was
            return matmul_peak(self.device, self.matmul_dtype, n=512 if self.device.type == "cpu" else None, reps=2)

    @property
    def matmul_dtype(self) -> torch.dtype:
        """The dtype of the training's matmuls, which the MFU's peak is measured in."""
        return torch.bfloat16 if self.bf16 else torch.float32

    # --- evaluate, log, checkpoint, report -----------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return validate(self.model, self.val, self.device, self.bf16, self.fsdp, self.tcfg, self.model_cfg.n_loops)

    def log(self, result: StepResult, evaluate: bool) -> dict[str, float]:
        """The window's metrics (all ranks take part) and this step's, with validation if asked,
        to MLflow and the progress line; starts a new window."""
        s = self.state
        self.peak = max(self.peak, self.peak_probe())
        metrics = {**self.window.metrics(self.tokens_per_step, self.peak * self.world),
                   "grad_norm": result.grad_norm, "lr": self.sched.get_last_lr()[0],
                   "max_A": float(self.core.core.injection.decay().detach().max()),
                   "tokens": s.tokens, "epoch": s.data_epoch}
        if result.expert_loads:
            metrics["expert_load_imbalance"] = sum(load_imbalance(u) for u in result.expert_loads) / len(
                result.expert_loads)
        if result.state_norms:
            metrics.update({f"state_norm/loop_{i + 1:02d}": v for i, v in enumerate(result.state_norms)})
        if evaluate:
            metrics.update(self.evaluate())
        replayed = s.step <= self.logged_through
        if not replayed:
            self.tracker.log_metrics(metrics, step=s.step)
        if self.rank == 0:
            say(progress_line(s.step, self.tcfg.steps, metrics, self.run_name) + (" (replayed, logged before)" if replayed else ""))
        self.state.metrics = {**self.state.metrics, **metrics, "step": s.step}
        self.window = Window(self.device)
        return metrics

    def checkpoint(self, folder: str) -> None:
        """This rank's part of a checkpoint (DCP shards, train state, RNG) into `folder`."""
        save_checkpoint(folder, self.model, self.opt, self.sched, self.state, self.rank)

    def report(self, metrics: dict[str, Any], save: bool) -> None:
        """Metrics to Ray Train, with a checkpoint if `save` (else e.g. the validation loss for
        Tune's early stopping). Ray registers the checkpoint once every rank has reported."""
        if not save:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.checkpoint(tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def stop(self, exc: Exception) -> None:
        """End the run on an error that a restart would repeat (divergence): no export, and no
        exception out of the workers (Ray Train would retry them); rank 0 writes the message to
        `stopped_file(export_dir)`, which the driver turns into the run's error."""
        if self.rank == 0:
            say(f"[mythos] stopping: {exc}")
            if self.export_dir:
                stopped_file(self.export_dir).parent.mkdir(parents=True, exist_ok=True)
                stopped_file(self.export_dir).write_text(json.dumps({"step": self.state.step, "error": str(exc)}))
        self.tracker.log_metrics({"skipped_steps_total": self.state.skips_total}, step=self.state.step)

    def export(self) -> None:
        """The serving folder (config, safetensors, tokenizer) and training_summary.json."""
        if not self.export_dir:
            return
        tokenizer = self.cfg.data.build_tokenizer() if self.rank == 0 else None
        merge(self.core)  # a factored pair embedding becomes plain rows
        export_model(self.model, self.model_cfg, self.export_dir, self.rank, tokenizer,
                     metadata={"step": str(self.state.step)})
        if self.rank == 0:
            Path(self.export_dir, "training_summary.json").write_text(json.dumps(self.state.metrics, indent=2))
