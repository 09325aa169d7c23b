"""Timing helpers shared by the trainer (MFU) and the benchmarks: best-of-N timing and the
practical matmul peak of a device, measured rather than taken from a datasheet."""

from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], reps: int, device: torch.device, warmup: int = 1) -> float:
    """Fastest of `reps` runs in seconds (robust to other processes on a small machine)."""
    for _ in range(warmup):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of a large square matmul on this device and dtype (n x n, default 1,024 on a CPU and
    2,048 elsewhere). On a CPU, n = 1,024 reaches the FLOP/s of 2,048 (measured on the 2-core
    development machine: 95 vs 87 GFLOP/s on one thread, 194 vs 187 on two) in an eighth of the
    time, and every training worker measures it once per run (0.4 s instead of 3-4 s there)."""
    n = n or (1024 if device.type == "cpu" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 4 if device.type == "cpu" else 50
    t = best_time(lambda: [a @ b for _ in range(inner)], reps, device)
    return 2 * n**3 * inner / t
