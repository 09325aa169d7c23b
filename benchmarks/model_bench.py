"""Model benchmark: throughput, decode latency, KV-cache size, MoE cost and MFU, in one run.

    python benchmarks/model_bench.py                      # CPU fp32, sizes debug and small (dim 512)
    python benchmarks/model_bench.py --device cuda --dtype bf16 --sizes small,1b-shaped
    python benchmarks/model_bench.py --sizes none --compile-size debug   # compiled loop body vs eager only

Every timing is the best of several repetitions (robust to other processes on a small
machine), and MFU divides model FLOP/s (mythos.sizing.flops_per_token) by the matmul FLOP/s
measured in this same run on the same device and dtype, before and after the timed steps: the
fastest of torch.mm and (CPU, fp32) oneDNN's GEMM on one large square matmul
(mythos_platform.perf.matmul_rates).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from mythos import KVCache, Mythos, get_variant
from mythos.compile import compile_loop_body
from mythos.ffn import SwiGLU
from mythos.generation import SamplingParams, stream
from mythos.moe import MoE
from mythos.sizing import flops_per_token, kv_cache_numbers_per_layer, kv_cache_numbers_per_token
from mythos_platform.perf import best_time, matmul_rates, sync
from mythos_platform.train.optim import build_optimizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # plain_transformer, when imported from elsewhere
from plain_transformer import PlainTransformer  # noqa: E402


@dataclass
class Ctx:
    device: torch.device
    dtype: torch.dtype
    reps: int

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def build(cfg, ctx: Ctx) -> Mythos:
    torch.manual_seed(0)
    return Mythos(cfg).to(ctx.device)


def optimizer_step(model: torch.nn.Module, ctx: Ctx, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One training step of `model` with the trainer's AdamW: `loss()` under ctx's autocast, its
    backward, the update, and the gradients cleared as the trainer's optimizer does (set to None)."""
    opt = build_optimizer(model, 1e-4, (0.9, 0.95), 0.1, ctx.device)

    def step() -> None:
        with ctx.autocast():
            value = loss()
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step(cfg, ctx: Ctx, batch: int, seq: int, loops: int) -> Callable[[], None]:
    """One training step (the trainer's AdamW) of a fresh model on random tokens (batch x seq, all `loops` differentiated)."""
    model = build(cfg, ctx).train()
    x = torch.randint(0, 256, (batch, seq + 1), device=ctx.device)
    return optimizer_step(model, ctx, lambda: model(x[:, :-1], targets=x[:, 1:], n_loops=loops, bptt_depth=loops).loss)


def train_tokens_per_s(cfg, ctx: Ctx, batch: int, seq: int, loops: int) -> float:
    return batch * seq / best_time(train_step(cfg, ctx, batch, seq, loops), ctx.reps, ctx.device, warmup=2)


def plain_reference(cfg, ctx: Ctx, batch: int, seq: int, loops: int) -> tuple[PlainTransformer, Callable[[], None]]:
    """The plain dense transformer of cfg's width (benchmarks/plain_transformer.py) and one training
    step of it: as many layers as the looped model runs at `loops` (prelude + core x loops + coda),
    cfg's attention heads, a SwiGLU as wide as the MoE's active experts (or the dense FFN), the
    trainer's AdamW, the same batch shape."""
    hidden = (cfg.top_k + cfg.n_shared_experts) * cfg.expert_dim if cfg.n_experts else cfg.ffn_dim
    layers = cfg.prelude_layers + cfg.core_layers * loops + cfg.coda_layers
    torch.manual_seed(0)
    model = PlainTransformer(cfg.vocab_size, cfg.dim, cfg.n_heads, hidden, layers, seq).to(ctx.device).train()
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=ctx.device)
    return model, optimizer_step(model, ctx, lambda: model(x[:, :-1], x[:, 1:]))


def train_tokens_per_s_beside_plain(cfg, ctx: Ctx, batch: int, seq: int, loops: int
                                    ) -> tuple[float, PlainTransformer, float]:
    """Training tokens/s of cfg and of its plain reference, their steps taking turns (interleaved
    best of reps, after two warm-up steps each), so that the machine's load falls on both alike."""
    plain, plain_step = plain_reference(cfg, ctx, batch, seq, loops)
    steps = {"model": train_step(cfg, ctx, batch, seq, loops), "plain": plain_step}
    for step in steps.values():
        step(), step()
    best = interleaved_best(steps, ctx.reps, ctx.device)
    return batch * seq / best["model"][0], plain, batch * seq / best["plain"][0]


