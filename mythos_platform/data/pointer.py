"""The reasoning corpus: pointer-chasing problems as text, one word per pair, with per-loop labels.

A problem is a random *function* f over `n_symbols` symbols (multihop.generate_problem), a start
symbol s and a hop count k; the answer is f^k(s). As text (16 symbols, k = 3):

    "> > > nb cj ph ... mc b"   ->   " j"
     |---| |--- 16 pairs ---| |         `- the answer f^3(b), the next word
     marks (k, optional)      `- the start symbol: its position answers

- Each pair "xy" (x maps to y) is one word, so the word-level tokenizer (`pointer_tokenizer`)
  gives every pair one position. A looped model learns pointer chasing with one position per
  pair and did not learn it with the pair spelled out as several tokens (measured on this
  project's model: docs/depth.md).
- The start symbol comes last, so the position that answers holds the symbol to look up (one
  attention step per hop); with a separate answer mark after it, the start symbol must first
  be copied there, which small models learned far more slowly (docs/depth.md).
- The hop marks (one ">" per hop, in unary so they stay meaningful beyond the trained counts)
  come *first*: the distance between the start symbol and the pairs is then the same for
  every hop count, so a 16-hop prompt puts no relative (RoPE) distance between the answering
  position and the pairs that a 4-hop training prompt did not.
- Every row starts with the tokenizer's end-of-text token, the start-of-document signal that
  the lm-eval adapter and the server also put before a prompt.

Per-loop labels (`rows`): a row holds `input_ids` (prompt + answer, L + 1 ids) and
`loop_labels` (T, L): the label of position i after loop t, -100 everywhere but the answering
position. Two kinds:

- "trajectory": after loop t the label is f^t(s), whatever the marks say: every example
  trains the whole chain, each loop's output feeding the next lookup (the schedule that makes
  pointer chasing extrapolate, see docs/depth.md);
- "hold": after loop t the label is f^min(t, k)(s): hop until k, then stay.

The final label of a row (what a plain next-token loss trains) is its k-hop answer.

For models that should *stop* at k (hop marks on), two more options (`rows`):

- `mark_labels`: the hop marks are labelled too: mark j (counted from the left) should read
  ">" (pending) after loops t < j and <pad> (consumed) after t >= j, a fuse that burns one mark
  per loop from the left, so "are any marks left" is what the answering position must see;
- `marked` per row: rows without marks get trajectory labels (hop on every loop) for their
  first `unmarked_depth` loops and no label after; rows with marks get the chosen labels.
- `with_fixed_point`: a problem whose chain reaches a fixed point within a few hops, so a long
  mark string can be trained (the fuse burns through all of it) while the answer needs no more
  hops than the trained depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal, Sequence

import numpy as np

from .multihop import ALPHABET, MAX_SYMBOLS, Problem, generate_problem, hop_list

IGNORE = -100
MARK = ">"
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"

LoopLabels = Literal["trajectory", "hold"]

__all__ = ["PointerFormat", "pointer_tokenizer", "IGNORE", "MARK"]


@dataclass(frozen=True)
class PointerFormat:
    """How problems over `n_symbols` symbols are written, tokenized and labelled."""

    n_symbols: int = 16
    hop_marks: bool = True
    """Write the hop count as k marks before the pairs (False: the loop count alone says how far to go)."""

    def __post_init__(self) -> None:
        if not 2 <= self.n_symbols <= MAX_SYMBOLS:
            raise ValueError(f"n_symbols must be in 2..{MAX_SYMBOLS}, got {self.n_symbols}")

    # ------------------------------------------------------------------------------ vocabulary
    @property
    def symbols(self) -> str:
        return ALPHABET[: self.n_symbols]

    def vocabulary(self) -> list[str]:
        """Every word, in id order: specials, the mark, the symbols, then the pairs xy."""
        return [PAD, EOS, UNK, MARK, *self.symbols, *(x + y for x in self.symbols for y in self.symbols)]

    @property
    def vocab_size(self) -> int:
        return 4 + self.n_symbols + self.n_symbols**2

    @property
    def symbol_offset(self) -> int:
        return 4

    @property
    def pair_offset(self) -> int:
        return 4 + self.n_symbols

    def prompt_len(self, hops: int) -> int:
        """Tokens of a prompt with `hops` hops, the leading end-of-text token included."""
        return 1 + (hops if self.hop_marks else 0) + self.n_symbols + 1

    # ------------------------------------------------------------------------------ text
    def prompt(self, p: Problem) -> str:
        marks = [MARK] * p.hops if self.hop_marks else []
        return " ".join([*marks, *(a + b for a, b in p.pairs), p.start])

    def answer(self, p: Problem) -> str:
        """The continuation of the prompt: a space and the answer symbol."""
        return " " + p.answer

    # ------------------------------------------------------------------------------ rows
    @cached_property
    def word_ids(self) -> dict[str, int]:
        """Every word's id: its place in `vocabulary()`, as in `pointer_tokenizer`."""
        return {w: i for i, w in enumerate(self.vocabulary())}

    def ids(self, p: Problem, marked: bool | None = None) -> list[int]:
        """Token ids of <eos> + prompt + answer (what `pointer_tokenizer` gives for that text);
        `marked` overrides hop_marks for this problem."""
        w = self.word_ids
        marks = [w[MARK]] * p.hops if (self.hop_marks if marked is None else marked) else []
        return [w[EOS], *marks, *(w[a + b] for a, b in p.pairs), w[p.start], w[p.answer]]

    def rows(self, problems: Sequence[Problem], n_loops: int, labels: LoopLabels = "trajectory",
             length: int | None = None, mark_labels: bool = False, marked: Sequence[bool] | None = None,
             unmarked_depth: int | None = None) -> dict[str, np.ndarray]:
        """{"input_ids": (N, L+1), "labels": (N, L), "loop_labels": (N, n_loops, L)} int32 arrays.

        `labels` holds each row's k-hop answer at its answering position (the start symbol), -100
        elsewhere; `loop_labels[:, t]` the label after loop t + 1. Rows shorter than `length` + 1
        tokens (fewer hop marks) are padded with <pad> on the *right*, after the answer: causal
        attention keeps the padding out of every labelled position, so the model never sees how
        much padding a row has (left padding would tell it the hop count). Default length: the
        longest row. Trajectory labels need every problem's chain to reach n_loops hops
        (`problems(..., chain=n_loops)`). `mark_labels`, `marked` and `unmarked_depth`: see the
        module docstring."""
        if not problems:
            raise ValueError("no problems")
        marked = [self.hop_marks] * len(problems) if marked is None else list(marked)
        raw = [self.ids(p, m) for p, m in zip(problems, marked)]
        L = max(len(r) for r in raw) - 1 if length is None else length
        if any(len(r) > L + 1 for r in raw):
            raise ValueError(f"a problem is longer than length={L} tokens")
        w = self.word_ids
        seqs = [r + [w[PAD]] * (L + 1 - len(r)) for r in raw]
        final = np.full((len(seqs), L), IGNORE, dtype=np.int32)
        loop_labels = np.full((len(seqs), n_loops, L), IGNORE, dtype=np.int32)
        for i, p in enumerate(problems):
            pos = len(raw[i]) - 2  # the start symbol: its output is the answer
            final[i, pos] = raw[i][-1]
            chain = [p.start, *p.steps]  # chain[j] = f^j(start)
            kind = labels if marked[i] else "trajectory"
            last = n_loops if marked[i] or unmarked_depth is None else min(n_loops, unmarked_depth)
            for t in range(1, last + 1):
                j = t if kind == "trajectory" else min(t, p.hops)
                if j >= len(chain):
                    raise ValueError(f"trajectory labels for {n_loops} loops need chains of >= {n_loops} hops; "
                                     f"problem has {p.hops}")
                loop_labels[i, t - 1, pos] = w[chain[j]]
                if mark_labels and marked[i]:
                    for m in range(1, p.hops + 1):  # mark m is the input at position m (after <eos>):
                        loop_labels[i, t - 1, m] = w[PAD] if t >= m else w[MARK]  # consumed from loop m, else pending
        return {"input_ids": np.asarray(seqs, dtype=np.int32), "labels": final, "loop_labels": loop_labels}


