"""`build_datasets`: a DataConfig and a tokenizer -> (train, validation) Ray Datasets of packed blocks.

Rows are {"input_ids": int32 array of length seq_len + 1}; a training worker reads its
shard with `ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=...)`,
and uses `x = ids[:, :-1]`, `y = ids[:, 1:]` (cast to int64 for the embedding).

    source -> prepare_text (score filter, text column, hash split) -> tokenize + pack
           -> (train only) block shuffle -> limit

- generated: problems are made and packed in fixed chunks of `docs_per_batch` problems
  (chunk c holds problems c*B .. c*B+B-1), so the blocks do not depend on how Ray
  partitions the work: the same seed gives the same blocks on any cluster. Validation
  uses the problems of seed stream 1 (`val_docs` of them), training stream 0.
- pointer: the reasoning corpus (data/pointer.py), one problem per row, no packing: rows are
  {"input_ids": int32[L + 1], "labels": int32[L], "loop_labels": int32[T, L]} with the answer
  label at the last position. Training problems (stream 0) have min_hops..max_hops hops and
  T = label_loops per-loop labels; validation problems (stream 1, `val_docs`) have val_hops
  hops, deeper than training, and labels for every loop up to val_hops.
- local / fineweb: documents are split by a hash of their text (`val_fraction`); each
  tokenize batch of `docs_per_batch` documents is packed on its own (tail dropped).

Small machines: every read and map task asks for `cpus_per_task` CPUs (fractional), so
data tasks run beside Ray Train workers instead of waiting for a whole free CPU (with
2 CPUs and two 1-CPU workers, whole-CPU data tasks deadlock). `materialize: true`
computes the training set up front instead of streaming it. The validation set, capped
by `val_blocks`, is always materialized: it is small and is read at every evaluation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from mythos_platform.data import multihop, pointer
from mythos_platform.data.packing import pack_documents, encode_documents, tokenize_and_pack
from mythos_platform.data.sharding import keep_order
from mythos_platform.data.sources import read_fineweb, read_local

if TYPE_CHECKING:
    import ray.data

    from mythos_platform.config import DataConfig

log = logging.getLogger(__name__)

TRAIN_STREAM, VAL_STREAM = 0, 1

__all__ = ["build_datasets", "generated_blocks", "TRAIN_STREAM", "VAL_STREAM"]


def _chunk_ranges(batch: dict[str, np.ndarray], n_docs: int, docs_per_chunk: int) -> Iterator[tuple[int, int]]:
    """(first problem index, problem count) of each chunk id in a batch of `_chunks`."""
    for c in batch["chunk"]:
        start = int(c) * docs_per_chunk
        yield start, min(docs_per_chunk, n_docs - start)


def _chunks(cfg: "DataConfig", n_docs: int, fn: Callable[..., dict[str, np.ndarray]],
            **fn_kwargs: Any) -> "ray.data.Dataset":
    """The problems 0..n_docs in chunks of `cfg.docs_per_batch`, one Ray Data task each:
    `fn(batch, n_docs=, docs_per_chunk=, **fn_kwargs)` turns a batch of chunk ids into rows."""
    import ray.data

    n_chunks = -(-n_docs // cfg.docs_per_batch)
    chunks = ray.data.from_items([{"chunk": c} for c in range(n_chunks)])
    return chunks.map_batches(fn, batch_format="numpy", batch_size=1, num_cpus=cfg.cpus_per_task,
                              fn_kwargs={"n_docs": n_docs, "docs_per_chunk": cfg.docs_per_batch, **fn_kwargs})


def generated_blocks(batch: dict[str, np.ndarray], *, n_docs: int, docs_per_chunk: int, hops: list[int],
                     seed: int, n_symbols: int, stream: int, tokenizer: Any, seq_len: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: {"chunk": chunk ids} -> the packed blocks of those chunks' problems."""
    out = []
    for start, n in _chunk_ranges(batch, n_docs, docs_per_chunk):
        texts = list(multihop.corpus_documents(n, hops, seed, n_symbols, start_index=start, stream=stream))
        out.append(pack_documents(encode_documents(texts, tokenizer), tokenizer.eos_id, seq_len + 1))
    blocks = np.concatenate(out) if out else np.zeros((0, seq_len + 1), dtype=np.int32)
    return {"input_ids": blocks}


def _generated(cfg: "DataConfig", tokenizer: Any, n_docs: int, stream: int) -> "ray.data.Dataset":
    return _chunks(cfg, n_docs, generated_blocks, hops=list(range(cfg.min_hops, cfg.max_hops + 1)), seed=cfg.seed,
                   n_symbols=cfg.n_symbols, stream=stream, tokenizer=tokenizer, seq_len=cfg.seq_len)


