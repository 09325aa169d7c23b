"""Readers: every source becomes a Ray Dataset of documents with one column, "text".

- FineWeb-Edu (`read_fineweb`): the dataset's parquet files read straight from the
  Hugging Face hub through `huggingface_hub.HfFileSystem` with `ray.data.read_parquet`
  (streamed: files are read block by block as the pipeline pulls, only the text and score
  columns are decoded, and nothing is downloaded up front). `data.paths` can point the
  very same reader at local parquet files with FineWeb-Edu's columns.
- Local files (`read_local`): parquet, jsonl (one JSON object per line) and txt files.
  A txt file holds one document per blank-line-separated paragraph (`txt_unit:
  paragraph`, the default) or one document per file (`txt_unit: file`).

Filtering and the train/validation split happen in one batch function, `prepare_text`:
keep rows with `score >= min_score` (when set), keep the text column only, and route each
document by a CRC32 hash of its text: `crc32(text) < val_fraction * 2**32` goes to
validation, the rest to training. The split is deterministic and disjoint, needs no
global pass over the data, and works on a stream.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import zlib
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import ray.data

    from mythos_platform.config import DataConfig

log = logging.getLogger(__name__)

Split = Literal["train", "val", "all"]

# Columns of HuggingFaceFW/fineweb-edu's parquet files.
FINEWEB_COLUMNS = ("text", "id", "dump", "url", "file_path", "language", "language_score", "token_count",
                   "score", "int_score")

__all__ = [
    "DataSourceError",
    "FINEWEB_COLUMNS",
    "expand_paths",
    "fineweb_pattern",
    "list_fineweb_files",
    "in_split",
    "prepare_text",
    "split_text_files",
    "read_fineweb",
    "read_local",
]


class DataSourceError(OSError):
    """A data source cannot be reached or read; the message says what to do instead."""


# ---------------------------------------------------------------------------------------
# Batch functions (pure; run inside Ray Data tasks)
# ---------------------------------------------------------------------------------------
def in_split(texts: list[str], split: Split, val_fraction: float) -> list[bool]:
    """Whether each text belongs to `split` under the CRC32 document split."""
    if split == "all":
        return [True] * len(texts)
    cut = int(val_fraction * 2**32)
    is_val = [zlib.crc32(t.encode("utf-8")) < cut for t in texts]
    return is_val if split == "val" else [not v for v in is_val]


def prepare_text(table: pa.Table, text_column: str = "text", score_column: str = "score",
                 min_score: float | None = None, split: Split = "all", val_fraction: float = 0.0) -> pa.Table:
    """Score filter, text column only (renamed "text"), then the hash split. Empty texts are dropped."""
    if text_column not in table.column_names:
        raise KeyError(f"text column {text_column!r} not found; columns are {table.column_names} "
                       "(set data.text_column)")
    if min_score is not None:
        if score_column not in table.column_names:
            raise KeyError(f"data.min_score is set but the score column {score_column!r} is missing; "
                           f"columns are {table.column_names} (set data.score_column or min_score: null)")
        table = table.filter(pc.fill_null(pc.greater_equal(table[score_column], min_score), False))
    text = table[text_column].cast(pa.string())
    texts = [t for t in text.to_pylist() if t]
    keep = in_split(texts, split, val_fraction)
    return pa.table({"text": pa.array([t for t, k in zip(texts, keep) if k], type=pa.string())})


def split_text_files(table: pa.Table, unit: Literal["paragraph", "file"] = "paragraph") -> pa.Table:
    """{"bytes": file contents} -> {"text": documents}: one per blank-line-separated paragraph, or per file."""
    docs: list[str] = []
    for raw in table["bytes"].to_pylist():
        text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
        pieces = re.split(r"\n[ \t]*\n", text) if unit == "paragraph" else [text]
        docs.extend(p.strip() for p in pieces if p.strip())
    return pa.table({"text": pa.array(docs, type=pa.string())})


# ---------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------
def expand_paths(patterns: list[str]) -> list[str]:
    """Local globs expanded (sorted, `~` allowed); URIs (s3://, hf://, ...) pass through unchanged."""
    out: list[str] = []
    for pat in patterns:
        if "://" in pat:
            out.append(pat)
            continue
        pat = os.path.expanduser(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if glob.has_magic(pat) else [pat]
        matches = [m for m in matches if os.path.isfile(m) or os.path.isdir(m)]
        if not matches:
            raise DataSourceError(f"data.paths: no file matches {pat!r}")
        out.extend(matches)
    return out


def _format_of(path: str) -> str:
    name = path.lower()
    for ext in (".gz", ".zst", ".br", ".lz4"):
        name = name.removesuffix(ext)
    if name.endswith(".parquet") or os.path.isdir(path):
        return "parquet"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    return "txt"


def fineweb_pattern(dataset: str, config: str) -> str:
    """HfFileSystem glob of a FineWeb(-Edu) configuration's parquet files.

    sample-10BT -> datasets/<dataset>/sample/10BT/*.parquet; default -> data/*/*.parquet;
    a dump name (CC-MAIN-2024-10) -> data/CC-MAIN-2024-10/*.parquet.
    """
    if config.startswith("sample-"):
        sub = f"sample/{config[len('sample-'):]}/*.parquet"
    elif config == "default":
        sub = "data/*/*.parquet"
    else:
        sub = f"data/{config}/*.parquet"
    return f"datasets/{dataset}/{sub}"


def list_fineweb_files(dataset: str, config: str) -> tuple[list[str], Any]:
    """(parquet paths, HfFileSystem) of a hub dataset configuration; DataSourceError when unreachable."""
    pattern = fineweb_pattern(dataset, config)
    try:
        from huggingface_hub import HfFileSystem

        fs = HfFileSystem()
        files = sorted(fs.glob(pattern))
    except Exception as exc:  # network, auth and offline-mode errors come in many types
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataSourceError(
            f"cannot list hf://{pattern} on the Hugging Face hub ({type(exc).__name__}: {first}). "
            "Offline? Download the parquet files and set data.paths to them (the same FineWeb reader "
            "runs on local files), or use data.source=local / data.source=generated."
        ) from None
    if not files:
        raise DataSourceError(f"no parquet files match hf://{pattern}; check data.fineweb_dataset and "
                              "data.fineweb_config (e.g. sample-10BT, sample-100BT, default, CC-MAIN-2024-10)")
    return files, fs


# ---------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------
def _file_shuffle(seed: int | None):
    if seed is None:
        return None
    from ray.data import FileShuffleConfig

    return FileShuffleConfig(seed=seed)


def read_fineweb(cfg: "DataConfig", split: Split = "train") -> "ray.data.Dataset":
    """FineWeb-Edu documents (streamed) filtered by score, as {"text"}; `cfg.paths` reads local parquet instead."""
    import ray.data

    if cfg.paths:
        files, fs = expand_paths(cfg.paths), None
    else:
        files, fs = list_fineweb_files(cfg.fineweb_dataset, cfg.fineweb_config)
    columns = [cfg.text_column] + ([cfg.score_column] if cfg.min_score is not None else [])
    ds = ray.data.read_parquet(
        files, filesystem=fs, num_cpus=cfg.cpus_per_task,
        shuffle=_file_shuffle(cfg.shuffle_seed) if split == "train" else None,
    )
    return _prepare(ds.select_columns(columns), cfg, split)  # projection pushed down into the parquet scan


def read_local(cfg: "DataConfig", split: Split = "train") -> "ray.data.Dataset":
    """Local parquet / jsonl / txt files (globs in cfg.paths) as {"text"}; mixed formats are unioned."""
    import ray.data

    files = expand_paths(cfg.paths)
    by_format: dict[str, list[str]] = defaultdict(list)
    for f in files:
        by_format[cfg.format if cfg.format != "auto" else _format_of(f)].append(f)
    shuffle = _file_shuffle(cfg.shuffle_seed) if split == "train" else None
    parts = []
    for fmt, paths in sorted(by_format.items()):
        if fmt == "parquet":
            ds = ray.data.read_parquet(paths, num_cpus=cfg.cpus_per_task, shuffle=shuffle, file_extensions=None)
        elif fmt == "jsonl":
            ds = ray.data.read_json(paths, lines=True, num_cpus=cfg.cpus_per_task, shuffle=shuffle,
                                    file_extensions=None)
        else:
            ds = ray.data.read_binary_files(paths, num_cpus=cfg.cpus_per_task, shuffle=shuffle)
            ds = ds.map_batches(split_text_files, batch_format="pyarrow", batch_size=None,
                                fn_kwargs={"unit": cfg.txt_unit}, num_cpus=cfg.cpus_per_task)
        parts.append(_prepare(ds, cfg, split, text_column="text" if fmt == "txt" else cfg.text_column))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _prepare(ds: "ray.data.Dataset", cfg: "DataConfig", split: Split,
             text_column: str | None = None) -> "ray.data.Dataset":
    return ds.map_batches(
        prepare_text, batch_format="pyarrow", batch_size=None, num_cpus=cfg.cpus_per_task,
        fn_kwargs={"text_column": text_column or cfg.text_column, "score_column": cfg.score_column,
                   "min_score": cfg.min_score, "split": split, "val_fraction": cfg.val_fraction},
    )
