"""Multi-hop pointer chasing: a generated corpus whose required reasoning depth is a parameter.

Each problem is a random *function* f over a small alphabet (not a permutation: a
permutation's cycles let "answer the start symbol" score above chance for some hop
counts), a start symbol s and a hop count k; the answer is f^k(s). The per-step
targets [f^1(s), ..., f^k(s)] ride along for losses at every loop iteration.

Text format (what the tokenizer sees), for 16 symbols and k = 3:

    "nb cj ... ph mc b>>>=" + "j"
     |--- 16 pairs ----|  | |  `- answer f^3(b)
                          | `- hop count in unary ('>' per hop), meaningful beyond training depths
                          `- start symbol

- Pairs are "<x><f(x)>", one per symbol, space-separated, in a random order (so the
  position of a pair says nothing about its source). A BPE tokenizer turns each " xy"
  into one token; the byte tokenizer sees 3 positions per pair.
- The prompt is 3 * n_symbols + 2 + k characters (52 + k for 16 symbols); the training
  document is prompt + answer (documents are separated by EOS when packed).
- Symbols are a-z then A-Z (n_symbols <= 52); ' ', '>' and '=' are never symbols.

Determinism: problem i of (seed, stream) depends only on those three integers
(`numpy.random.default_rng([seed, stream, i])`), so any slice of a corpus can be
generated on any worker and comes out identical. Training uses stream 0, the built-in
validation split stream 1; held-out evaluation uses other seeds and hop counts.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

ALPHABET = string.ascii_lowercase + string.ascii_uppercase
HOP_MARK = ">"
ANSWER_MARK = "="
MAX_SYMBOLS = len(ALPHABET)

__all__ = [
    "Problem",
    "generate_problem",
    "generate_problems",
    "render",
    "document",
    "corpus_documents",
    "hop_list",
    "ALPHABET",
]


@dataclass(frozen=True)
class Problem:
    """One pointer-chasing problem. `steps[t]` is f^(t+1)(start); `answer == steps[-1]`."""

    pairs: tuple[tuple[str, str], ...]
    """(x, f(x)) for every symbol x, in the order the prompt lists them."""
    start: str
    hops: int
    answer: str
    steps: tuple[str, ...]

    @property
    def mapping(self) -> dict[str, str]:
        return dict(self.pairs)


def hop_list(hops: int | Iterable[int]) -> list[int]:
    """An int or a range / list of hop counts -> a non-empty list of positive ints."""
    out = [hops] if isinstance(hops, (int, np.integer)) else list(hops)
    if not out or any(int(h) < 1 for h in out):
        raise ValueError(f"hop counts must be a non-empty set of ints >= 1, got {hops!r}")
    return [int(h) for h in out]


def generate_problem(index: int, hops: int | Sequence[int], seed: int = 0, n_symbols: int = 16,
                     stream: int = 0) -> Problem:
    """Problem number `index` of the corpus (seed, stream); the hop count is drawn from `hops`."""
    if not 2 <= n_symbols <= MAX_SYMBOLS:
        raise ValueError(f"n_symbols must be in 2..{MAX_SYMBOLS}, got {n_symbols}")
    choices = hop_list(hops)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(stream), int(index)])
    f = rng.integers(0, n_symbols, size=n_symbols)  # a random function, not a permutation
    order = rng.permutation(n_symbols)
    s = int(rng.integers(0, n_symbols))
    k = choices[int(rng.integers(0, len(choices)))] if len(choices) > 1 else choices[0]
    steps, x = [], s
    for _ in range(k):
        x = int(f[x])
        steps.append(ALPHABET[x])
    pairs = tuple((ALPHABET[i], ALPHABET[int(f[i])]) for i in order)
    return Problem(pairs=pairs, start=ALPHABET[s], hops=k, answer=steps[-1], steps=tuple(steps))


def generate_problems(n: int, hops: int | Iterable[int], seed: int = 0, n_symbols: int = 16,
                      start_index: int = 0, stream: int = 0) -> list[Problem]:
    """`n` problems (indices start_index..start_index+n-1) with hop counts drawn uniformly from `hops`."""
    choices = hop_list(hops)
    return [generate_problem(i, choices, seed, n_symbols, stream) for i in range(start_index, start_index + n)]


def render(problem: Problem) -> tuple[str, str]:
    """(prompt, answer) in the text format of this module's docstring."""
    pairs = " ".join(a + b for a, b in problem.pairs)
    return f"{pairs} {problem.start}{HOP_MARK * problem.hops}{ANSWER_MARK}", problem.answer


def document(problem: Problem) -> str:
    """The training text: prompt followed by the answer."""
    prompt, answer = render(problem)
    return prompt + answer


def corpus_documents(n: int, hops: int | Iterable[int], seed: int = 0, n_symbols: int = 16,
                     start_index: int = 0, stream: int = 0) -> Iterator[str]:
    """Training texts (prompt + answer) of problems start_index..start_index+n-1, lazily."""
    choices = hop_list(hops)
    for i in range(start_index, start_index + n):
        yield document(generate_problem(i, choices, seed, n_symbols, stream))
