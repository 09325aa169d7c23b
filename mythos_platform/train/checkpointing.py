"""Sharded, resumable training checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint folder holds every rank's model and optimizer shards (DCP), `train_state.json`
(step, tokens seen, data position, scheduler) and each rank's RNG state. Each rank writes into
a local temporary folder that is handed to `ray.train.report`; Ray copies it to storage and
registers it only once every rank has reported, so a checkpoint interrupted mid-write never
replaces the previous good one. DCP writes its `.metadata` last, and `train_state.json` is
written after it, so loading also refuses a folder that misses either.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from mythos import Mythos, MythosConfig
from mythos.checkpoint import save_pretrained

TRAIN_STATE = "train_state.json"


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    tokens: int = 0
    """Training tokens consumed, all ranks together."""
    data_epoch: int = 0
    """Passes over the training set completed."""
    data_batches: int = 0
    """Batches this rank has consumed in the current pass (the data position)."""
    skips_in_a_row: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient since the last applied one."""
    skips_total: int = 0
    """Optimizer steps skipped for a non-finite loss or gradient in all."""
    metrics: dict[str, float] = field(default_factory=dict)
    """The metrics last logged (rank 0's): a relaunch that restores the final checkpoint trains no
    step, and still reports and exports the run's figures from these."""


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(folder: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer, sched,
                    state: TrainState, rank: int) -> None:
    folder = Path(folder)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"rng_rank{rank}.pt")
    if rank == 0:
        doc = {**asdict(state), "scheduler": sched.state_dict()}
        tmp = folder / (TRAIN_STATE + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        os.replace(tmp, folder / TRAIN_STATE)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """Why the checkpoint in `folder` cannot be resumed from, naming the file, or None when it is
    whole: every file the DCP metadata indexes is there and as long as the metadata says, the
    train state parses, and every rank's RNG file loads. It reads sizes and small files only, the
    same on every rank, so all ranks reach the same verdict without a collective."""
    folder = Path(folder)
    for required in (".metadata", TRAIN_STATE):
        if not (folder / required).exists():
            return f"{folder / required} is missing (the checkpoint is incomplete)"
    try:
        meta = dcp.FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is a broken checkpoint
        return f"{folder / '.metadata'} cannot be read ({type(exc).__name__}: {exc})"
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        path = folder / name
        have = path.stat().st_size if path.exists() else None
        if have is None or have < size:
            return f"{path} is {'missing' if have is None else f'truncated ({have} of {size} bytes)'}"
    try:
        json.loads((folder / TRAIN_STATE).read_text())["step"]
        for rng in sorted(folder.glob("rng_rank*.pt")):
            torch.load(rng, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        return f"{folder}: {type(exc).__name__}: {exc}"
    return None


def resumable_checkpoint(latest: str | os.PathLike) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint of the run whose latest checkpoint is `latest` (its siblings
    `checkpoint_*` in the same folder, newest step first), and why each newer one was skipped."""
    latest = Path(latest)
    siblings = (p for p in latest.parent.glob("checkpoint_*") if p.is_dir())
    candidates = sorted({latest, *siblings}, key=_checkpoint_step, reverse=True)
    skipped = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append(problem)
    return None, skipped


def resume_step(run_dir: str | os.PathLike) -> int | None:
    """The step a relaunch of the run whose checkpoints are in `run_dir` (Ray Train's
    `<storage>/<run name>`) resumes from: the newest whole checkpoint's, or None where there is none
    (no folder yet, or only damaged ones), and the relaunch starts at step 0."""
    folders = [p for p in Path(run_dir).glob("checkpoint_*") if p.is_dir()]
    if not folders:
        return None
    folder, _ = resumable_checkpoint(folders[0])
    return None if folder is None else _checkpoint_step(folder)[0]


def _checkpoint_step(folder: Path) -> tuple[int, str]:
    try:
        return json.loads((folder / TRAIN_STATE).read_text())["step"], folder.name
    except Exception:  # noqa: BLE001 - an unreadable state sorts first and is reported by checkpoint_problem
        return 1 << 62, folder.name


def load_checkpoint(folder: str | os.PathLike, model: nn.Module, opt: torch.optim.Optimizer, sched,
                    rank: int) -> TrainState:
    folder = Path(folder)
    for required in (".metadata", TRAIN_STATE):
        if not (folder / required).exists():
            raise CheckpointError(f"checkpoint {folder} is incomplete (no {required}); refusing to resume from it")
    msd, osd = get_state_dict(model, opt)
    state_dict = {"model": msd, "optim": osd}
    dcp.load(state_dict, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"])
    doc = json.loads((folder / TRAIN_STATE).read_text())
    sched.load_state_dict(doc.pop("scheduler"))
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return TrainState(**doc)


def export_model(model: nn.Module, cfg: MythosConfig, folder: str | os.PathLike, rank: int, tokenizer=None,
                 metadata: dict[str, str] | None = None) -> Path | None:
    """Gather the full weights (a collective under FSDP: every rank calls it) and write the
    serving format (config.json + model.safetensors) from rank 0."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None
    plain = Mythos(cfg)
    plain.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in full.items()}, strict=True)
    return save_pretrained(plain, folder, tokenizer=tokenizer, metadata=metadata)
