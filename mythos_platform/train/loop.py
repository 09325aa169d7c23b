"""The per-worker training loop that Ray Train's TorchTrainer runs on every rank.

Every rank draws the same loop count for a step (a pure function of seed and step), so FSDP
collectives always match; only the last `bptt_depth` iterations are differentiated.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import ray.train
import torch

from mythos.loop_schedule import sample_loops
from mythos.moe import load_imbalance
from mythos.sizing import flops_per_token
from mythos.tokenizer import load_tokenizer

from ..config import PretrainConfig
from ..perf import matmul_peak
from ..tracking import Tracker
from .checkpointing import TrainState, export_model, load_checkpoint, save_checkpoint
from .losses import per_loop_lm_loss
from .optim import build_optimizer, build_scheduler
from .parallel import (
    all_reduce_mean,
    all_reduce_min,
    all_reduce_sum_,
    autocast,
    build_model,
    no_sync,
    unwrap,
    use_bf16,
    world_size,
)

log = logging.getLogger("mythos.train")


class NonFiniteLossError(FloatingPointError):
    pass


def say(message: str) -> None:
    """One progress line on the worker's stdout, which Ray streams to the driver. (Ray Train
    patches `print` to also log through its logger, which shows every line twice.)"""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


def batch_stream(shard, batch_size: int, state: TrainState) -> Iterator[torch.Tensor]:
    """Endless (B, seq_len+1) int64 batches from this rank's shard, epoch after epoch.

    Resuming skips the `state.data_batches` batches this rank already consumed in the current
    pass, so the data position is not rewound by a restart."""
    while True:
        skip = state.data_batches
        seen = 0
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=batch_size, drop_last=True)):
            seen += 1
            if i < skip:
                continue
            state.data_batches = i + 1
            yield batch["input_ids"].long()
        if seen == 0:
            raise RuntimeError(f"the training data shard has fewer than batch_size={batch_size} blocks: "
                               "add data or lower train.batch_size")
        state.data_epoch += 1
        state.data_batches = 0


def _val_batches(shard, batch_size: int, limit: int) -> list[torch.Tensor]:
    if shard is None:
        return []
    out = []
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        out.append(batch["input_ids"].long())
        if len(out) >= limit:
            break
    return out


def _maybe_inject_fault(fault: dict | None, step: int, rank: int) -> None:
    """Test hook: SIGKILL this worker process once, at a given step (a real process death)."""
    if not fault or step != fault["kill_at_step"] or rank != fault.get("rank", world_size() - 1):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(str(os.getpid()))
    os.kill(os.getpid(), signal.SIGKILL)


def apply_update(finite: bool, policy: str, step: int, loss: float, grad_norm: float) -> bool:
    """The non-finite guard: True to apply the update, False to skip it ("skip"), or raise ("stop")."""
    if finite:
        return True
    if policy == "stop":
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad_norm}); set "
            "train.nonfinite=skip to skip such steps, or lower train.lr")
    log.warning("step %d: non-finite loss/gradient (loss=%s, grad_norm=%s), update skipped", step, loss, grad_norm)
    return False


def _loss(out, targets: torch.Tensor, tcfg, deep: bool) -> torch.Tensor:
    loss = out.loss
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    if tcfg.ponder_cost > 0 and out.ponder_cost is not None:
        loss = loss + tcfg.ponder_cost * out.ponder_cost
    if deep and out.loop_logits:
        # deep supervision: every differentiated iteration predicts the targets, later ones weigh more
        loss = 0.5 * loss + 0.5 * per_loop_lm_loss(out.loop_logits, targets, scheme="linear")
    return loss


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg = PretrainConfig.from_dict(config["cfg"])
    tcfg, ccfg = cfg.train, cfg.checkpoint
    run_root = Path(config["run_root"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if torch.cuda.is_available() else torch.device("cpu")
    model_cfg = cfg.model.build()
    bf16 = use_bf16(tcfg.mixed_precision, device)
    fsdp = tcfg.parallelism == "fsdp" and world_size() > 1
    model = build_model(model_cfg, tcfg.parallelism, device, bf16, tcfg.seed)
    core = unwrap(model)
    opt = build_optimizer(model, tcfg.lr, tcfg.betas, tcfg.weight_decay, device)
    sched = build_scheduler(opt, tcfg.warmup_steps, tcfg.steps, tcfg.lr, tcfg.min_lr)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(folder, model, opt, sched, rank)
        if rank == 0:
            say(f"[mythos] resumed from checkpoint at step {state.step} (epoch {state.data_epoch}, "
                f"batch {state.data_batches} of this rank's shard)")

    tracker = Tracker(cfg.tracking, run_root, run_id=config.get("mlflow_run_id"), active=rank == 0)
    train_iter = batch_stream(ray.train.get_dataset_shard("train"), tcfg.batch_size, state)
    try:
        val_shard = ray.train.get_dataset_shard("val")
    except (KeyError, ValueError):
        val_shard = None
    val = _val_batches(val_shard, tcfg.batch_size, tcfg.val_batches)
    n_val = all_reduce_min(len(val))  # every rank runs the same number of (collective) forwards

    peak = matmul_peak(device, torch.bfloat16 if bf16 else torch.float32, reps=3)
    seq_len = cfg.data.seq_len
    tokens_per_step = tcfg.batch_size * seq_len * tcfg.grad_accum * world
    flops_cache: dict[tuple[int, int], float] = {}

    def step_flops(n_loops: int, bptt: int) -> float:
        if (n_loops, bptt) not in flops_cache:
            flops_cache[(n_loops, bptt)] = flops_per_token(model_cfg, n_loops, seq_len, bptt).train_step
        return flops_cache[(n_loops, bptt)]

    window = {"loss": 0.0, "n": 0, "loops": 0.0, "flops": 0.0, "t0": time.perf_counter(), "skipped": 0}

    def evaluate() -> float:
        if not val:
            return float("nan")
        model.eval()
        total = torch.zeros(())
        with torch.no_grad(), autocast(device, bf16, fsdp):
            for x in val[:n_val]:
                x = x.to(device)
                total += model(x[:, :-1], targets=x[:, 1:], n_loops=model_cfg.n_loops).loss.float().cpu()
        model.train()
        return float(all_reduce_mean(total / max(n_val, 1)))

    report_evals = bool(config.get("report_evals"))  # also report (without a checkpoint) at eval steps

    def report(metrics: dict, save: bool) -> None:
        if not save:
            ray.train.report(metrics)  # metrics only: e.g. validation loss for Tune's early stopping
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(tmp, model, opt, sched, state, rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    model.train()
    last_metrics: dict[str, float] = {}
    while state.step < tcfg.steps:
        sample = sample_loops(model_cfg, state.step, tcfg.seed)
        log_now = (state.step + 1) % tcfg.log_every == 0 or state.step + 1 == tcfg.steps
        step_loss = torch.zeros(())
        stats = None
        for micro in range(tcfg.grad_accum):
            x = next(train_iter).to(device)
            inputs, targets = x[:, :-1], x[:, 1:]
            with no_sync(model, micro < tcfg.grad_accum - 1), autocast(device, bf16, fsdp):
                out = model(inputs, targets=targets, n_loops=sample.n_loops, bptt_depth=sample.bptt_depth,
                            return_loop_logits=tcfg.deep_supervision, collect_stats=log_now and micro == 0)
                loss = _loss(out, targets, tcfg, tcfg.deep_supervision)
            (loss / tcfg.grad_accum).backward()
            step_loss += out.loss.detach().float().cpu() / tcfg.grad_accum
            if stats is None and out.state_norms:
                stats = [float(n) for n in out.state_norms]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        finite = torch.isfinite(step_loss) & torch.isfinite(grad_norm.detach().cpu())
        finite = bool(all_reduce_mean(finite.float()) == 1.0)  # every rank agrees to step or skip
        if apply_update(finite, tcfg.nonfinite, state.step, float(step_loss), float(grad_norm)):
            opt.step()
        else:
            window["skipped"] += 1
        opt.zero_grad(set_to_none=True)
        sched.step()
        # aux-loss-free balancing: every rank applies the step from the load summed over ranks
        loads = all_reduce_sum_([m.expert_load for m in core.moe_layers()])
        used = core.update_router_biases(loads)
        state.step += 1
        state.tokens += tokens_per_step
        _maybe_inject_fault(config.get("fault"), state.step, rank)

        window["loss"] += float(step_loss)
        window["n"] += 1
        window["loops"] += sample.n_loops
        window["flops"] += step_flops(sample.n_loops, sample.bptt_depth)
        is_eval = tcfg.eval_every > 0 and (state.step % tcfg.eval_every == 0 or state.step == tcfg.steps)
        is_ckpt = ccfg.every_steps > 0 and state.step % ccfg.every_steps == 0 or state.step == tcfg.steps
        if log_now or is_eval or is_ckpt:
            n = max(window["n"], 1)
            elapsed = time.perf_counter() - window["t0"]
            loss_mean = float(all_reduce_mean(torch.tensor(window["loss"] / n)))
            tok_s = tokens_per_step * n / elapsed
            metrics = {
                "loss": loss_mean,
                "perplexity": math.exp(min(loss_mean, 30.0)),
                "tokens_per_s": tok_s,
                "mfu": (window["flops"] / n) * tok_s / (peak * world),
                "grad_norm": float(grad_norm),
                "lr": sched.get_last_lr()[0],
                "max_A": float(core.core.injection.decay().max()),
                "mean_loops": window["loops"] / n,
                "tokens": state.tokens,
                "skipped_steps": window["skipped"],
                "epoch": state.data_epoch,
            }
            if used:
                metrics["expert_load_imbalance"] = sum(load_imbalance(u) for u in used) / len(used)
            if stats:
                metrics.update({f"state_norm/loop_{i + 1:02d}": v for i, v in enumerate(stats)})
            if is_eval:
                metrics["val_loss"] = evaluate()
            tracker.log_metrics(metrics, step=state.step)
            if rank == 0:
                val_txt = f" | val {metrics['val_loss']:.3f}" if "val_loss" in metrics else ""
                say(f"[mythos] step {state.step:>5d}/{tcfg.steps} | loss {loss_mean:.3f} ppl "
                    f"{metrics['perplexity']:.2f}{val_txt} | {tok_s:,.0f} tok/s | MFU {metrics['mfu']:.1%} | "
                    f"loops {metrics['mean_loops']:.1f} | lr {metrics['lr']:.2e} | gnorm "
                    f"{metrics['grad_norm']:.2f}")
            last_metrics = {**last_metrics, **metrics, "step": state.step}
            window.update(loss=0.0, n=0, loops=0.0, flops=0.0, t0=time.perf_counter(), skipped=0)
        if is_ckpt or (report_evals and is_eval):
            report({**last_metrics, "step": state.step}, save=is_ckpt)

    export_dir = config.get("export_dir")
    if export_dir:
        tokenizer = load_tokenizer(cfg.data.tokenizer) if rank == 0 else None
        export_model(model, model_cfg, export_dir, rank, tokenizer, metadata={"step": str(state.step)})
        if rank == 0:
            Path(export_dir, "training_summary.json").write_text(json.dumps(last_metrics, indent=2))
