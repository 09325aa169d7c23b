"""benchmarks/model_bench.py's second matmul peak: oneDNN's GEMM on the peak's own matmul.

Not a timed test: it checks that the figure is a matmul rate of a real product (the op computes
x @ W^T), and that it is absent where it does not apply, so that `make bench` falls back to
torch.mm's peak alone there.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("model_bench", ROOT / "benchmarks" / "model_bench.py")
mb = importlib.util.module_from_spec(_spec)
sys.modules["model_bench"] = mb
_spec.loader.exec_module(mb)

CPU = torch.device("cpu")


def test_onednn_peak_times_a_real_matmul_on_cpu_fp32_only():
    a, w = torch.randn(64, 32), torch.randn(48, 32)
    y = torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], "")
    torch.testing.assert_close(y, a @ w.t(), rtol=1e-4, atol=1e-4)  # the product whose FLOPs it counts

    rate = mb.onednn_matmul_peak(mb.Ctx(CPU, torch.float32, 1), n=128)
    assert rate is not None and 1e6 < rate < 1e14  # FLOP/s, not seconds or FLOPs
    assert mb.onednn_matmul_peak(mb.Ctx(CPU, torch.bfloat16, 1), n=128) is None
    assert mb.onednn_matmul_peak(mb.Ctx(torch.device("meta"), torch.float32, 1), n=128) is None