def pointer_rows(batch: dict[str, np.ndarray], *, n_docs: int, docs_per_chunk: int, hops: list[int], chain: int,
                 labels: str, seed: int, n_symbols: int, hop_marks: bool, stream: int, mark_labels: bool = False,
                 unmarked_fraction: float = 0.0, unmarked_depth: int | None = None, fixed_point_fraction: float = 0.0,
                 fixed_point_hops: list[int] | None = None) -> dict[str, np.ndarray]:
    """Ray Data batch function: {"chunk": chunk ids} -> the rows of those chunks' problems (source pointer).
    A `fixed_point_fraction` of the problems instead have hop counts from `fixed_point_hops` and a map
    whose chain reaches a fixed point within max(hops) hops (`pointer.with_fixed_point`)."""
    fmt = pointer.PointerFormat(n_symbols, hop_marks)
    length = fmt.prompt_len(max([*hops, *(fixed_point_hops or [])]))
    out = []
    for start, n in _chunk_ranges(batch, n_docs, docs_per_chunk):
        probs = pointer.problems(n, hops, chain, seed, n_symbols, stream, start_index=start)
        if fixed_point_fraction > 0:
            for i in range(n):
                rng = np.random.default_rng([seed & 0xFFFFFFFF, stream, start + i, 13])
                if rng.random() < fixed_point_fraction:
                    k = int(rng.choice(fixed_point_hops))
                    deep = pointer.chain_problem(start + i, k, chain, seed, n_symbols, stream)
                    probs[i] = pointer.with_fixed_point(deep, max(hops), rng, chain)
        marked = [hop_marks and np.random.default_rng([seed & 0xFFFFFFFF, stream, start + i, 11]).random()
                  >= unmarked_fraction for i in range(n)]
        out.append(fmt.rows(probs, chain, labels, length=length, mark_labels=mark_labels,  # type: ignore[arg-type]
                            marked=marked, unmarked_depth=unmarked_depth))
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def _pointer(cfg: "DataConfig", n_docs: int, stream: int, hops: list[int], chain: int,
             train: bool = True) -> "ray.data.Dataset":
    return _chunks(cfg, n_docs, pointer_rows, hops=hops, chain=chain, labels=cfg.loop_labels, seed=cfg.seed,
                   n_symbols=cfg.n_symbols, hop_marks=cfg.hop_marks, stream=stream,
                   mark_labels=cfg.mark_labels and train, unmarked_fraction=cfg.unmarked_fraction if train else 0.0,
                   unmarked_depth=cfg.unmarked_depth if cfg.unmarked_depth is not None else cfg.max_hops,
                   fixed_point_fraction=cfg.fixed_point_fraction if train else 0.0,
                   fixed_point_hops=list(range(cfg.max_hops + 1, cfg.fixed_point_max_hops + 1)))


def _packed(docs: "ray.data.Dataset", cfg: "DataConfig", tokenizer: Any) -> "ray.data.Dataset":
    return docs.map_batches(
        tokenize_and_pack, batch_format="numpy", batch_size=cfg.docs_per_batch, num_cpus=cfg.cpus_per_task,
        fn_kwargs={"tokenizer": tokenizer, "seq_len": cfg.seq_len},
    )


def build_datasets(cfg: "DataConfig", tokenizer: Any) -> tuple["ray.data.Dataset", "ray.data.Dataset | None"]:
    """(train, val) Datasets of {"input_ids": int32[seq_len + 1]}; val is None when the split is empty.

    Needs Ray initialised (or initialises a local one, as Ray Data does). Reader errors
    such as an unreachable hub raise `DataSourceError` here, before any training starts.
    With data.order fixed, the datasets keep their block order (see data/sharding.py).
    """
    if cfg.resolved_order == "fixed":
        keep_order()
    if cfg.source == "pointer":
        train = _pointer(cfg, cfg.n_docs, TRAIN_STREAM, list(range(cfg.min_hops, cfg.max_hops + 1)),
                         cfg.resolved_label_loops)
        val_hops = cfg.resolved_val_hops
        val = _pointer(cfg, cfg.val_docs, VAL_STREAM, [val_hops], val_hops, train=False) if cfg.val_docs > 0 else None
    elif cfg.source == "generated":
        train = _generated(cfg, tokenizer, cfg.n_docs, TRAIN_STREAM)
        val = _generated(cfg, tokenizer, cfg.val_docs, VAL_STREAM) if cfg.val_docs > 0 else None
    else:
        read = read_fineweb if cfg.source == "fineweb" else read_local
        train = _packed(read(cfg, "train"), cfg, tokenizer)
        val = _packed(read(cfg, "val"), cfg, tokenizer) if cfg.val_fraction > 0 else None

    if cfg.shuffle_seed is not None and cfg.source != "fineweb":
        train = train.random_shuffle(seed=cfg.shuffle_seed)
    if cfg.num_blocks is not None:
        train = train.limit(cfg.num_blocks)
    if cfg.materialize:
        train = train.materialize()
    if val is not None:
        if cfg.val_blocks == 0:
            val = None
        else:
            if cfg.val_blocks is not None:
                val = val.limit(cfg.val_blocks)
            val = val.materialize()
            if val.count() == 0:
                log.warning("the validation split is empty (val_fraction=%s); evaluating without one",
                            cfg.val_fraction)
                val = None
    return train, val
