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


def matmul_rates(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None,
                 reps: int = 5) -> dict[str, float]:
    """FLOP/s of one large square matmul (n x n, default 1,024 on a CPU and 2,048 elsewhere) through
    each GEMM library torch offers for this device and dtype: torch.mm (cuBLAS on a GPU, MKL in the
    CPU wheel) and, on a CPU in fp32, oneDNN's GEMM (`torch.ops.mkldnn._linear_pointwise`, the
    kernel inductor's CPU linear calls; left out where this torch build lacks it).

    On a CPU, n = 1,024 reaches the FLOP/s of 2,048 (measured on the 2-core development machine:
    95 vs 87 GFLOP/s on one thread, 194 vs 187 on two) in an eighth of the time, and every training
    worker measures it once per run. On those machines (AMD EPYC, Zen 4) oneDNN runs the matmul
    10-30% faster than MKL: 201-214 against 175-188 GFLOP/s when quiet, 170-204 against 117-149
    under other load; about 211 is what two Zen 4 cores give at 32 fp32 FLOP per cycle and ~3.3 GHz."""
    n = n or (1024 if device.type == "cpu" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    inner = 4 if device.type == "cpu" else 50
    flops = 2 * n**3 * inner
    rates = {"torch.mm": flops / best_time(lambda: [a @ b for _ in range(inner)], reps, device)}
    onednn = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if device.type == "cpu" and dtype == torch.float32 and onednn is not None and torch.backends.mkldnn.is_available():
        try:  # a @ b^T: the same FLOPs
            t = best_time(lambda: [onednn(a, b, None, "none", [], "") for _ in range(inner)], reps, device)
        except (RuntimeError, NotImplementedError):  # an op this build has changed: torch.mm alone
            return rates
        rates["oneDNN"] = flops / t
    return rates


def matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 5) -> float:
    """The practical matmul peak MFU divides by: the fastest of `matmul_rates`. Against torch.mm's
    rate alone, MFU on the development CPUs read about 12% high on a quiet machine and up to 30%
    high on a loaded one (docs/performance.md)."""
    return max(matmul_rates(device, dtype, n, reps).values())
