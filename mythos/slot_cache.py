"""A KV cache of row slots, each with its own length: the cache behind iteration-level batching.

`KVCache` serves one batch that starts together (left-padded prompts, one length for all rows).
A server that batches at the iteration level needs rows that come and go: a request takes a free
row (slot) when it arrives, is prefilled on its own, then decodes one token per step beside
whatever other rows are running, at its own position, and frees the row when it ends.

    cache = SlotCache(rows=8, capacity=cfg.max_seq_len)
    model(prompt_ids, n_loops=8, cache=cache.batch([3]))            # prefill row 3 alone
    model(next_ids, n_loops=torch.tensor([8, 2, 16]), cache=cache.batch([3, 0, 5]))  # one step
    cache.release(3)                                               # the request ended

Every slot keyed (stage, layer, loop) is a buffer of shape (rows, capacity, ...), allocated when
first written (an iteration no request has run takes no memory). A forward pass sees the rows it
runs through a `SlotBatch`: queries of row b sit at positions length_b, length_b + 1, ...; keys
past a row's own length are masked, so a row's result does not depend on its neighbours or on
what an earlier request left in its slot. A row that runs fewer loop iterations than its
neighbours simply does not take part in the later ones (`SlotBatch.select`), and its entries for
those iterations are neither read nor written.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .kv_cache import CacheError


class SlotCache:
    """Per-(stage, layer, loop) buffers of `rows` slots by `capacity` positions, a length per row."""

    def __init__(self, rows: int, capacity: int, share_loops: bool = False) -> None:
        if rows < 1 or capacity < 1:
            raise ValueError(f"rows and capacity must be >= 1, got {rows} and {capacity}")
        self.rows, self.capacity, self.share_loops = rows, capacity, share_loops
        self.buffers: dict[tuple[str, int, int], tuple[torch.Tensor, ...]] = {}
        self.lengths = torch.zeros(rows, dtype=torch.long)
        """Positions held per row (on the CPU: read on every step to build positions and masks)."""
        self.loops = [0] * rows
        """The fewest loop iterations each row has run a token with since its prefill: the deepest
        iteration whose entries are complete for every position of the row (with `share_loops`, any)."""

    def batch(self, rows: Sequence[int]) -> "SlotBatch":
        """The view a forward pass over these rows (in this order) reads and extends."""
        rows = [int(r) for r in rows]
        if not rows or len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= self.rows:
            raise ValueError(f"rows must be distinct slots in 0..{self.rows - 1}, got {rows}")
        return SlotBatch(self, torch.tensor(rows, dtype=torch.long), self.lengths[rows].clone())

    def release(self, row: int) -> None:
        """Free a row for the next request (its old entries are masked off and overwritten)."""
        self.lengths[row] = 0
        self.loops[row] = 0

    def move(self, src: int, dst: int) -> None:
        """Move row `src` (its entries, length and loop count) into the free row `dst`; `src` is freed.
        A scheduler keeps its rows in the order it runs them (deepest first) with this, so that every
        pass and every loop iteration reads contiguous rows: buffer slices, not gathered copies."""
        n = int(self.lengths[src])
        with torch.inference_mode():  # the buffers are written in inference mode by the model
            for bufs in self.buffers.values():
                for buf in bufs:
                    buf[dst, :n] = buf[src, :n]
        self.lengths[dst], self.loops[dst] = n, self.loops[src]
        self.release(src)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bufs in self.buffers.values() for b in bufs)


class SlotBatch:
    """The rows of one forward pass: where each row's new tokens go, what each may attend to."""

    def __init__(self, cache: SlotCache, rows: torch.Tensor, lengths: torch.Tensor, span: int | None = None) -> None:
        self.cache, self.rows, self.lengths = cache, rows, lengths
        self.span = int(lengths.max()) if span is None else span
        """The longest row's length in the whole batch: keys are returned up to span + S for every
        row, sub-batches included, so that they match the batch's mask."""
        first = int(rows[0])
        self._contiguous = bool(torch.equal(rows, torch.arange(first, first + len(rows))))
        """Rows r..r+B-1 in order: buffers are sliced (views), not gathered (copies)."""
        self._rows = slice(first, first + len(rows)) if self._contiguous else rows
        lengths_list = lengths.tolist()
        self._same_length = lengths_list[0] if min(lengths_list) == max(lengths_list) else None
        """The rows' one length when they have one (a prefill, or rows that started together)."""
        self._lengths_on: dict[torch.device, torch.Tensor] = {}

    @property
    def share_loops(self) -> bool:
        return self.cache.share_loops

    def __len__(self) -> int:
        return len(self.rows)

    # --- the model's cache protocol (see Mythos.forward) ----------------------------------
    def prepare(self, S: int, n_loops: int | torch.Tensor, device: torch.device
                ) -> tuple[int, torch.Tensor, torch.Tensor | None]:
        """(start, positions (B, S), mask (B, 1, S, L) or None) for S new tokens per row; refuses a
        write past the capacity and loop iterations a row has no entries for."""
        cache, B = self.cache, len(self.rows)
        end = self.span + S
        if end > cache.capacity:
            raise CacheError(f"cache capacity {cache.capacity} exceeded (needs {end} positions)")
        if not cache.share_loops:
            loops = n_loops.tolist() if isinstance(n_loops, torch.Tensor) else [n_loops] * B
            for row, length, n in zip(self.rows.tolist(), self.lengths.tolist(), loops):
                if length > 0 and n > cache.loops[row]:
                    raise CacheError(f"n_loops={n} but row {row} of the cache was filled with {cache.loops[row]} "
                                     "loops: the extra iterations have no keys/values for its earlier tokens")
        lengths = self.lengths.to(device)
        positions = lengths[:, None] + torch.arange(S, device=device)[None, :]
        if self._same_length is not None:
            mask = None  # one length: causal attention aligned to the last key is exact
        else:
            keys = torch.arange(end, device=device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, S, L)
        return end - S, positions, mask  # start: the longest row's (checked against max_seq_len)

    def slot(self, stage: str, layer: int, loop: int = 0) -> "RowSlot":
        if stage == "core" and self.cache.share_loops:
            loop = 0
        return RowSlot(self, (stage, layer, loop))

    def advance(self, S: int, n_loops: int | torch.Tensor) -> None:
        """After the forward pass: the rows hold S more positions, run with these loop counts."""
        cache = self.cache
        loops = n_loops.tolist() if isinstance(n_loops, torch.Tensor) else [n_loops] * len(self.rows)
        for row, length, n in zip(self.rows.tolist(), self.lengths.tolist(), loops):
            cache.loops[row] = n if length == 0 else min(cache.loops[row], n)
        cache.lengths[self.rows] = self.lengths + S
        self.lengths, self.span = self.lengths + S, self.span + S
        self._same_length = None if self._same_length is None else self._same_length + S
        self._lengths_on = {}

    def head(self, k: int) -> "SlotBatch":
        """The first k rows, `select(arange(k))` without an index on the device: the rows still looping
        when a batch is ordered deepest first (its rows and lengths live on the CPU)."""
        return SlotBatch(self.cache, self.rows[:k], self.lengths[:k], self.span)

    def select(self, index: torch.Tensor) -> "SlotBatch":
        """The sub-batch of these rows at `index` (positions into this batch): the rows that take part
        in a loop iteration their neighbours go past."""
        index = index.cpu()
        return SlotBatch(self.cache, self.rows[index], self.lengths[index], self.span)


