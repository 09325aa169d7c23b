"""A compact token format for multi-hop problems: one position per (x, f(x)) pair.

The text format (multihop.render) costs the byte tokenizer three positions per pair; in a
pilot on these machines (shared/RESEARCH.md) no model learned in the time available with
such a spelling, while with one position per pair looped models learned an exact
one-hop-per-iteration operator. This format gives each pair its own token:

    ids  0 .. S-1            the symbols (S = n_symbols)
         S .. S + S*S - 1    the pair tokens, S + x*S + f(x)
         HOP, EQ, PAD        a hop mark, the answer mark, padding

    answer_at="start" (default):  <pair tokens in the problem's order> <HOP x k> <start symbol>
    answer_at="eq":               <pair tokens in the problem's order> <start symbol> <HOP x k> <EQ>

The model reads the answer off the last position. The hop count is in unary, so it stays
meaningful beyond the trained range. Per-loop targets (deep supervision): after loop t
(1-based) the target is f^min(t, k)(start) — one hop per iteration, then stay.

Why the start symbol goes last by default: there the position that answers holds the start
symbol itself, so one iteration's attention can look its pair up directly. With a separate EQ
position the model must first copy the start symbol over (one attention step) and then look it
up (a second one that only pays off once the first works); measured here, a 3-block model
learned the one-hop lookup in ~300 steps with the start symbol last and stayed at chance for
4,000 steps with EQ last (docs/depth.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from .multihop import ALPHABET, Problem


@dataclass(frozen=True)
class PairTokenFormat:
    n_symbols: int = 16
    answer_at: Literal["start", "eq"] = "start"

    def __post_init__(self) -> None:
        if self.answer_at not in ("start", "eq"):
            raise ValueError(f"answer_at must be 'start' or 'eq', got {self.answer_at!r}")

    @property
    def pair_offset(self) -> int:
        return self.n_symbols

    @property
    def hop_id(self) -> int:
        return self.n_symbols + self.n_symbols**2

    @property
    def eq_id(self) -> int:
        return self.hop_id + 1

    @property
    def pad_id(self) -> int:
        return self.hop_id + 2

    @property
    def vocab_size(self) -> int:
        return self.hop_id + 3

    def max_len(self, max_hops: int) -> int:
        return self.n_symbols + max_hops + (2 if self.answer_at == "eq" else 1)

    def is_pair(self, ids: torch.Tensor) -> torch.Tensor:
        return (ids >= self.pair_offset) & (ids < self.hop_id)

    def pair_parts(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) symbol ids of pair tokens (meaningless elsewhere; mask with is_pair)."""
        p = (ids - self.pair_offset).clamp(0, self.n_symbols**2 - 1)
        return p // self.n_symbols, p % self.n_symbols

    def symbol(self, s: str) -> int:
        i = ALPHABET.index(s)
        if i >= self.n_symbols:
            raise ValueError(f"symbol {s!r} is outside the first {self.n_symbols} symbols")
        return i

    def encode(self, p: Problem) -> list[int]:
        pairs = [self.pair_offset + self.symbol(a) * self.n_symbols + self.symbol(b) for a, b in p.pairs]
        if self.answer_at == "eq":
            return pairs + [self.symbol(p.start)] + [self.hop_id] * p.hops + [self.eq_id]
        return pairs + [self.hop_id] * p.hops + [self.symbol(p.start)]

    def batch(self, problems: Sequence[Problem], n_loops: int, max_hops: int | None = None) -> dict[str, torch.Tensor]:
        """Right-padded (B, L) input_ids, the answering (last) position, the answer and (B, n_loops)
        per-loop targets."""
        seqs = [self.encode(p) for p in problems]
        L = self.max_len(max_hops) if max_hops is not None else max(len(s) for s in seqs)
        ids = torch.full((len(seqs), L), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        answer_pos = torch.tensor([len(s) - 1 for s in seqs])
        steps = [[self.symbol(x) for x in p.steps] for p in problems]
        targets = torch.tensor([[st[min(t, len(st)) - 1] for t in range(1, n_loops + 1)] for st in steps])
        answers = torch.tensor([self.symbol(p.answer) for p in problems])
        hops = torch.tensor([p.hops for p in problems])
        return {"input_ids": ids, "answer_pos": answer_pos, "answers": answers, "loop_targets": targets,
                "hops": hops}
