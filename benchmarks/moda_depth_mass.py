"""Where a trained MoDA model's attention goes at the answering position, per loop iteration:
the share of softmax mass on depth entries (and on each entry: e, h_1, ..., h_t).

    python benchmarks/moda_depth_mass.py --model runs/depth-moda/export/moda-on [--hops 8] [--n 100]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mythos.moda as moda  # noqa: E402
from mythos.checkpoint import load_pretrained  # noqa: E402
from mythos.tokenizer import load_tokenizer_from_folder  # noqa: E402

TASKS = Path(__file__).resolve().parents[1] / "evals" / "tasks" / "data"


def problems(hops: int, n: int, tok) -> torch.Tensor:
    rows = [json.loads(line) for line in (TASKS / f"pointer_k{hops}.jsonl").read_text().splitlines()[:n]]
    ids = [[tok.eos_id] + tok.encode(r["prompt"]) for r in rows]
    assert len({len(i) for i in ids}) == 1, "pointer prompts of one hop count have one length"
    return torch.tensor(ids)


@torch.no_grad()
def depth_mass(model, x: torch.Tensor, n_loops: int) -> list[list[float]]:
    """Per iteration, the mean softmax mass of the last position on each depth entry (all heads)."""
    seen: list[list[float]] = []
    orig = moda.moda_attend

    def spy(q, k, v, depth, mask, scale, dropout=0.0):
        qg = q[:, -1:].view(q.shape[0], 1, k.shape[2], -1, q.shape[-1])
        seq = torch.einsum("bskgd,blkd->bkgsl", qg, k) * scale
        dep = torch.einsum("bskgd,bstkd->bkgst", qg, depth[0][:, -1:]) * scale
        p = torch.cat((seq, dep), -1).softmax(-1)[..., k.shape[1]:]  # (B, Hkv, G, 1, T)
        seen.append(p.mean(dim=(0, 1, 2, 3)).tolist())
        return orig(q, k, v, depth, mask, scale, dropout)

    moda.moda_attend = spy
    try:
        model(x, n_loops=n_loops)
    finally:
        moda.moda_attend = orig
    return seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--hops", type=int, default=8)
    ap.add_argument("--n", type=int, default=100)
    args = ap.parse_args()
    model = load_pretrained(args.model).eval()
    x = problems(args.hops, args.n, load_tokenizer_from_folder(args.model))
    for t, mass in enumerate(depth_mass(model, x, args.hops)):
        print(f"iteration {t}: depth mass {sum(mass):.3f} | e {mass[0]:.3f} | "
              + " ".join(f"h{s} {m:.3f}" for s, m in enumerate(mass[1:], 1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
