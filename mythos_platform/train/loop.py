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

from mythos import Mythos
from mythos.loop_schedule import LoopSample, sample_loops
from mythos.moe import load_imbalance
from mythos.sizing import flops_per_token

from ..config import PretrainConfig
from ..perf import matmul_peak
from ..tracking import Tracker
from .checkpointing import TrainState, export_model, load_checkpoint, save_checkpoint
from .losses import per_loop_label_loss, per_loop_lm_loss
from .pair_embedding import factor_pair_embedding, merge
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


def batch_stream(shard, batch_size: int, state: TrainState) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches {column: (B, ...) int64} from this rank's shard, epoch after epoch: "input_ids"
    (B, seq_len+1) always, "labels" and "loop_labels" where the data has them (source pointer).

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
            yield {k: v.long() for k, v in batch.items()}
        if seen == 0:
            raise RuntimeError(f"the training data shard has fewer than batch_size={batch_size} blocks: "
                               "add data or lower train.batch_size")
        state.data_epoch += 1
        state.data_batches = 0


def _val_batches(shard, batch_size: int, limit: int) -> list[dict[str, torch.Tensor]]:
    if shard is None:
        return []
    out = []
    for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=False):
        out.append({k: v.long() for k, v in batch.items()})
        if len(out) >= limit:
            break
    return out


def split_batch(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor | None]:
    """(inputs, targets, loop_labels): targets are the data's labels where it has them (answer-only
    rows), the next tokens otherwise."""
    x = batch["input_ids"].to(device)
    targets = batch["labels"].to(device) if "labels" in batch else x[:, 1:]
    loop_labels = batch["loop_labels"].to(device) if "loop_labels" in batch else None
    return x[:, :-1], targets, loop_labels


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


def task_loss(out, tcfg, loop_labels: torch.Tensor | None = None) -> torch.Tensor:
    """What the run reports as its loss: the per-loop loss of a trajectory step, else the
    next-token (or answer) loss of the final output."""
    if tcfg.loop_schedule == "trajectory":
        return per_loop_label_loss(out.loop_logits, loop_labels, tcfg.loop_loss_weights)
    return out.loss


def _loss(out, targets: torch.Tensor, tcfg, loop_labels: torch.Tensor | None = None,
          task: torch.Tensor | None = None) -> torch.Tensor:
    """The objective: the task loss (`task_loss`, computed here unless given), with deep
    supervision for language modelling; plus the MoE auxiliary loss and the ACT ponder cost where
    they are on."""
    loss = task_loss(out, tcfg, loop_labels) if task is None else task
    if tcfg.loop_schedule != "trajectory" and tcfg.deep_supervision and out.loop_logits:
        # every differentiated iteration predicts the targets, later ones weigh more
        loss = 0.5 * loss + 0.5 * per_loop_lm_loss(out.loop_logits, targets, scheme="linear")
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    if tcfg.ponder_cost > 0 and out.ponder_cost is not None:
        loss = loss + tcfg.ponder_cost * out.ponder_cost
    return loss


def step_loops(model_cfg, tcfg, step: int, loop_labels: torch.Tensor | None) -> LoopSample:
    """This step's loop count (equal on every rank): a trajectory runs one loop per label column
    under autograd; otherwise the model's loop distribution, seeded by (seed, step)."""
    if tcfg.loop_schedule == "trajectory":
        n = int(loop_labels.shape[1])
        return LoopSample(n, n)
    return sample_loops(model_cfg, step, tcfg.seed)


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, counted) greedy predictions at the labelled positions (targets != -100)."""
    mask = targets != -100
    return ((logits.argmax(-1) == targets) & mask).sum().float(), mask.sum().float()


def at_answer(targets: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`labels` where `targets` label the answer, -100 elsewhere (per-loop labels may also cover
    other positions, e.g. the hop marks)."""
    return torch.where(targets != -100, labels, -100)


def needs_preparation(cfg: PretrainConfig) -> bool:
    return bool(cfg.train.init_from) or cfg.data.source == "pointer"


