"""Bytes autograd saves for backward: what activation checkpointing and the memory plan are about."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def saved_bytes(model: nn.Module) -> Iterator[list[int]]:
    """Within the block, count the bytes of tensors autograd saves (unique storages, the model's
    parameters excluded); the total is in the yielded list's one item once the block ends."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.data_ptr() != 0:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    total = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield total
    total[0] = sum(seen.values())
