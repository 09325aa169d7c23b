"""KV cache: one slot per attention layer and loop iteration, preallocated to a fixed capacity.

Slots are keyed by (stage, layer, loop). Prelude and coda layers run once, so their loop is
always 0; the recurrent block's layers get one slot per loop iteration, because the hidden
state (and so K and V) differs at every iteration. With `share_loops=True` the recurrent
layers keep one slot for all iterations (Huginn-style cache sharing): each iteration
overwrites the entry of the current positions, so the cache size no longer grows with the
loop count and any loop count can be decoded; the result is then an approximation of the
full recomputation rather than equal to it.

Each slot stores whatever its attention type caches: GQA keeps (k, v) per kv head, MLA keeps
the compressed kv latent and one RoPE key shared by all heads.
"""

from __future__ import annotations

import torch


class CacheError(ValueError):
    """The cache cannot serve this request (e.g. more loops than it was prefilled with)."""


class LayerCache:
    """Buffers of shape (B, capacity, ...) for one attention layer at one loop iteration."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch = batch
        self.capacity = capacity
        self.buffers: tuple[torch.Tensor, ...] | None = None
        self.length = 0

    def update(self, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` (each (B, S, ...)) at positions start..start+S-1; return all (B, start+S, ...)."""
        S = new[0].shape[1]
        end = start + S
        if start > self.length:
            raise CacheError(
                f"cache slot holds {self.length} positions but the write starts at {start}: "
                "this layer/loop was skipped for earlier tokens (decode with at most the loop count "
                "the prompt was prefilled with, or prefill again)"
            )
        if end > self.capacity:
            raise CacheError(f"cache capacity {self.capacity} exceeded (needs {end} positions)")
        if self.buffers is None:
            self.buffers = tuple(
                torch.empty((self.batch, self.capacity, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in new
            )
        for buf, t in zip(self.buffers, new):
            buf[:, start:end] = t
        self.length = end
        return tuple(buf[:, :end] for buf in self.buffers)

    def copy_positions(self, src: "LayerCache", start: int, end: int) -> None:
        """Fill positions start..end-1 from another slot (used when a loop exits early)."""
        assert src.buffers is not None
        if self.buffers is None:
            self.buffers = tuple(torch.empty_like(b) for b in src.buffers)
        if start > self.length:
            raise CacheError(f"cannot copy into a slot holding {self.length} positions at {start}")
        for dst, s in zip(self.buffers, src.buffers):
            dst[:, start:end] = s[:, start:end]
        self.length = end

    def nbytes(self, upto: int | None = None) -> int:
        if self.buffers is None:
            return 0
        n = self.length if upto is None else upto
        return sum(b[:, :n].numel() * b.element_size() for b in self.buffers)


class KVCache:
    """The whole model's cache for a batch of sequences being generated."""

    def __init__(self, batch: int, capacity: int, share_loops: bool = False) -> None:
        self.batch = batch
        self.capacity = capacity
        self.share_loops = share_loops
        self.slots: dict[tuple[str, int, int], LayerCache] = {}
        self.length = 0
        self.n_loops: int | None = None
        # (B, capacity) bool: which key positions hold real tokens (None: all do, no padding)
        self.key_valid: torch.Tensor | None = None
        # (B,) left-padding per row, so that positions start at 0 at each row's first real token
        self.pad: torch.Tensor | None = None

    def slot(self, stage: str, layer: int, loop: int = 0) -> LayerCache:
        if stage == "core" and self.share_loops:
            loop = 0
        key = (stage, layer, loop)
        s = self.slots.get(key)
        if s is None:
            s = self.slots[key] = LayerCache(self.batch, self.capacity)
        return s

    def set_padding(self, pad: torch.Tensor) -> None:
        """Declare left padding: row b's first pad[b] positions are not tokens."""
        self.pad = pad
        cols = torch.arange(self.capacity, device=pad.device)
        self.key_valid = cols[None, :] >= pad[:, None]

    def positions(self, start: int, S: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(start, start + S, device=device)[None, :].expand(self.batch, S)
        if self.pad is not None:
            pos = (pos - self.pad[:, None]).clamp_min(0)
        return pos

    # --- the model's cache protocol (see Mythos.forward; SlotBatch has the same) ------------
    def prepare(self, S: int, n_loops: int, device: torch.device) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """(start, positions (B, S), mask (B, 1, S, L) or None) for S new tokens; refuses loop
        iterations that hold no keys and values for the earlier tokens."""
        start = self.length
        if start > 0 and not self.share_loops and n_loops > (self.n_loops or 0):
            raise CacheError(
                f"n_loops={n_loops} but the cache was filled with {self.n_loops} loops: the extra iterations "
                "have no keys/values for earlier tokens. Decode with n_loops <= that, prefill again, or use "
                "KVCache(share_loops=True)"
            )
        return start, self.positions(start, S, device), self.padding_mask(start, S, device)

    def advance(self, S: int, n_loops: int) -> None:
        """After the forward pass: S more positions, run with n_loops iterations."""
        self.n_loops = n_loops if self.length == 0 else min(self.n_loops or n_loops, n_loops)
        self.length += S

    def padding_mask(self, start: int, S: int, device: torch.device) -> torch.Tensor | None:
        """(B, 1, S, L) bool mask for a left-padded batch; None when no row is padded."""
        if self.key_valid is None:
            return None
        L = start + S
        q = torch.arange(start, L, device=device)[:, None]
        k = torch.arange(L, device=device)[None, :]
        allowed = (k <= q)[None] & self.key_valid[:, None, :L]
        # a pad query attends to itself, so no row is fully masked (which would give NaNs)
        return (allowed | (k == q)[None])[:, None]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.slots.values())

    def bytes_per_token(self) -> float:
        """Bytes held per cached token and sequence, summed over all layers and loop iterations."""
        return self.nbytes() / max(self.length * self.batch, 1)
