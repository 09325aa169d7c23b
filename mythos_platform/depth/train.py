"""Training and evaluation of one model of the depth experiment (runs as a Ray task)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from mythos import Mythos, MythosConfig

from ..data.multihop import generate_problems
from ..data.multihop_tokens import PairTokenFormat
from ..train.losses import at_positions, per_loop_answer_loss
from ..train.optim import build_optimizer, build_scheduler
from .config import DepthConfig

EVAL_SEED_OFFSET = 10_000  # evaluation problems come from seeds never used in training


def model_config(cfg: DepthConfig, looped: bool) -> MythosConfig:
    """The RDT, or the parameter-matched baseline: the same blocks run once (no loop)."""
    mcfg = cfg.model.build()
    if looped:
        return mcfg
    return mcfg.replace(n_loops=1, train_loops_min=1, train_loops_mean=1.0, loop_distribution="fixed")


def step_plan(cfg: DepthConfig, step: int, looped: bool) -> tuple[list[int], int]:
    """(hop counts to draw from, loop count) for a training step: a pure function of (seed, step)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    all_hops = list(range(1, cfg.train_max_hops + 1))
    if not looped:
        return all_hops, 1
    if cfg.schedule == "hops":
        k = int(torch.randint(1, cfg.train_max_hops + 1, (1,), generator=g))
        return [k], k
    return all_hops, int(torch.randint(cfg.train_max_hops, cfg.loop_max + 1, (1,), generator=g))


@torch.no_grad()
def init_pair_embeddings(model: Mythos, fmt: PairTokenFormat, seed: int) -> None:
    """Pair token (x, y) starts as (E[x] + Q E[y]) / sqrt(2) with Q a fixed random rotation."""
    emb = model.tok_emb.weight
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(emb.shape[1], emb.shape[1], generator=g))
    S = fmt.n_symbols
    sym = emb[:S]
    pairs = (sym[:, None, :] + (sym @ q.T)[None, :, :]) / 2**0.5  # (x, y, D)
    emb[fmt.pair_offset: fmt.pair_offset + S * S] = pairs.reshape(S * S, -1)


def _loss(model: Mythos, batch: dict[str, torch.Tensor], n_loops: int, per_loop: bool) -> tuple[torch.Tensor, float]:
    out = model(batch["input_ids"], n_loops=n_loops, bptt_depth=n_loops, return_loop_logits=per_loop)
    final = at_positions(out.logits, batch["answer_pos"])
    if per_loop:
        loss = per_loop_answer_loss(out.loop_logits, batch["answer_pos"], batch["loop_targets"], first_loop=0)
    else:
        loss = F.cross_entropy(final.float(), batch["answers"])
    acc = (final.argmax(-1) == batch["answers"]).float().mean().item()
    return loss + out.aux_loss, acc


@torch.no_grad()
def evaluate(model: Mythos, cfg: DepthConfig, loops: list[int]) -> dict[tuple[int, int], float]:
    """Accuracy of the final answer for every (hops, loops) cell, on held-out problems."""
    fmt = cfg.token_format
    model.eval()
    out: dict[tuple[int, int], float] = {}
    for hops in range(1, cfg.eval_max_hops + 1):
        problems = generate_problems(cfg.eval_problems, hops, seed=cfg.seed + EVAL_SEED_OFFSET + hops,
                                     n_symbols=cfg.n_symbols)
        batch = fmt.batch(problems, n_loops=1)
        for n in loops:
            logits = model(batch["input_ids"], n_loops=n).logits
            pred = at_positions(logits, batch["answer_pos"]).argmax(-1)
            out[(hops, n)] = (pred == batch["answers"]).float().mean().item()
    return out


def start_symbol_floor(cfg: DepthConfig) -> dict[int, float]:
    """Accuracy of answering the start symbol (what a model that never hops scores), per hop count."""
    floor = {}
    for hops in range(1, cfg.eval_max_hops + 1):
        problems = generate_problems(cfg.eval_problems, hops, seed=cfg.seed + EVAL_SEED_OFFSET + hops,
                                     n_symbols=cfg.n_symbols)
        floor[hops] = sum(p.start == p.answer for p in problems) / len(problems)
    return floor


def train_and_evaluate(cfg_dict: dict[str, Any], looped: bool) -> dict[str, Any]:
    """Train one model on the token budget of `cfg`, then evaluate it. Returns plain data."""
    cfg = DepthConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads_per_model)
    torch.manual_seed(cfg.seed)
    fmt: PairTokenFormat = cfg.token_format
    mcfg = model_config(cfg, looped)
    model = Mythos(mcfg).train()
    if cfg.pair_embedding_init:
        init_pair_embeddings(model, fmt, cfg.seed)
    opt = build_optimizer(model, cfg.lr, (0.9, 0.95), cfg.weight_decay, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr)
    per_loop = looped and cfg.supervision == "per_loop"
    name = "rdt" if looped else "baseline"
    history, t0, tokens = [], time.perf_counter(), 0
    window_loss, window_acc, window_n = 0.0, 0.0, 0
    for step in range(cfg.steps):
        hops, n_loops = step_plan(cfg, step, looped)
        problems = generate_problems(cfg.batch_size, hops, seed=cfg.seed, n_symbols=cfg.n_symbols,
                                     start_index=step * cfg.batch_size)
        batch = fmt.batch(problems, n_loops=n_loops)
        loss, acc = _loss(model, batch, n_loops, per_loop)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        model.update_router_biases()
        tokens += batch["input_ids"].numel()
        window_loss, window_acc, window_n = window_loss + loss.item(), window_acc + acc, window_n + 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "loss": window_loss / window_n, "train_acc": window_acc / window_n,
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            print(f"[mythos depth] {name:8s} step {rec['step']:>5d}/{cfg.steps} | loss {rec['loss']:.3f} | "
                  f"train acc {rec['train_acc']:.2f} | {rec['seconds']:.0f}s", flush=True)
            window_loss, window_acc, window_n = 0.0, 0.0, 0
    train_seconds = time.perf_counter() - t0
    loops = sorted(set(cfg.eval_loops)) if looped else [1]
    grid = evaluate(model, cfg, loops)
    return {
        "name": name,
        "looped": looped,
        "params": sum(p.numel() for p in model.parameters()),
        "model_config": mcfg.to_dict(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "history": history,
        "train_seconds": train_seconds,
        "tokens": tokens,
        "grid": {f"{h},{n}": a for (h, n), a in grid.items()},
    }
