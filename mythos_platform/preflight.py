"""Checks of a valid config against this machine, run by every job before any Ray work: what the
config check cannot know (folders, files, how much data a source yields) but a run would
otherwise find out inside a Ray worker, as a traceback, after the cluster started.

Each failure is a ConfigError naming the dotted key, like a config error:

    run.root: got '/proc/x'; cannot write there: No such file or directory (/proc/x)
    data.paths[0]: got 'corpus/*.txt'; no file matches
    data.n_docs: got 1; the training data makes 0 rows, fewer than one batch per worker (8 x 2 workers)
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError

if TYPE_CHECKING:
    from .config import DataConfig, PretrainConfig

EXACT_COUNT_DOCS = 8192
"""Generated corpora up to this many documents are counted exactly (a fraction of a second)."""


def preflight_pretrain(cfg: "PretrainConfig", prefix: str = "") -> None:
    """Every check of one pretraining config; `prefix` places the keys (e.g. `pretrain.`)."""
    writable_folder(cfg.run.root, f"{prefix}run.root")
    data_files(cfg.data, prefix)
    enough_rows(cfg, prefix)


def writable_folder(path: str, key: str) -> None:
    """`path` is a folder this process can write: created if missing (as the job would), and a
    file is written into it and removed (permission bits alone say nothing for root)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(key, "is a file, not a folder", path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot write there: {exc.strerror or exc} ({exc.filename or p})", path) from None


def data_files(data: "DataConfig", prefix: str = "") -> None:
    """Every glob of data.paths matches a file; a tokenizer given as a file exists."""
    if data.source in ("local", "fineweb"):
        for i, pattern in enumerate(data.paths):
            if "://" not in pattern and not glob.glob(os.path.expanduser(pattern), recursive=True):
                raise ConfigError(f"{prefix}data.paths[{i}]", "no file matches", pattern)
    tok = data.tokenizer
    if tok.endswith(".json") or tok.startswith(("/", "./", "../", "~")):  # a file, not a hub name
        if not Path(tok).expanduser().is_file():
            raise ConfigError(f"{prefix}data.tokenizer", "no such tokenizer file", tok)


def enough_rows(cfg: "PretrainConfig", prefix: str = "") -> None:
    """The training data yields at least one batch per worker (the reasoning corpus and small
    generated corpora are counted; file sources are read only in Ray)."""
    data, need = cfg.data, cfg.train.batch_size * cfg.scaling.num_workers
    rows, key = _train_rows(data), "n_docs"
    if data.num_blocks is not None and (rows is None or data.num_blocks < rows):
        rows, key = data.num_blocks, "num_blocks"  # the cap (at most this many rows, whatever the source)
    if rows is None:
        return
    if rows < need:
        raise ConfigError(f"{prefix}data.{key}", f"the training data makes {rows} rows, fewer than one batch per "
                                                 f"worker (train.batch_size={cfg.train.batch_size} x "
                                                 f"{cfg.scaling.num_workers} workers)", getattr(data, key))


def _train_rows(data: "DataConfig") -> int | None:
    if data.source == "pointer":
        return data.n_docs  # one row per problem
    if data.source != "generated" or data.n_docs > EXACT_COUNT_DOCS:
        return None
    import numpy as np

    from .data.pipeline import TRAIN_STREAM, generated_blocks

    chunks = np.arange(-(-data.n_docs // data.docs_per_batch))
    blocks = generated_blocks({"chunk": chunks}, n_docs=data.n_docs, docs_per_chunk=data.docs_per_batch,
                              hops=list(range(data.min_hops, data.max_hops + 1)), seed=data.seed,
                              n_symbols=data.n_symbols, stream=TRAIN_STREAM, tokenizer=data.build_tokenizer(),
                              seq_len=data.seq_len)
    return len(blocks["input_ids"])
