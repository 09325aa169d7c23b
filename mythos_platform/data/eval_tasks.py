"""Generate the data files of the local evaluation tasks (fully offline, deterministic).

    python -m mythos_platform.data.eval_tasks          # rewrites evals/tasks/data/*.jsonl
    python -m mythos_platform.data.eval_tasks --check  # exit 1 if the files differ from a fresh build

The task definitions live in `evals/tasks` (the lm-eval adapter, which depends on `mythos` only);
their data come from the platform's generators, so the builder lives here. Every file comes from
`mythos_platform.data.multihop` with seeds the demo model never saw
(training uses seed 0 stream 0, validation seed 0 stream 1):

| file                  | seed     | hops        | what                                       |
|-----------------------|----------|-------------|--------------------------------------------|
| multihop_k{k}.jsonl   | 1000 + k | k (1..8)    | one hop count per file; 5..8 never trained |
| multihop_gen.jsonl    | 1100     | 1..8 mixed  | free generation of the answer              |
| multihop_choice.jsonl | 1200     | 1..8 mixed  | 4 choices: answer + start / hop-neighbours |
| multihop_ppl.jsonl    | 1300     | 1..4 mixed  | held-out documents of the training mix     |
| pointer_k{k}.jsonl    | 3000 + k | k (1..16)   | the reasoning corpus's text (word-level    |
|                       |          |             | tokenizer): marks, pairs, start symbol     |

The pointer_k tasks are written in `mythos_platform.data.pointer`'s format with 16 symbols and
hop marks on; rows also carry the chain f^0(start)..f^k(start), from which the shallow floor is
computed (the best score of answering f^j(start) for one fixed j <= the trained hop count).

Rows carry the prompt, the answer, the start symbol and the hop count, so the "answer = start
symbol" floor of every task can be computed from its file (`evals.task_data.floor_start_symbol`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from evals.catalog import TASKS_DIR
from mythos_platform.data import pointer
from mythos_platform.data.multihop import ALPHABET, Problem, document, generate_problems, render

DATA_DIR = TASKS_DIR / "data"
N_PER_TASK = 200
N_SYMBOLS = 16
HOPS = range(1, 9)
TRAINED_HOPS = range(1, 5)
POINTER_HOPS = range(1, 17)
POINTER_SEED = 3000
TASK_YAML = """# Pointer chasing, {k} hop(s){note}; held-out seed {seed}. Written by mythos_platform/data/eval_tasks.py.
include: _pointer_k_template.yaml
task: pointer_k{k}
dataset_kwargs:
  file: pointer_k{k}.jsonl
"""
N_CHOICES = 4


def _row(p: Problem) -> dict:
    prompt, answer = render(p)
    return {"prompt": prompt, "answer": answer, "start": p.start, "hops": p.hops}


def _choices(p: Problem, rng: np.random.Generator) -> tuple[list[str], int]:
    """The answer plus N_CHOICES - 1 distinct distractors: the start symbol and the neighbouring hops
    first (what a model that stops early or runs on would say), then random symbols."""
    chain = [p.start, *p.steps]
    near = [chain[p.hops - 1], p.start, p.mapping[p.answer]]
    pool = [s for s in dict.fromkeys(near) if s != p.answer]
    others = [s for s in ALPHABET[:N_SYMBOLS] if s != p.answer and s not in pool]
    rng.shuffle(others)
    options = [p.answer, *(pool + others)[: N_CHOICES - 1]]
    order = rng.permutation(N_CHOICES)
    options = [options[i] for i in order]
    return options, options.index(p.answer)


def build() -> dict[str, list[dict]]:
    files: dict[str, list[dict]] = {}
    for k in HOPS:
        files[f"multihop_k{k}.jsonl"] = [_row(p) for p in generate_problems(N_PER_TASK, k, seed=1000 + k,
                                                                             n_symbols=N_SYMBOLS)]
    files["multihop_gen.jsonl"] = [_row(p) for p in generate_problems(N_PER_TASK, HOPS, seed=1100,
                                                                       n_symbols=N_SYMBOLS)]
    rng = np.random.default_rng(1200)
    rows = []
    for p in generate_problems(N_PER_TASK, HOPS, seed=1200, n_symbols=N_SYMBOLS):
        choices, gold = _choices(p, rng)
        rows.append({**_row(p), "choices": choices, "gold": gold})
    files["multihop_choice.jsonl"] = rows
    files["multihop_ppl.jsonl"] = [{"text": document(p), "hops": p.hops}
                                   for p in generate_problems(N_PER_TASK, TRAINED_HOPS, seed=1300,
                                                              n_symbols=N_SYMBOLS)]
    fmt = pointer.PointerFormat(N_SYMBOLS, hop_marks=True)
    for k in POINTER_HOPS:
        probs = pointer.problems(N_PER_TASK, k, k, POINTER_SEED + k, N_SYMBOLS, stream=0)
        files[f"pointer_k{k}.jsonl"] = [{"prompt": fmt.prompt(p), "answer": fmt.answer(p), "start": p.start,
                                          "hops": p.hops, "chain": p.start + "".join(p.steps[:k])} for p in probs]
    return files


def task_yamls() -> dict[str, str]:
    """The pointer_k task files (one per hop count)."""
    return {f"pointer_k{k}.yaml": TASK_YAML.format(k=k, seed=POINTER_SEED + k, note=" (trained: <= 4)" if k <= 4
                                                    else " (deeper than trained)") for k in POINTER_HOPS}


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)


def write(data_dir: Path = DATA_DIR) -> list[Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for name, rows in build().items():
        path = data_dir / name
        path.write_text(_dump(rows))
        out.append(path)
    for name, text in task_yamls().items():
        path = data_dir.parent / name
        path.write_text(text)
        out.append(path)
    return out


def stale_files(data_dir: Path = DATA_DIR) -> list[str]:
    """Names of data files that are missing or differ from a fresh build."""
    return [name for name, rows in build().items()
            if not (data_dir / name).exists() or (data_dir / name).read_text() != _dump(rows)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only compare the files with a fresh build")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print(f"stale task data: {', '.join(stale)}; run python -m mythos_platform.data.eval_tasks",
                  file=sys.stderr)
            return 1
        print("task data up to date")
        return 0
    for path in write():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
