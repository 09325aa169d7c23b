"""Tokenize documents and pack them into fixed-length blocks.

Packing (`pack_documents`): the documents of one batch become one token stream
`doc_1 EOS doc_2 EOS ... doc_n EOS`, cut into consecutive, non-overlapping blocks of
`seq_len + 1` tokens (a block gives inputs `[:-1]` and targets `[1:]`). Documents run
across block boundaries. The tail of a batch's stream shorter than a block is dropped,
so at most `seq_len` tokens are lost per batch (`docs_per_batch` sets the batch); a
document longer than a block simply spans several blocks.

`tokenize_and_pack` is the Ray Data `map_batches` function: a batch of {"text": [...]}
in, a batch of {"input_ids": int32 array (n_blocks, seq_len + 1)} out.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["encode_documents", "pack_documents", "tokenize_and_pack"]


def encode_documents(texts: Sequence[str], tokenizer: Any) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), as int32 arrays."""
    if getattr(tokenizer, "kind", None) == "byte":  # bytes are the ids: skip the Python-list round trip
        return [np.frombuffer(str(t).encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]
    return [np.asarray(ids, dtype=np.int32) for ids in tokenizer.encode_batch([str(t) for t in texts])]


def pack_documents(docs: Sequence[Sequence[int] | np.ndarray], eos_id: int, block_len: int) -> np.ndarray:
    """(n_blocks, block_len) int32: the stream doc EOS doc EOS ... cut into full blocks, tail dropped."""
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2 (seq_len + 1), got {block_len}")
    eos = np.array([eos_id], dtype=np.int32)
    parts = []
    for d in docs:
        parts.append(np.asarray(d, dtype=np.int32))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    n_blocks = len(stream) // block_len
    return stream[: n_blocks * block_len].reshape(n_blocks, block_len)


def tokenize_and_pack(batch: dict[str, np.ndarray], tokenizer: Any, seq_len: int,
                      text_column: str = "text") -> dict[str, np.ndarray]:
    """Ray Data batch function: {"text": texts} -> {"input_ids": (n_blocks, seq_len + 1) int32}."""
    docs = encode_documents(list(batch[text_column]), tokenizer)
    return {"input_ids": pack_documents(docs, tokenizer.eos_id, seq_len + 1)}
