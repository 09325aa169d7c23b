"""The model folder format used for serving and evaluation: config.json + model.safetensors.

No pickle anywhere: weights are safetensors, the config is JSON, and loading never executes
code from the folder. A tokenizer saved beside the model (tokenizer_config.json) travels with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from .config import MythosConfig
from .model import Mythos

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def save_pretrained(
    model: Mythos,
    folder: str | os.PathLike,
    tokenizer: Any | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write config.json and model.safetensors (and the tokenizer, if given) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"model_type": "mythos", "format_version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    (folder / CONFIG_FILE).write_text(json.dumps(doc, indent=2, sort_keys=True))
    meta = {"format": "pt", **(metadata or {})}
    # write to a temporary name, then rename, so a crash never leaves a half-written weights file
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_model(model, str(tmp), metadata=meta)
    os.replace(tmp, folder / WEIGHTS_FILE)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def load_config(folder: str | os.PathLike) -> MythosConfig:
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder}: not a Mythos model folder (no {CONFIG_FILE})")
    doc = json.loads(path.read_text())
    if doc.get("model_type") != "mythos":
        raise ValueError(f"{path}: model_type is {doc.get('model_type')!r}, expected 'mythos'")
    return MythosConfig.from_dict(doc["config"])


def load_pretrained(
    folder: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Mythos:
    """Build the model from config.json and load model.safetensors into it (strict)."""
    folder = Path(folder)
    cfg = load_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}")
    with torch.device("meta"):
        model = Mythos(cfg)
    model.to_empty(device=device)
    model.init_weights()  # also sets non-persistent buffers
    missing, unexpected = load_model(model, str(weights), strict=True, device=str(device))
    if dtype is not None:
        model.to(dtype)
    return model.eval()
