"""Training loop-count schedule: a random loop count per step that every rank agrees on.

The count is a pure function of (seed, step), so all ranks of a distributed job draw the same
number without communicating. A data-dependent exit in training, such as the ACT loop of
OpenMythos (github.com/kyegomez/OpenMythos: `if halted.all(): break`), lets FSDP ranks run
different counts, so their collectives stop matching and the job hangs. Poisson-lognormal as
in Huginn (Geiping et al. 2025, "Scaling up Test-Time Compute with Latent Reasoning",
arXiv:2502.05171): tau ~ N(log(mean) - sigma^2/2, sigma), n ~ Poisson(exp(tau)), clamped to
[min, max]; E[exp(tau)] = mean. Only the last `bptt_depth` iterations are differentiated
(truncated backprop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import MythosConfig


@dataclass(frozen=True)
class LoopSample:
    n_loops: int
    bptt_depth: int


def _generator(seed: int, step: int) -> torch.Generator:
    # a fixed mix of the two integers (not Python's salted hash), so every process agrees
    mixed = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def sample_loops(cfg: MythosConfig, step: int, seed: int = 0) -> LoopSample:
    lo, hi = cfg.train_loops_min, cfg.train_loops_max
    if cfg.loop_distribution == "fixed":
        n = int(round(cfg.train_loops_mean))
    else:
        g = _generator(seed, step)
        if cfg.loop_distribution == "uniform":
            n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        else:
            sigma = cfg.loop_sigma
            tau = torch.normal(math.log(cfg.train_loops_mean) - sigma**2 / 2, sigma, (1,), generator=g)
            n = int(torch.poisson(tau.exp(), generator=g))
    n = min(max(n, lo), hi)
    return LoopSample(n, min(cfg.bptt_depth, n))