def prepare_model(model: Mythos, cfg: PretrainConfig) -> None:
    """What the config asks of the bare model before it is wrapped: start from a model folder
    (train.init_from), or, for source pointer, pair rows as E[x] + T[y] (data.pair_embedding:
    free rows initialised so, or factored through training). A model from a folder keeps its rows."""
    if cfg.train.init_from:
        init_from_folder(model, cfg.train.init_from)
    if cfg.data.source == "pointer" and not cfg.train.init_from:
        fmt = cfg.data.pointer_format()
        factor_pair_embedding(model, fmt.n_symbols, fmt.symbol_offset, fmt.pair_offset)
        if cfg.data.pair_embedding == "token":
            merge(model)  # free rows that start out as E[x] + T[y]


def init_from_folder(model: Mythos, folder: str) -> list[str]:
    """Load a model folder's weights into `model`; returns the parameters the folder lacks (they
    keep their initial values). A shape mismatch or a weight the model lacks is an error."""
    from safetensors.torch import load_file

    path = Path(folder, "model.safetensors")
    if not path.exists():
        raise FileNotFoundError(f"train.init_from: {folder} is not a model folder (no model.safetensors)")
    weights = load_file(str(path), device=str(model.tok_emb.weight.device))
    own = model.state_dict()
    bad = [k for k, v in weights.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ValueError(f"train.init_from: {folder} does not fit this model: {', '.join(bad[:5])} "
                         "(a different size or layout)")
    missing = [k for k in own if k not in weights and not k.startswith("lm_head.")]
    model.load_state_dict(weights, strict=False)
    model.tie_weights()
    return missing


@torch.no_grad()
def validate(model, batches: list[dict[str, torch.Tensor]], device: torch.device, bf16: bool, fsdp: bool, tcfg,
             n_loops: int) -> dict[str, float]:
    """Validation metrics, averaged over ranks: val_loss, and for answer-only rows val_acc; a
    trajectory model runs as many loops as the rows have per-loop labels and also reports the
    accuracy after every loop (val_acc_loop_<t>)."""
    if not batches:
        return {"val_loss": float("nan")}
    model.eval()
    loss, correct, counted = torch.zeros(()), None, torch.zeros(())
    for batch in batches:
        inputs, targets, loop_labels = split_batch(batch, device)
        trajectory = tcfg.loop_schedule == "trajectory" and loop_labels is not None
        loops = int(loop_labels.shape[1]) if trajectory else n_loops
        with autocast(device, bf16, fsdp):
            out = model(inputs, targets=targets, n_loops=loops, return_loop_logits=trajectory)
        loss += out.loss.float().cpu()
        if "labels" in batch:
            outs = out.loop_logits if trajectory else [out.logits]
            labels = [loop_labels[:, t] for t in range(loops)] if trajectory else [targets]
            hits = torch.stack([answer_accuracy(o, at_answer(targets, lab))[0] for o, lab in zip(outs, labels)]).cpu()
            correct = hits if correct is None else correct + hits
            counted += answer_accuracy(out.logits, targets)[1].cpu()
    model.train()
    metrics = {"val_loss": float(all_reduce_mean(loss / len(batches)))}
    if correct is not None:
        acc = all_reduce_mean(correct / counted.clamp_min(1))
        metrics["val_acc"] = float(acc[-1])
        if len(acc) > 1:
            metrics.update({f"val_acc_loop_{t + 1:02d}": float(a) for t, a in enumerate(acc)})
    return metrics


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
    model = build_model(model_cfg, tcfg.parallelism, device, bf16, tcfg.seed,
                        prepare=(lambda m: prepare_model(m, cfg)) if needs_preparation(cfg) else None)
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
    seq_len = cfg.data.row_len
    tokens_per_step = tcfg.batch_size * seq_len * tcfg.grad_accum * world
    flops_cache: dict[tuple[int, int], float] = {}

    def step_flops(n_loops: int, bptt: int) -> float:
        if (n_loops, bptt) not in flops_cache:
            flops_cache[(n_loops, bptt)] = flops_per_token(model_cfg, n_loops, seq_len, bptt).train_step
        return flops_cache[(n_loops, bptt)]

    window = {"loss": 0.0, "n": 0, "loops": 0.0, "flops": 0.0, "t0": time.perf_counter(), "skipped": 0,
              "correct": torch.zeros((), device=device), "counted": torch.zeros((), device=device)}
    answers_only = cfg.data.source == "pointer"  # answer-only rows: report accuracy too

    def evaluate() -> dict[str, float]:
        return validate(model, val[:n_val], device, bf16, fsdp, tcfg, model_cfg.n_loops)

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
        log_now = (state.step + 1) % tcfg.log_every == 0 or state.step + 1 == tcfg.steps
        step_loss = torch.zeros(())
        stats = None
        for micro in range(tcfg.grad_accum):
            inputs, targets, loop_labels = split_batch(next(train_iter), device)
            sample = step_loops(model_cfg, tcfg, state.step, loop_labels)
            with no_sync(model, micro < tcfg.grad_accum - 1), autocast(device, bf16, fsdp):
                out = model(inputs, targets=targets, n_loops=sample.n_loops, bptt_depth=sample.bptt_depth,
                            return_loop_logits=tcfg.deep_supervision or tcfg.loop_schedule == "trajectory",
                            collect_stats=log_now and micro == 0)
                task = task_loss(out, tcfg, loop_labels)
                loss = _loss(out, targets, tcfg, loop_labels, task=task)
            (loss / tcfg.grad_accum).backward()
            step_loss += task.detach().float().cpu() / tcfg.grad_accum
            if answers_only:  # accumulated on the device; read once per log interval
                # the last loop's labels: under a trajectory longer than the chain they are f^T, not f^k
                final = at_answer(targets, loop_labels[:, -1]) if tcfg.loop_schedule == "trajectory" else targets
                correct, counted = answer_accuracy(out.logits.detach(), final)
                window["correct"] = window["correct"] + correct
                window["counted"] = window["counted"] + counted
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
                "max_A": float(core.core.injection.decay().detach().max()),
                "mean_loops": window["loops"] / n,
                "tokens": state.tokens,
                "skipped_steps": window["skipped"],
                "epoch": state.data_epoch,
            }
            if used:
                metrics["expert_load_imbalance"] = sum(load_imbalance(u) for u in used) / len(used)
            if stats:
                metrics.update({f"state_norm/loop_{i + 1:02d}": v for i, v in enumerate(stats)})
            if answers_only and float(window["counted"]):
                metrics["acc"] = float(all_reduce_mean(window["correct"] / window["counted"]))
            if is_eval:
                metrics.update(evaluate())
            tracker.log_metrics(metrics, step=state.step)
            if rank == 0:
                val_txt = f" | val {metrics['val_loss']:.3f}" if "val_loss" in metrics else ""
                if "val_acc" in metrics:
                    val_txt += f" acc {metrics['val_acc']:.2f}"
                acc_txt = f" acc {metrics['acc']:.2f}" if "acc" in metrics else ""
                say(f"[mythos] step {state.step:>5d}/{tcfg.steps} | loss {loss_mean:.3f}{acc_txt} ppl "
                    f"{metrics['perplexity']:.2f}{val_txt} | {tok_s:,.0f} tok/s | MFU {metrics['mfu']:.1%} | "
                    f"loops {metrics['mean_loops']:.1f} | lr {metrics['lr']:.2e} | gnorm "
                    f"{metrics['grad_norm']:.2f}")
            last_metrics = {**last_metrics, **metrics, "step": state.step}
            window.update(loss=0.0, n=0, loops=0.0, flops=0.0, t0=time.perf_counter(), skipped=0,
                          correct=torch.zeros((), device=device), counted=torch.zeros((), device=device))
        if is_ckpt or (report_evals and is_eval):
            report({**last_metrics, "step": state.step}, save=is_ckpt)

    export_dir = config.get("export_dir")
    if export_dir:
        tokenizer = cfg.data.build_tokenizer() if rank == 0 else None
        merge(unwrap(model))  # a factored pair embedding becomes plain rows
        export_model(model, model_cfg, export_dir, rank, tokenizer, metadata={"step": str(state.step)})
        if rank == 0:
            Path(export_dir, "training_summary.json").write_text(json.dumps(last_metrics, indent=2))
