"""Validation loss against inference loops for a language model trained with random loop counts.

    python benchmarks/loss_vs_loops.py --model runs/debug/export/debug [--model another/export ...] \
        [--config jobs/configs/debug.yaml] [--loops 1,2,3,4,6,8,12,16,24,32] [--blocks 64] \
        [--plot docs/loss_vs_loops.png]

The published signature of a working looped LM (Geiping et al. 2025; Prairie et al. 2026) is a
curve that falls with loops and then stays flat past the trained range, not a U. The validation
blocks are those the trainer validates on (the config's data section, built without Ray by the
same batch functions), so the figure at the training mean matches the run's val_loss.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mythos.checkpoint import load_pretrained  # noqa: E402
from mythos_platform.config import load_config  # noqa: E402
from mythos_platform.data.pipeline import VAL_STREAM, generated_blocks  # noqa: E402
from mythos_platform.figures import new_figure, save_figure, style_axes  # noqa: E402
from mythos_platform.tables import markdown_row, markdown_table  # noqa: E402


def val_blocks(cfg, n_blocks: int) -> torch.Tensor:
    d = cfg.data
    if d.source != "generated":
        raise SystemExit("this benchmark reads the generated corpus (data.source=generated)")
    tok = d.build_tokenizer()
    out = generated_blocks({"chunk": np.array([0])}, n_docs=d.val_docs, docs_per_chunk=d.val_docs,
                           hops=list(range(d.min_hops, d.max_hops + 1)), seed=d.seed, n_symbols=d.n_symbols,
                           stream=VAL_STREAM, tokenizer=tok, seq_len=d.seq_len)["input_ids"]
    return torch.from_numpy(out[:n_blocks]).long()


@torch.no_grad()
def loss_at(model, blocks: torch.Tensor, n_loops: int, batch: int = 16) -> float:
    total, n = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i:i + batch]
        total += float(model(x[:, :-1], targets=x[:, 1:], n_loops=n_loops).loss) * len(x)
        n += len(x)
    return total / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="an exported model folder (repeatable)")
    ap.add_argument("--config", default="jobs/configs/debug.yaml", help="the config it was trained with")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--loops", default="1,2,3,4,6,8,12,16,24,32")
    ap.add_argument("--blocks", type=int, default=64, help="validation blocks")
    ap.add_argument("--plot", default=None, help="write the figure here (PNG)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(args.config, args.overrides)
    blocks = val_blocks(cfg, args.blocks)
    loops = [int(x) for x in args.loops.split(",")]
    curves = {}
    for folder in args.model:
        model = load_pretrained(folder).eval()
        mc = model.cfg
        print(f"\nmodel {folder}: trained with {mc.loop_distribution} loop counts, mean {mc.train_loops_mean}, "
              f"range {mc.train_loops_min}..{mc.train_loops_max}, bptt {mc.bptt_depth}, "
              f"ACT {'on' if mc.act_enabled else 'off'}; {len(blocks)} validation blocks of "
              f"{blocks.shape[1] - 1} tokens")
        print(markdown_table([], ["loops", "val loss (nats/token)", "seconds"]), end="")
        losses = []
        for n in loops:
            t0 = time.perf_counter()
            losses.append(loss_at(model, blocks, n))
            print(markdown_row([n, f"{losses[-1]:.4f}", f"{time.perf_counter() - t0:.1f}"]), flush=True)
        best = int(np.argmin(losses))
        print(f"lowest at {loops[best]} loops ({losses[best]:.4f}); at {loops[-1]} loops {losses[-1]:.4f} "
              f"({losses[-1] - losses[best]:+.4f} from the lowest); 1 loop {losses[0]:.4f}")
        curves[f"{Path(folder).name} (ACT {'on' if mc.act_enabled else 'off'})"] = losses
    if args.plot:
        fig, ax = new_figure()
        for label, losses in curves.items():
            ax.plot(loops, losses, marker="o", label=label)
        ax.axvspan(mc.train_loops_min, mc.train_loops_max, color="0.9", zorder=0, label="training loop range")
        ax.axvline(mc.train_loops_mean, color="grey", linestyle=":", label=f"training mean ({mc.train_loops_mean:g})")
        lo = min(min(v) for v in curves.values())
        hi = max(max(v) for v in curves.values())
        mid, half = (lo + hi) / 2, max((hi - lo) / 2 * 1.2, 0.05)  # at least 0.1 nats tall: noise stays flat
        ax.set_ylim(mid - half, mid + half)
        ax.set_xscale("log", base=2)
        style_axes(ax, xlabel="inference loops", ylabel="validation loss (nats/token)",
                   title="Validation loss vs inference loops (random loop counts in training)")
        save_figure(fig, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
