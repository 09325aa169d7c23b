"""The matmul peak MFU divides by (mythos_platform/perf.py): a rate per GEMM library, the fastest counts.

Not a timed test: it checks that each figure is a matmul rate of a real product (oneDNN's op
computes x @ W^T, the FLOPs counted), which libraries are measured where, and that the peak is
the fastest of them.
"""

from __future__ import annotations

import torch

from mythos_platform import perf

CPU = torch.device("cpu")


def test_cpu_fp32_measures_torch_mm_and_onednn_and_the_peak_is_the_faster(monkeypatch):
    a, w = torch.randn(64, 32), torch.randn(48, 32)
    y = torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    torch.testing.assert_close(y, a @ w.t(), rtol=1e-4, atol=1e-4)  # the product whose FLOPs it counts

    rates = perf.matmul_rates(CPU, torch.float32, n=128, reps=1)
    assert set(rates) == {"torch.mm", "oneDNN"}
    assert all(1e6 < r < 1e14 for r in rates.values())  # FLOP/s, not seconds or FLOPs
    assert set(perf.matmul_rates(CPU, torch.bfloat16, n=64, reps=1)) == {"torch.mm"}  # oneDNN: fp32 only

    fixed = {"torch.mm": 1.5e11, "oneDNN": 2.0e11}
    monkeypatch.setattr(perf, "matmul_rates", lambda *a, **k: dict(fixed))
    assert perf.matmul_peak(CPU) == 2.0e11
