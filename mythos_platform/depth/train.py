"""Training and evaluation of one model of the depth experiment (runs as a Ray task)."""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mythos import Mythos, MythosConfig

from ..data.multihop import generate_problems
from ..data.multihop_tokens import PairTokenFormat
from ..train.losses import at_positions, per_loop_answer_loss
from ..train.optim import build_optimizer, build_scheduler
from .config import DepthConfig
from .curriculum import HopCurriculum
from .pair_embedding import PairEmbedding

EVAL_SEED_OFFSET = 10_000  # evaluation problems come from seeds never used in training


def model_config(cfg: DepthConfig, looped: bool) -> MythosConfig:
    """The RDT, or the parameter-matched baseline: its blocks (the RDT's, or those that
    baseline_overrides describe) run once, no loop."""
    if looped:
        return cfg.model.build()
    return cfg.baseline_model().build().replace(n_loops=1, train_loops_min=1, train_loops_mean=1.0,
                                                loop_distribution="fixed")


def step_plan(cfg: DepthConfig, step: int, looped: bool, top: int | None = None) -> tuple[list[int], int]:
    """(hop counts to draw from, loop count) for a training step with hop counts 1..top (default
    train_max_hops): a pure function of (seed, step, top)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    top = cfg.train_max_hops if top is None else top
    all_hops = list(range(1, top + 1))
    if not looped:
        return all_hops, 1
    hops_step = cfg.schedule == "hops" or (
        cfg.schedule == "mixed" and float(torch.rand((), generator=g)) >= cfg.mixed_fraction)
    if hops_step:
        k = int(torch.randint(1, top + 1, (1,), generator=g))
        return [k], k
    return all_hops, int(torch.randint(top, cfg.loop_max + 1, (1,), generator=g))


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


def predict(logits: torch.Tensor, answer_pos: torch.Tensor, n_symbols: int) -> torch.Tensor:
    """The answer: the most likely *symbol* at the answering position (an answer is always one of
    the n_symbols symbols, so the other rows of the tied head take no part)."""
    return at_positions(logits, answer_pos)[:, :n_symbols].argmax(-1)


def _loss(model: Mythos, pair_emb: PairEmbedding | None, batch: dict[str, torch.Tensor], n_loops: int,
          per_loop: bool, n_symbols: int) -> tuple[torch.Tensor, float]:
    ids = batch["input_ids"]
    inputs = {"inputs_embeds": pair_emb(ids, model.tok_emb.weight)} if pair_emb is not None else {"input_ids": ids}
    out = model(**inputs, n_loops=n_loops, bptt_depth=n_loops, return_loop_logits=per_loop)
    final = at_positions(out.logits, batch["answer_pos"])
    if per_loop:
        loss = per_loop_answer_loss(out.loop_logits, batch["answer_pos"], batch["loop_targets"], first_loop=0)
    else:
        loss = F.cross_entropy(final.float(), batch["answers"])
    acc = (predict(out.logits, batch["answer_pos"], n_symbols) == batch["answers"]).float().mean().item()
    return loss + out.aux_loss, acc


def held_out_problems(cfg: DepthConfig, hops: int):
    """The evaluation problems of one hop count (seeds never used in training)."""
    return generate_problems(cfg.eval_problems, hops, seed=cfg.seed + EVAL_SEED_OFFSET + hops, n_symbols=cfg.n_symbols)


@torch.no_grad()
def evaluate(model: Mythos, cfg: DepthConfig, loops: list[int]) -> dict[tuple[int, int], float]:
    """Accuracy of the final answer for every (hops, loops) cell, on held-out problems."""
    fmt = cfg.token_format
    model.eval()
    out: dict[tuple[int, int], float] = {}
    for hops in range(1, cfg.eval_max_hops + 1):
        problems = held_out_problems(cfg, hops)
        batch = fmt.batch(problems, n_loops=1)
        for n in loops:
            pred = predict(model(batch["input_ids"], n_loops=n).logits, batch["answer_pos"], cfg.n_symbols)
            out[(hops, n)] = (pred == batch["answers"]).float().mean().item()
    return out


def eval_loop_counts(cfg: DepthConfig) -> list[int]:
    """eval_loops, plus 1..eval_max_hops so that every problem is also run at loops = its hop count."""
    return sorted(set(cfg.eval_loops) | set(range(1, cfg.eval_max_hops + 1)))


def shallow_floor(cfg: DepthConfig) -> dict[int, float]:
    """Per hop count k: the accuracy of the best fixed answer f^j(start) with j < k and j <= N
    (N = train_max_hops; j = 0 is the start symbol), on the evaluation problems.

    A random function's orbits fall into short cycles, so f^j(s) often equals f^k(s): a model that
    never goes deeper than N hops still scores this much on k > N. Extrapolation means beating it.
    """
    floor = {}
    for hops in range(1, cfg.eval_max_hops + 1):
        problems = held_out_problems(cfg, hops)
        orbits = [(p.start, *p.steps) for p in problems]  # orbit[j] = f^j(start)
        floor[hops] = max(sum(o[j] == o[hops] for o in orbits) / len(orbits)
                          for j in range(min(hops, cfg.train_max_hops + 1)))
    return floor


def train_and_evaluate(cfg_dict: dict[str, Any], looped: bool) -> dict[str, Any]:
    """Train one model on the token budget of `cfg`, then evaluate it. Returns plain data."""
    cfg = DepthConfig.from_dict(cfg_dict)
    torch.set_num_threads(cfg.threads_per_model)
    torch.manual_seed(cfg.seed)
    fmt: PairTokenFormat = cfg.token_format
    mcfg = model_config(cfg, looped)
    model = Mythos(mcfg).train()
    trainable = nn.ModuleDict({"model": model})
    pair_emb = None
    if cfg.pair_embedding == "factored":
        pair_emb = trainable["pair_embedding"] = PairEmbedding(fmt, mcfg.dim, mcfg.init_std)
    else:
        init_pair_embeddings(model, fmt, cfg.seed)
    opt = build_optimizer(trainable, cfg.lr, (0.9, 0.95), cfg.weight_decay, torch.device("cpu"))
    sched = build_scheduler(opt, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr)
    per_loop = looped and cfg.supervision == "per_loop"
    name = "rdt" if looped else "baseline"
    history, t0, tokens = [], time.perf_counter(), 0
    window_loss, window_acc, window_n = 0.0, 0.0, 0
    curriculum = HopCurriculum(cfg.train_max_hops, cfg.curriculum_steps, cfg.curriculum_accuracy)
    for step in range(cfg.steps):
        hops, n_loops = step_plan(cfg, step, looped, curriculum.top)
        problems = generate_problems(cfg.batch_size, hops, seed=cfg.seed, n_symbols=cfg.n_symbols,
                                     start_index=step * cfg.batch_size)
        batch = fmt.batch(problems, n_loops=n_loops)
        loss, acc = _loss(model, pair_emb, batch, n_loops, per_loop, cfg.n_symbols)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        model.update_router_biases()
        tokens += batch["input_ids"].numel()
        window_loss, window_acc, window_n = window_loss + loss.item(), window_acc + acc, window_n + 1
        if curriculum.update(step, acc):
            print(f"[mythos depth] {name:8s} step {step + 1:>5d}: curriculum admits hops <= {curriculum.top}",
                  flush=True)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            rec = {"step": step + 1, "loss": window_loss / window_n, "train_acc": window_acc / window_n,
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            print(f"[mythos depth] {name:8s} step {rec['step']:>5d}/{cfg.steps} | loss {rec['loss']:.3f} | "
                  f"train acc {rec['train_acc']:.2f} | {rec['seconds']:.0f}s", flush=True)
            window_loss, window_acc, window_n = 0.0, 0.0, 0
    train_seconds = time.perf_counter() - t0
    if pair_emb is not None:  # from here on the model embeds pair tokens through input_ids alone
        pair_emb.merge_into(model.tok_emb.weight)
    loops = eval_loop_counts(cfg) if looped else [1]
    grid = evaluate(model, cfg, loops)
    return {
        "name": name,
        "looped": looped,
        "params": sum(p.numel() for p in trainable.parameters()),
        "model_config": mcfg.to_dict(),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "history": history,
        "curriculum": curriculum.advances,
        "train_seconds": train_seconds,
        "tokens": tokens,
        "grid": {f"{h},{n}": a for (h, n), a in grid.items()},
    }
