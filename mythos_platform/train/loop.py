"""The pieces of a training step that the per-worker `Trainer` (worker.py) composes: batches,
the loss, the loop schedule, the non-finite guard, validation, and the model's preparation.

Every rank draws the same loop count for a step (a pure function of seed and step), so FSDP
collectives always match; only the last `bptt_depth` iterations are differentiated.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import torch

from mythos import Mythos
from mythos.loop_schedule import LoopSample, sample_loops

from ..config import PretrainConfig
from .checkpointing import TrainState
from .losses import per_loop_label_loss, per_loop_lm_loss
from .pair_embedding import factor_pair_embedding, merge
from .parallel import all_reduce_mean, autocast

log = logging.getLogger("mythos.train")


class NonFiniteLossError(FloatingPointError):
    pass


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


def val_batches(shard, batch_size: int, limit: int) -> list[dict[str, torch.Tensor]]:
    """Up to `limit` validation batches of this rank's shard (none without one), kept in memory."""
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


def apply_update(finite: bool, tcfg, state, step: int, loss: float, grad_norm: float) -> bool:
    """The non-finite guard for optimizer step `step` (1-based, as the progress lines count): True
    to apply the update; False to skip it (train.nonfinite=skip, counted in `state`); raises
    NonFiniteLossError for nonfinite=stop, or when the skips reach train.max_consecutive_skips in a
    row or train.max_total_skips in all (the run has diverged)."""
    if finite:
        state.skips_in_a_row = 0
        return True
    what = f"non-finite loss or gradient at step {step} (loss={loss}, grad_norm={grad_norm})"
    if tcfg.nonfinite == "stop":
        raise NonFiniteLossError(f"{what}; the run stops (train.nonfinite=stop) without exporting. Lower "
                                 "train.lr or train.grad_clip, or set train.nonfinite=skip to skip such steps")
    state.skips_in_a_row += 1
    state.skips_total += 1
    if state.skips_in_a_row >= tcfg.max_consecutive_skips or state.skips_total >= tcfg.max_total_skips:
        raise NonFiniteLossError(
            f"{what}: {state.skips_in_a_row} steps in a row and {state.skips_total} in all skipped "
            f"(train.max_consecutive_skips={tcfg.max_consecutive_skips}, train.max_total_skips="
            f"{tcfg.max_total_skips}); the run has diverged and stops without exporting. Lower train.lr")
    log.warning("%s: update skipped (%d in a row, %d in all)", what, state.skips_in_a_row, state.skips_total)
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
