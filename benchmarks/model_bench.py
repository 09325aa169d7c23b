"""Model benchmark: throughput, decode latency, KV-cache size, MoE cost and MFU, in one run.

    python benchmarks/model_bench.py                      # CPU fp32, sizes debug and small (dim 512)
    python benchmarks/model_bench.py --device cuda --dtype bf16 --sizes small,1b-shaped

Every timing is the best of several repetitions (robust to other processes on a small
machine), and MFU divides model FLOP/s (mythos.sizing.flops_per_token) by the matmul FLOP/s
measured in this same run on the same device and dtype, interleaved with the workloads.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass

import torch

from mythos import KVCache, Mythos, get_variant
from mythos.ffn import SwiGLU
from mythos.generation import SamplingParams, stream
from mythos.moe import MoE
from mythos.sizing import flops_per_token, kv_cache_numbers_per_layer, kv_cache_numbers_per_token
from mythos_platform.perf import best_time, matmul_peak, sync


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


def train_tokens_per_s(cfg, ctx: Ctx, batch: int, seq: int, loops: int) -> float:
    model = build(cfg, ctx).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=ctx.device.type == "cuda")
    x = torch.randint(0, 256, (batch, seq + 1), device=ctx.device)

    def step():
        with ctx.autocast():
            out = model(x[:, :-1], targets=x[:, 1:], n_loops=loops, bptt_depth=loops)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return batch * seq / best_time(step, ctx.reps, ctx.device, warmup=2)


@torch.inference_mode()
def forward_tokens_per_s(model: Mythos, ctx: Ctx, batch: int, seq: int, loops: int) -> float:
    x = torch.randint(0, 256, (batch, seq), device=ctx.device)

    def fwd():
        with ctx.autocast():
            model(x, n_loops=loops, last_logits_only=True)

    return batch * seq / best_time(fwd, ctx.reps, ctx.device)


def decode_ms_per_token(model: Mythos, ctx: Ctx, loops: int, prompt: int = 32, new: int = 16) -> float:
    ids = [list(range(1, prompt + 1))]
    params = SamplingParams(max_new_tokens=new, temperature=0.0, n_loops=loops)

    def run():
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

    run()
    return 1000 * min(run() for _ in range(max(1, ctx.reps // 2)))


@torch.inference_mode()
def measured_cache_numbers_per_layer(cfg, ctx: Ctx) -> float:
    model = build(cfg, ctx).eval()
    cache = KVCache(batch=1, capacity=16)
    model(torch.randint(0, 256, (1, 8), device=ctx.device), n_loops=2, cache=cache)
    n_slots = len(cache.slots)
    elem = next(iter(cache.slots.values())).buffers[0].element_size()
    return cache.bytes_per_token() / elem / n_slots


def moe_vs_dense(dim: int, ctx: Ctx, tokens: int = 4096) -> tuple[float, float, float]:
    """Time fwd+bwd of the MoE FFN and of a dense SwiGLU with the same active parameters."""
    n_experts, top_k, shared, edim = 16, 2, 1, dim
    torch.manual_seed(0)
    moe = MoE(dim, n_experts, top_k, edim, shared).to(ctx.device).train()
    moe.init_weights(0.02, 0.02)
    dense = SwiGLU(dim, (top_k + shared) * edim).to(ctx.device)
    x = torch.randn(1, tokens, dim, device=ctx.device, requires_grad=True)

    def run(layer):
        def f():
            with ctx.autocast():
                y = layer(x)
                y = y[0] if isinstance(y, tuple) else y
            y.float().square().mean().backward()
        return f

    t_moe = best_time(run(moe), ctx.reps, ctx.device)
    t_dense = best_time(run(dense), ctx.reps, ctx.device)
    return t_moe * 1000, t_dense * 1000, t_moe / t_dense


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

    for name in args.sizes.split(","):
        cfg = get_variant(name)
        if cfg.max_seq_len < args.seq + 64:
            cfg = cfg.replace(max_seq_len=args.seq + 64)
        L = args.train_loops
        peak_before = matmul_peak(device, ctx.dtype)
        tps = train_tokens_per_s(cfg, ctx, args.batch, args.seq, L)
        peak_after = matmul_peak(device, ctx.dtype)
        peak = max(peak_before, peak_after)
        f = flops_per_token(cfg, n_loops=L, seq_len=args.seq, bptt_depth=L)
        mfu = f.train_step * tps / peak
        print(f"\n== {name}: dim={cfg.dim} attn={cfg.attn_type} experts={cfg.n_experts} "
              f"layers={cfg.prelude_layers}/{cfg.core_layers}/{cfg.coda_layers}")
        print(f"matmul peak      {peak / 1e9:10.1f} GFLOP/s ({dtype_name}, measured this run)")
        print(f"train            {tps:10.0f} tokens/s  (batch {args.batch} x {args.seq}, {L} loops, "
              f"{f.train_step / 1e6:.1f} MFLOP/token)  MFU {mfu:.1%}")
        if cfg.dim >= 512:
            goals.append((f"MFU >= 60% at dim {cfg.dim} ({name})", mfu >= 0.60, f"{mfu:.1%}"))
        model = build(cfg, ctx).eval()
        fwd = {n: forward_tokens_per_s(model, ctx, args.batch, args.seq, n) for n in (1, 4, 8, 16)}
        print("forward          " + "  ".join(f"{n:2d} loops {v:8.0f} tok/s" for n, v in fwd.items()))
        dec = {n: decode_ms_per_token(model, ctx, n) for n in (4, 16)}
        print("decode           " + "  ".join(f"{n:2d} loops {v:6.1f} ms/token" for n, v in dec.items()))

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
        t_moe, t_dense, ratio = moe_vs_dense(dim, ctx)
        print(f"dim {dim}: MoE(16 experts, top-2 + 1 shared) {t_moe:7.1f} ms   dense {t_dense:7.1f} ms   "
              f"ratio {ratio:.2f}x")
        goals.append((f"MoE <= 1.5x dense SwiGLU at dim {dim}", ratio <= 1.5, f"{ratio:.2f}x"))

    print("\n== goals")
    for what, ok, value in goals:
        print(f"[{'PASS' if ok else 'MISS'}] {what}: {value}")


if __name__ == "__main__":
    main()