class RowSlot:
    """One (stage, layer, loop) buffer seen through a SlotBatch: the attention layers' cache slot."""

    def __init__(self, batch: SlotBatch, key: tuple[str, int, int]) -> None:
        self.batch, self.key = batch, key

    def _buffers(self, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        cache = self.batch.cache
        bufs = cache.buffers.get(self.key)
        if bufs is None:
            bufs = cache.buffers[self.key] = tuple(
                torch.zeros((cache.rows, cache.capacity, *t.shape[2:]), dtype=t.dtype, device=t.device) for t in like)
        return bufs

    def update(self, start: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `new` (each (B, S, ...)) at each row's next S positions; return every row's keys up to
        the longest row's end (B, L, ...). `start` is ignored: each row starts at its own length."""
        b, S = self.batch, new[0].shape[1]
        bufs = self._buffers(new)
        end = b.span + S
        rows = b._rows
        if b._contiguous and b._same_length is not None:
            at = b._same_length
            for buf, t in zip(bufs, new):
                buf[rows, at:at + S] = t
        else:
            device = new[0].device
            if device not in b._lengths_on:
                b._lengths_on[device] = b.lengths.to(device)
            pos = b._lengths_on[device][:, None] + torch.arange(S, device=device)[None, :]  # (B, S)
            r = b.rows.to(device)[:, None].expand_as(pos)
            for buf, t in zip(bufs, new):
                buf[r, pos] = t
        if not isinstance(rows, slice):
            rows = rows.to(new[0].device)
        return tuple(buf[rows, :end] for buf in bufs)

    def copy_positions(self, src: "RowSlot", start: int, end: int) -> None:
        """This slot's entries at the rows' newest end - start positions from another loop's slot
        (after a row exits the loop early: later iterations get the last computed entries, Huginn's
        rule). As in `update`, `start` is the batch's, and each row's positions are its own."""
        b, S = self.batch, end - start
        src_bufs = src.batch.cache.buffers[src.key]
        dst_bufs = self._buffers([t[:1] for t in src_bufs])
        for row, length in zip(b.rows.tolist(), b.lengths.tolist()):
            for dst, s in zip(dst_bufs, src_bufs):
                dst[row, length:length + S] = s[row, length:length + S]
