"""The matmul peak MFU divides by (mythos_platform/perf.py): a rate per GEMM library, the fastest counts.

Not a timed test: it checks that each figure is a matmul rate of a real product (oneDNN's op
computes x @ W^T, the FLOPs counted), which libraries are measured where, and that the peak is
the fastest of them.
"""

from __future__ import annotations

import pytest
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


def test_the_plain_reference_transformer_counts_the_flops_its_matmuls_run():
    """`make bench`'s plain dense transformer (benchmarks/plain_transformer.py): its FLOPs per token
    are what its matmuls run forward and backward, plus the causal attention counted as mythos.sizing
    counts it (FlopCounterMode does not see the CPU SDPA kernel)."""
    import sys
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from plain_transformer import PlainTransformer

    B, S, dim, heads, layers = 2, 24, 64, 4, 3
    model = PlainTransformer(vocab=50, dim=dim, heads=heads, hidden=96, layers=layers, max_seq=S)
    x = torch.randint(0, 50, (B, S + 1))
    fc = FlopCounterMode(display=False)
    with fc:
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
    attention = 3 * layers * 2.0 * 2 * dim * (S + 1) / 2
    assert fc.get_total_flops() / (B * S) + attention == pytest.approx(model.train_flops_per_token(S), rel=1e-6)
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="not a multiple of heads"):
        PlainTransformer(50, 30, 4, 96, 1, S)