@contextlib.contextmanager
def _kineto_quiet():
    """The profiler's C++ side (kineto) writes a "profiler_start"/"profiler_stop" line to the
    process's stderr at every profile, whatever its log level: stderr goes to /dev/null meanwhile."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_breakdown(cfg, ctx: Ctx, batch: int, seq: int, loops: int, peak: float) -> dict[str, float]:
    """Where a train step's time goes, from one profiled step (torch.profiler, FLOPs counted):
    the share of matmuls (mm, bmm, addmm), of attention (SDPA) and of everything else, and the
    FLOP/s the matmuls reach as a fraction of `peak`."""
    from torch.profiler import profile

    step = train_step(cfg, ctx, batch, seq, loops)
    step()
    with _kineto_quiet(), profile(with_flops=True) as prof:
        step()
        sync(ctx.device)
    events = prof.key_averages()
    own = (lambda e: e.self_device_time_total) if ctx.device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(own(e) for e in events)
    mm = [e for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm")]
    mm_time = sum(own(e) for e in mm)
    attn_time = sum(own(e) for e in events if "scaled_dot_product" in e.key or "flash_attn" in e.key)
    return {"matmul": mm_time / total, "attention": attn_time / total,
            "matmul_of_peak": sum(e.flops for e in mm) / (mm_time / 1e6) / peak}


@torch.inference_mode()
def forward_tokens_per_s(model: Mythos, ctx: Ctx, batch: int, seq: int, loops: int) -> float:
    x = torch.randint(0, 256, (batch, seq), device=ctx.device)

    def fwd():
        with ctx.autocast():
            model(x, n_loops=loops, last_logits_only=True)

    return batch * seq / best_time(fwd, ctx.reps, ctx.device)


def decode_median_s(model: Mythos, ctx: Ctx, loops: int, prompt: int = 32, new: int = 16) -> float:
    """One greedy generation at batch 1 with the KV cache: the median seconds per decoded token."""
    ids = [[1 + i % (model.cfg.vocab_size - 1) for i in range(prompt)]]
    params = SamplingParams(max_new_tokens=new, temperature=0.0, n_loops=loops)
    times = []
    gen = stream(model, ids, params)
    with ctx.autocast():
        next(gen)  # prefill + first token
        t0 = time.perf_counter()
        for _ in gen:
            sync(ctx.device)
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
    return sorted(times)[len(times) // 2]


def decode_ms_per_token(model: Mythos, ctx: Ctx, loops: int, prompt: int = 32, new: int = 16) -> float:
    decode_median_s(model, ctx, loops, prompt, new)
    return 1000 * min(decode_median_s(model, ctx, loops, prompt, new) for _ in range(max(1, ctx.reps // 2)))


@torch.inference_mode()
def measured_cache_numbers_per_layer(cfg, ctx: Ctx) -> float:
    model = build(cfg, ctx).eval()
    cache = KVCache(batch=1, capacity=16)
    model(torch.randint(0, 256, (1, 8), device=ctx.device), n_loops=2, cache=cache)
    n_slots = len(cache.slots)
    elem = next(iter(cache.slots.values())).buffers[0].element_size()
    return cache.bytes_per_token() / elem / n_slots


def interleaved_best(fns: dict[str, Callable[[], float | None]], reps: int, device: torch.device
                     ) -> dict[str, tuple[float, float]]:
    """Each fn run `reps` times, taking turns (so they share the machine's load): per fn, the best
    (wall seconds, this process's CPU seconds); a fn that returns a time is timed by it (wall)."""
    best = {k: (math.inf, math.inf) for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            own = fn()
            sync(device)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            best[k] = (min(best[k][0], wall if own is None else own), min(best[k][1], cpu))
    return best


def compiled_vs_eager(cfg, ctx: Ctx, batch: int, seq: int, loops: int) -> None:
    """The loop body compiled (mythos.compile, inductor) against eager: a train step (batch x seq,
    `loops` loops, the last half differentiated) and greedy decoding at batch 1 with the KV cache,
    the two taking turns rep by rep so that the ratio is measured under one load; the first compiled
    calls (tracing, code generation, the one recompile for decode's symbolic length) timed apart."""
    torch._dynamo.reset()
    counters.clear()
    eager, comp = build(cfg, ctx), build(cfg, ctx)
    compile_loop_body(comp)
    x = torch.randint(0, 256, (batch, seq + 1), device=ctx.device)

    def trainer(model: Mythos) -> Callable[[], None]:
        return optimizer_step(model, ctx, lambda: model(x[:, :-1], targets=x[:, 1:], n_loops=loops,
                                                        bptt_depth=max(1, loops // 2)).loss)

    steps = {"eager": trainer(eager.train()), "compiled": trainer(comp.train())}
    t0 = time.perf_counter()
    steps["compiled"]()
    sync(ctx.device)
    warm_train = time.perf_counter() - t0
    steps["eager"]()
    train = interleaved_best(steps, ctx.reps, ctx.device)
    eager.eval(), comp.eval()
    t0 = time.perf_counter()
    decode_median_s(comp, ctx, loops, new=8)
    decode_median_s(comp, ctx, loops, prompt=24, new=8)  # a second length: the symbolic one
    warm_decode = time.perf_counter() - t0
    decode_median_s(eager, ctx, loops)
    graphs = counters["stats"]["unique_graphs"]
    dec = interleaved_best({k: (lambda m=m: decode_median_s(m, ctx, loops)) for k, m in
                            (("eager", eager), ("compiled", comp))}, ctx.reps, ctx.device)
    recompiled = counters["stats"]["unique_graphs"] - graphs  # 0: the timed generations compiled nothing
    with torch.inference_mode():
        y = x[:1, :64]
        diff = (comp(y, n_loops=loops).logits - eager(y, n_loops=loops).logits).abs().max().item()
    (tw_e, tc_e), (tw_c, tc_c) = train["eager"], train["compiled"]
    d_e, d_c = dec["eager"][0], dec["compiled"][0]
    print(f"train step       eager {tw_e * 1000:8.1f} ms   compiled {tw_c * 1000:8.1f} ms   ratio {tw_e / tw_c:.2f}x"
          f"   (CPU time {tc_e * 1000:.0f} vs {tc_c * 1000:.0f} ms: {tc_e / tc_c:.2f}x)   batch {batch} x {seq}, "
          f"{loops} loops, bptt {max(1, loops // 2)}")
    print(f"decode           eager {d_e * 1000:8.2f} ms/token   compiled {d_c * 1000:8.2f} ms/token   "
          f"ratio {d_e / d_c:.2f}x   (batch 1, KV cache, {loops} loops)")
    inductor = counters["inductor"]
    print(f"compile          first train step {warm_train:.1f} s, first two generations {warm_decode:.1f} s "
          f"(inductor's graph cache: {inductor['fxgraph_cache_hit']} hits, {inductor['fxgraph_cache_miss']} misses; "
          f"a miss generates code); graphs compiled while decoding was timed: {recompiled}; "
          f"max |logits diff| {diff:.1e}")


class ThreeLinearSwiGLU(torch.nn.Module):
    """The plain SwiGLU the MoE is measured against: w2(silu(x w1) * (x w3)), three separate linears."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = torch.nn.Linear(dim, hidden, bias=False)
        self.w3 = torch.nn.Linear(dim, hidden, bias=False)
        self.w2 = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(torch.nn.functional.silu(self.w1(x)) * self.w3(x))


def moe_vs_dense(dim: int, ctx: Ctx, tokens: int = 4096) -> dict[str, float]:
    """fwd+bwd ms of the MoE FFN and of dense SwiGLUs with the same active parameters (three
    linears, and mythos's fused one), interleaved best of reps; gradients cleared as a training
    step's optimizer does (set to None), so no run pays for accumulating into old ones."""
    n_experts, top_k, shared, edim = 16, 2, 1, dim
    torch.manual_seed(0)
    moe = MoE(dim, n_experts, top_k, edim, shared).to(ctx.device).train()
    moe.init_weights(0.02, 0.02)
    layers = {"moe": moe, "plain": ThreeLinearSwiGLU(dim, (top_k + shared) * edim).to(ctx.device),
              "fused": SwiGLU(dim, (top_k + shared) * edim).to(ctx.device)}
    x = torch.randn(1, tokens, dim, device=ctx.device, requires_grad=True)

    def run(layer):
        def f():
            with ctx.autocast():
                y = layer(x)
                y = y[0] if isinstance(y, tuple) else y
            y.float().square().mean().backward()
            for p in layer.parameters():
                p.grad = None
        return f

    best = interleaved_best({name: run(layer) for name, layer in layers.items()}, ctx.reps + 2, ctx.device)
    return {name: wall * 1000 for name, (wall, _) in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="debug,small", help="comma-separated variant names")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on GPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--train-loops", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    ap.add_argument("--compile-size", default="debug",
                    help="variant of the compiled-vs-eager section (train step and decode), with integer "
                         "overrides after colons (debug:n_experts=0: dense); 'none' skips it")
    ap.add_argument("--compile-batch", type=int, default=4)
    ap.add_argument("--compile-seq", type=int, default=128)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ctx = Ctx(device, torch.bfloat16 if dtype_name == "bf16" else torch.float32, args.reps)

    from mythos.attention import flash_attn_available

    print(f"device={device} dtype={dtype_name} threads={torch.get_num_threads()} "
          f"flash_attn={'yes' if flash_attn_available() else 'no (SDPA)'} torch={torch.__version__}")
    goals: list[tuple[str, bool, str]] = []

    for name in [n for n in args.sizes.split(",") if n and n != "none"]:
        cfg = get_variant(name)
        if cfg.max_seq_len < args.seq + 64:
            cfg = cfg.replace(max_seq_len=args.seq + 64)
        L = args.train_loops
        # the peak is the fastest matmul this run measured, before and after the timed steps: torch.mm's
        # and, on a CPU in fp32, oneDNN's GEMM (mythos_platform/perf.py, docs/performance.md)
        before = matmul_rates(device, ctx.dtype)
        if cfg.dim >= 512:  # the MFU goal's size: beside the plain dense transformer of its width
            tps, plain, plain_tps = train_tokens_per_s_beside_plain(cfg, ctx, args.batch, args.seq, L)
        else:
            tps, plain, plain_tps = train_tokens_per_s(cfg, ctx, args.batch, args.seq, L), None, 0.0
        after = matmul_rates(device, ctx.dtype)
        rates = {lib: max(rate, after.get(lib, 0.0)) for lib, rate in before.items()}
        peak, mm_peak = max(rates.values()), rates["torch.mm"]
        f = flops_per_token(cfg, n_loops=L, seq_len=args.seq, bptt_depth=L)
        mfu = f.train_step * tps / peak
        print(f"\n== {name}: dim={cfg.dim} attn={cfg.attn_type} experts={cfg.n_experts} "
              f"layers={cfg.prelude_layers}/{cfg.core_layers}/{cfg.coda_layers}")
        print(f"matmul peak      {peak / 1e9:10.1f} GFLOP/s ({dtype_name}, the fastest measured this run: "
              + ", ".join(f"{lib} {rate / 1e9:.1f}" for lib, rate in rates.items()) + ")")
        print(f"train            {tps:10.0f} tokens/s  (batch {args.batch} x {args.seq}, {L} loops, "
              f"{f.train_step / 1e6:.1f} MFLOP/token)  MFU {mfu:.1%}"
              + (f" ({f.train_step * tps / mm_peak:.1%} against torch.mm's alone)" if peak > mm_peak else ""))
        parts = step_breakdown(cfg, ctx, args.batch, args.seq, L, peak)
        rest = 1 - parts["matmul"] - parts["attention"]
        print(f"step time        matmuls {parts['matmul']:.0%} (at {parts['matmul_of_peak']:.0%} of the peak), attention "
              f"{parts['attention']:.0%}, the rest {rest:.0%} (norms, injection, LoRA, RoPE, routing, optimizer): "
              f"MFU {mfu / (1 - rest):.0%} if the rest took no time (one profiled step)")
        if plain is not None:
            plain_mfu = plain.train_flops_per_token(args.seq) * plain_tps / peak
            print(f"plain reference  {plain_tps:10.0f} tokens/s  (a dense transformer of this width, {plain.layers} "
                  f"layers, SwiGLU {plain.hidden}, no loops, steps alternating with {name}'s: "
                  f"benchmarks/plain_transformer.py)  MFU {plain_mfu:.1%}; {name} reaches {mfu / plain_mfu:.2f} of it")
            goals.append((f"MFU >= 80% at dim {cfg.dim} ({name})", mfu >= 0.80,
                          f"{mfu:.1%} (the plain dense transformer: {plain_mfu:.1%})"))
        model = build(cfg, ctx).eval()
        fwd = {n: forward_tokens_per_s(model, ctx, args.batch, args.seq, n) for n in (1, 4, 8, 16)}
        print("forward          " + "  ".join(f"{n:2d} loops {v:8.0f} tok/s" for n, v in fwd.items()))
        dec = {n: decode_ms_per_token(model, ctx, n) for n in (4, 16)}
        print("decode           " + "  ".join(f"{n:2d} loops {v:6.1f} ms/token" for n, v in dec.items()))

    if args.compile_size != "none":
        t0 = time.perf_counter()
        name, *overrides = args.compile_size.split(":")
        cfg = get_variant(name, **{k: int(v) for k, v in (o.split("=") for o in overrides)})
        print(f"\n== compiled loop body vs eager ({args.compile_size}: dim={cfg.dim} experts={cfg.n_experts}; "
              "torch.compile of the core layers, inductor, docs/performance.md)")
        compiled_vs_eager(cfg, ctx, args.compile_batch, args.compile_seq, args.train_loops)
        print(f"(this section: {time.perf_counter() - t0:.0f} s)")

    print("\n== MLA decode at 16 loops (debug with attn_type=mla, batch 1, greedy, KV cache)")
    mla_cfg = get_variant("debug", attn_type="mla", max_seq_len=1100)
    mla_model = build(mla_cfg, ctx).eval()
    print("decode           " + "  ".join(f"after {p:4d} prompt tokens {decode_ms_per_token(mla_model, ctx, 16, prompt=p, new=9):6.1f} "
                                          "ms/token" for p in (32, 1024)))

    print("\n== KV cache (numbers per token per layer-slot, measured on debug-shaped models)")
    gqa = measured_cache_numbers_per_layer(get_variant("debug"), ctx)
    mla = measured_cache_numbers_per_layer(get_variant("debug", attn_type="mla"), ctx)
    print(f"debug  GQA {gqa:6.0f}   MLA {mla:6.0f}")
    big = get_variant("1b")
    big_mla = kv_cache_numbers_per_layer(big)
    big_gqa = kv_cache_numbers_per_layer(big.replace(attn_type="gqa"))
    bpe = 2  # bf16 bytes per number
    print(f"1b (computed) per layer: GQA {big_gqa} numbers, MLA {big_mla} numbers; whole model at "
          f"{big.n_loops} loops: GQA {kv_cache_numbers_per_token(big.replace(attn_type='gqa')) * bpe / 1024:.1f} KiB, "
          f"MLA {kv_cache_numbers_per_token(big) * bpe / 1024:.1f} KiB per token (bf16); shared-loop cache MLA "
          f"{kv_cache_numbers_per_token(big, share_loops=True) * bpe / 1024:.1f} KiB")
    goals.append(("MLA cache <= GQA cache at the default (1b) config", big_mla <= big_gqa, f"{big_mla} vs {big_gqa}"))

    print("\n== MoE FFN vs dense SwiGLU of the same active parameters (fwd+bwd, 4096 tokens)")
    for dim in (256, 512):
        t = moe_vs_dense(dim, ctx)
        ratio = t["moe"] / t["plain"]
        print(f"dim {dim}: MoE(16 experts, top-2 + 1 shared) {t['moe']:7.1f} ms   three-linear SwiGLU "
              f"{t['plain']:7.1f} ms   fused SwiGLU {t['fused']:7.1f} ms   MoE/three-linear {ratio:.2f}x   "
              f"fused/three-linear {t['fused'] / t['plain']:.2f}x")
        goals.append((f"MoE <= 1.1x three-linear SwiGLU at dim {dim}", ratio <= 1.1, f"{ratio:.2f}x"))

    print("\n== goals")
    for what, ok, value in goals:
        print(f"[{'PASS' if ok else 'MISS'}] {what}: {value}")


if __name__ == "__main__":
    main()
