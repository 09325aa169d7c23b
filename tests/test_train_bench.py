"""Smoke test of benchmarks/train_bench.py: its functions at tiny sizes return sane, positive figures.

Not a timed test: nothing here compares a timing with a threshold. The Ray Data half of
section 1 (`pipeline_throughput`) is left to the benchmark run itself: starting Ray alone
takes ~10 s here, and test_data.py covers `build_datasets`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from mythos import get_variant

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_bench", ROOT / "benchmarks" / "train_bench.py")
tb = importlib.util.module_from_spec(_spec)
sys.modules["train_bench"] = tb
_spec.loader.exec_module(tb)

CPU = torch.device("cpu")
TINY = get_variant("debug", dim=64, n_heads=4, n_kv_heads=2, expert_dim=64, n_experts=4, loop_emb_dim=16,
                   lora_rank=4, max_seq_len=64)


def test_linear_fit_recovers_a_line():
    slope, icpt, r2 = tb.linear_fit([1, 2, 4, 8], [3.0, 5.0, 9.0, 17.0])
    assert slope == pytest.approx(2.0) and icpt == pytest.approx(1.0) and r2 == pytest.approx(1.0)
    assert tb.linear_fit([1, 2, 3], [1.0, 3.0, 2.0])[2] < 1.0


def test_step_times_and_trainer_throughput_are_positive():
    res = tb.step_times(TINY, [1, 2, 3], 2, batch=2, seq=16, device=CPU, reps=1)
    assert set(res) == {"full", "fixed"}
    for row in res.values():
        assert len(row) == 3 and all(0 < t < 60 for t in row)
    assert res["fixed"][:2] == res["full"][:2]  # loops <= bptt: the same configuration
    t = tb.trainer_throughput(TINY, batch=2, seq=16, loops=2, bptt=2, device=CPU, reps=1)
    assert t["step_s"] > 0 and t["tokens_per_s"] == pytest.approx(2 * 16 / t["step_s"])


def test_saved_activations_depend_on_depth_not_loops():
    tr = tb.Trainer.build(TINY, 2, 16, CPU)
    fixed_2 = tb.saved_activation_step(tr, 2, 2)
    fixed_6 = tb.saved_activation_step(tr, 6, 2)
    full_6 = tb.saved_activation_step(tr, 6, 6)
    assert fixed_2 > 0 and fixed_6 == fixed_2 and full_6 > 2 * fixed_2


def test_step_memory_subprocess():
    r = tb.step_memory(TINY, 3, 2, batch=2, seq=16, device=CPU, threads=1)
    assert r["peak"] > 0 and r["saved"] > 0 and r["rss_before"] > 0
    assert r["method"] in ("VmHWM after a /proc/self/clear_refs reset", "ru_maxrss")