def chain_problem(index: int, hops: int, chain: int, seed: int, n_symbols: int, stream: int) -> Problem:
    """Problem `index` of (seed, stream) with `hops` hops, its chain f^1..f^max(hops, chain) computed
    (so trajectory labels can run past the stated hop count)."""
    p = generate_problem(index, max(hops, chain), seed, n_symbols, stream)
    return Problem(pairs=p.pairs, start=p.start, hops=hops, answer=p.steps[hops - 1], steps=p.steps)


def with_fixed_point(p: Problem, within: int, rng: np.random.Generator, chain: int) -> Problem:
    """`p` with its map changed so that the chain from the start reaches a fixed point (f(x) = x)
    after j <= `within` hops: then f^k(start) is the same for every k >= j, and a row of many hop
    marks needs no more than `within` distinct hops."""
    j = int(rng.integers(1, within + 1))
    x = p.steps[j - 1]  # f^j(start)
    f = {a: (a if a == x else b) for a, b in p.pairs}
    pairs = tuple((a, f[a]) for a, _ in p.pairs)
    steps, cur = [], p.start
    for _ in range(max(p.hops, chain)):
        cur = f[cur]
        steps.append(cur)
    return Problem(pairs=pairs, start=p.start, hops=p.hops, answer=steps[p.hops - 1], steps=tuple(steps))


def problems(n: int, hops: int | Sequence[int], chain: int, seed: int, n_symbols: int, stream: int,
             start_index: int = 0) -> list[Problem]:
    """`n` problems with hop counts drawn from `hops` (per problem, reproducibly) and chains of >= `chain` hops."""
    choices = hop_list(hops)
    out = []
    for i in range(start_index, start_index + n):
        k = choices[int(np.random.default_rng([int(seed) & 0xFFFFFFFF, int(stream), int(i), 7]).integers(len(choices)))]
        out.append(chain_problem(i, k, chain, seed, n_symbols, stream))
    return out


def pointer_tokenizer(fmt: PointerFormat):
    """A word-level Hugging Face `tokenizers` tokenizer of `fmt`'s vocabulary (saved with the model as
    tokenizer.json, so the model folder reads the problem as text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from mythos.tokenizer import HFTokenizer

    vocab = {w: i for i, w in enumerate(fmt.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([PAD, EOS, UNK])
    return HFTokenizer(tok, f"pointer-{fmt.n_symbols}", eos_token=EOS)
