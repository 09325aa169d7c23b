"""What a training worker reports: the sums of a logging window and the progress line."""

from __future__ import annotations

import math
import sys
import time

import torch

from .parallel import all_reduce_mean


def say(message: str) -> None:
    """One progress line on the worker's stdout, which Ray streams to the driver. (Ray Train
    patches `print` to also log through its logger, which shows every line twice.)"""
    sys.__stdout__.write(message + "\n")
    sys.__stdout__.flush()


class Window:
    """The steps since the last log line: summed here, averaged over steps and ranks by `metrics`.

    Answer accuracy stays on the device and is read once per window (no per-step host syncs)."""

    def __init__(self, device: torch.device) -> None:
        self.loss = 0.0
        self.n = 0
        self.loops = 0.0
        self.flops = 0.0
        self.skipped = 0
        self.t0 = time.perf_counter()
        self.correct = torch.zeros((), device=device)
        self.counted = torch.zeros((), device=device)

    def add_step(self, loss: float, n_loops: int, flops_per_token: float, applied: bool) -> None:
        self.loss += loss
        self.n += 1
        self.loops += n_loops
        self.flops += flops_per_token
        self.skipped += not applied

    def add_answers(self, correct: torch.Tensor, counted: torch.Tensor) -> None:
        self.correct = self.correct + correct
        self.counted = self.counted + counted

    def metrics(self, tokens_per_step: int, peak_flops: float) -> dict[str, float]:
        """loss (mean over steps and ranks), perplexity, tokens_per_s, mfu (of `peak_flops`, all
        ranks together), mean_loops, skipped_steps, and acc where answers were counted."""
        n = max(self.n, 1)
        elapsed = time.perf_counter() - self.t0
        loss = float(all_reduce_mean(torch.tensor(self.loss / n)))
        tok_s = tokens_per_step * n / elapsed
        out = {"loss": loss, "perplexity": math.exp(min(loss, 30.0)), "tokens_per_s": tok_s,
               "mfu": (self.flops / n) * tok_s / peak_flops, "mean_loops": self.loops / n,
               "skipped_steps": self.skipped}
        if float(self.counted):
            out["acc"] = float(all_reduce_mean(self.correct / self.counted))
        return out


def progress_line(step: int, steps: int, m: dict[str, float], run: str | None = None) -> str:
    """`[mythos <run>] step 50/600 | loss ...`: the line the console turns into a progress bar
    (`mythos_platform.console.STEP_LINE`)."""
    val = f" | val {m['val_loss']:.3f}" if "val_loss" in m else ""
    if "val_acc" in m:
        val += f" acc {m['val_acc']:.2f}"
    acc = f" acc {m['acc']:.2f}" if "acc" in m else ""
    tag = f"[mythos {run}]" if run else "[mythos]"
    return (f"{tag} step {step:>5d}/{steps} | loss {m['loss']:.3f}{acc} ppl {m['perplexity']:.2f}{val} | "
            f"{m['tokens_per_s']:,.0f} tok/s | MFU {m['mfu']:.1%} | loops {m['mean_loops']:.1f} | "
            f"lr {m['lr']:.2e} | gnorm {m['grad_norm']:.2f}")
