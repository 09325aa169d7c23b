"""Training benchmark: data pipeline vs trainer throughput, step time and peak memory vs loop count.

    .venv/bin/python benchmarks/train_bench.py                       # CPU fp32, debug model, ~3-4 min on 2 idle cores
    .venv/bin/python benchmarks/train_bench.py --quick               # fewer docs / reps / loop counts
    .venv/bin/python benchmarks/train_bench.py --device cuda         # bf16 autocast, torch.cuda peak counters
    .venv/bin/python benchmarks/train_bench.py --only 2,3 --set data.seq_len=256

Three sections, each printed as a table with a PASS/MISS verdict:

1. Pipeline vs trainer. The platform's Ray Data pipeline (`build_datasets(cfg.data, tokenizer)`
   of jobs/configs/debug.yaml, streaming: `data.materialize=false`, no validation split) is
   drained twice with `iter_torch_batches(batch_size=train.batch_size)` on a private local Ray
   (2 CPUs, 127.0.0.1, no dashboard, its own temp dir). Each pass re-executes the whole lazy
   pipeline (generate + tokenize + pack + block shuffle); its figure is end to end, from the
   first `next()` to the last row, so it includes the shuffle, an all-to-all that waits for the
   whole corpus (hence the long first-batch latency). Pass 1 also pays for starting Ray's
   worker processes, a one-off cost per run; pass 2 is the steady rate. Both are compared
   with the tokens/s single-process training steps of the configured model consume (same
   batch size and seq_len, the model's n_loops and bptt_depth, best of N). The pipeline and
   the trainer are measured one after the other, not competing for the cores. Goal: the
   warm pipeline >= 5x the trainer. Tokens are counted as rows x seq_len on both sides.

2. Step time vs loop count (batch 8 x seq 128 by default): forward + backward + AdamW step,
   best of N after a warm-up, the N rounds interleaved over all configurations, with full backprop through the loop (bptt_depth = loops) and
   with a fixed truncated depth (bptt_depth = min(2, loops)); ms/step, ms/step per loop, and
   a least-squares line ms = slope * loops + intercept with its R^2. PASS when both fits have
   R^2 >= 0.95 (the cost of the loop is linear in the loop count).

3. Peak memory of one training step vs loop count with a fixed backprop depth (bptt_depth=2)
   and, for contrast, with full backprop. What is reported is the step's peak *above* the
   memory live just before it (parameters, AdamW state, the batch): activations kept for the
   backward pass, gradients and transient buffers. PASS when the fixed-depth row stays within
   10% of its smallest value (the full-backprop row is expected to grow linearly).
   With activation checkpointing (`--ac none,block,iteration`, the default; `--ac none` for the
   plain table only) the same measurement per mode (`train.activation_checkpointing`,
   mythos_platform/train/activation_checkpointing.py): peak and saved MiB against the loop count
   at bptt_depth=2 and against the backprop depth at the deepest loop count, the peak's slope per
   differentiated iteration, and ms/step of each mode at the deepest timed loop count (full and
   truncated backprop, best of N interleaved): the price of the recomputation. PASS when, at full
   backprop, iteration < block < none.

   How memory is measured on CPU (torch has no peak counter for its CPU allocator):
   one fresh subprocess per configuration, so no configuration inherits another's heap.
   - The subprocess runs with glibc's `MALLOC_MMAP_THRESHOLD_=65536`: every allocation of
     64 KiB or more (every activation tensor here) gets its own mmap and is returned to the
     OS by `free`. The c10 CPU allocator does not cache (posix_memalign/free per tensor), so
     the resident set size (RSS) follows the live tensor bytes closely, instead of holding
     on to freed heap memory (a fixed threshold also turns off glibc's dynamic threshold,
     which otherwise moves large blocks onto the heap after the first free).
   - It builds the model and optimizer, runs one warm-up step (AdamW state, lazy buffers
     and oneDNN caches exist afterwards), drops the gradients (set_to_none), collects garbage,
     reads VmRSS, resets the kernel's high-water mark (`echo 5 > /proc/self/clear_refs`,
     Linux >= 4.0), runs the measured step and reads VmHWM: peak = VmHWM - VmRSS(before).
     Without a writable clear_refs it reads `resource.getrusage(RUSAGE_SELF).ru_maxrss`
     instead, which is why the warm-up is the smallest step (1 loop, depth 1): its peak
     lies below the measured step's, so the high-water mark is the measured step's own.
   - As an exact, noise-free cross-check the same step also sums the bytes autograd saves
     for backward (`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage,
     parameters excluded): the activation memory, the part that depends on bptt_depth.
   `torch.profiler(profile_memory=True)` was not used: its per-op allocation records would
   have to be replayed in time order to find a peak, it misses allocations outside profiled
   ops, and it adds its own memory and run time.
   On CUDA the peak is `torch.cuda.max_memory_allocated() - memory_allocated()` before the
   step, after `reset_peak_memory_stats()`, in this process.

Every timing is the best of several repetitions: the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mythos import Mythos, get_variant  # noqa: E402

MIB = 1024**2
DEFAULT_CONFIG = ROOT / "jobs" / "configs" / "debug.yaml"


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 (no autocast) on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """Least squares y = slope * x + intercept; returns (slope, intercept, R^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    ss_tot = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return slope, intercept, r2


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


@dataclass
class Trainer:
    """One model + AdamW + a fixed random batch; `step()` is one full training step."""

    model: Mythos
    opt: torch.optim.Optimizer
    x: torch.Tensor
    device: torch.device

    @classmethod
    def build(cls, mcfg, batch: int, seq: int, device: torch.device, ac: str = "none") -> "Trainer":
        """`ac`: activation checkpointing mode (none | block | iteration), as train.activation_checkpointing."""
        from mythos_platform.train.activation_checkpointing import apply_activation_checkpointing
        from mythos_platform.train.optim import build_optimizer

        torch.manual_seed(0)
        model = apply_activation_checkpointing(Mythos(mcfg).to(device).train(), ac)
        opt = build_optimizer(model, 1e-4, (0.9, 0.95), 0.1, device)  # the trainer's AdamW
        x = torch.randint(0, min(256, mcfg.vocab_size), (batch, seq + 1), device=device)
        return cls(model, opt, x, device)

    def step(self, loops: int, bptt: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device):
            out = self.model(self.x[:, :-1], targets=self.x[:, 1:], n_loops=loops, bptt_depth=bptt)
        out.loss.backward()
        self.opt.step()
        return float(out.loss.detach())

    def timed_step(self, loops: int, bptt: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(loops, bptt)
        sync(self.device)
        return time.perf_counter() - t0

    def best_times(self, configs: list[tuple[int, int]], reps: int) -> dict[tuple[int, int], float]:
        """Best wall time (s) of one step for each (loops, bptt), after one warm-up step each.

        The repetitions are interleaved (round r times every configuration once), so a burst
        of load from other processes costs each configuration one sample at most, instead of
        every sample of whichever configuration happened to be running."""
        for c in configs:
            self.step(*c)
        best = {c: float("inf") for c in configs}
        for _ in range(reps):
            for c in configs:
                best[c] = min(best[c], self.timed_step(*c))
        return best


# ---------------------------------------------------------------------------------------
# 1. Data pipeline vs trainer
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_ray(num_cpus: int = 2):
    """A private local Ray (the settings of tests/test_data.py), shut down on exit."""
    import logging

    import ray

    for name in ("ray", "ray.data", "ray._private"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # address="local": always start a private cluster, never attach to a running one (ray.init()
    # without an address joins the last cluster started on this machine); its own temp dir keeps
    # it out of /tmp/ray/ray_current_cluster, so other drivers on a shared machine do not join it.
    temp_dir = tempfile.mkdtemp(prefix="rtb-", dir="/tmp")
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False, object_store_memory=300 * MIB, configure_logging=False, _temp_dir=temp_dir)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # execution-plan INFO lines
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def pipeline_throughput(data_cfg, batch_size: int, epochs: int = 2) -> list[dict]:
    """Drain the (lazy, re-executed) training dataset `epochs` times; one dict per pass.

    Needs Ray initialised. The first pass pays for starting Ray's worker processes; later
    passes show the steady rate. Rates count seq_len tokens per row (what the model reads)."""
    from mythos.tokenizer import load_tokenizer
    from mythos_platform.data.pipeline import build_datasets

    tokenizer = load_tokenizer(data_cfg.tokenizer)
    train, _ = build_datasets(data_cfg, tokenizer)
    out = []
    for _ in range(epochs):
        rows = first_rows = 0
        first_s = None
        t0 = time.perf_counter()
        for batch in train.iter_torch_batches(batch_size=batch_size, drop_last=False):
            ids = batch["input_ids"]
            assert ids.shape[1] == data_cfg.seq_len + 1, ids.shape
            rows += ids.shape[0]
            if first_s is None:
                first_s, first_rows = time.perf_counter() - t0, rows
        total_s = time.perf_counter() - t0
        tokens = rows * data_cfg.seq_len
        rest_s = total_s - (first_s or 0.0)
        out.append({"rows": rows, "tokens": tokens, "first_batch_s": first_s or 0.0, "total_s": total_s,
                    "tokens_per_s": tokens / total_s if total_s > 0 else 0.0,
                    "after_first_tokens_per_s": (rows - first_rows) * data_cfg.seq_len / rest_s if rest_s > 0
                    else 0.0})
    return out


def trainer_throughput(mcfg, batch: int, seq: int, loops: int, bptt: int, device: torch.device,
                       reps: int) -> dict:
    """Tokens/s (batch * seq per step) of single-process training steps, best of `reps`."""
    tr = Trainer.build(mcfg, batch, seq, device)
    step_s = tr.best_times([(loops, bptt)], reps)[(loops, bptt)]
    return {"step_s": step_s, "tokens_per_s": batch * seq / step_s}


def section_pipeline(args, device: torch.device) -> bool:
    from mythos_platform.config import load_config

    overrides = ["data.materialize=false", "data.val_docs=0",
                 *([f"data.n_docs={args.n_docs}"] if args.n_docs else []), *args.set]
    cfg = load_config(args.config, overrides=overrides)
    mcfg = cfg.model.build()
    batch, seq = cfg.train.batch_size, cfg.data.seq_len
    print(f"\n== 1. Data pipeline vs trainer  ({Path(args.config).name}, overrides: {' '.join(overrides)})")
    print(f"   batch {batch} x seq_len {seq}; model {cfg.model.variant}: n_loops {mcfg.n_loops}, "
          f"bptt_depth {mcfg.bptt_depth}; shuffle_seed {cfg.data.shuffle_seed}, "
          f"cpus_per_task {cfg.data.cpus_per_task}")
    # the trainer first: right after ray.shutdown() the dying Ray processes still use the cores
    t = trainer_throughput(mcfg, batch, seq, mcfg.n_loops, mcfg.bptt_depth, device, args.reps)
    with local_ray(args.ray_cpus):
        passes = pipeline_throughput(cfg.data, batch, epochs=2)
    for label, p in zip(("pass 1 (cold)", "pass 2 (warm)"), passes):
        print(f"   pipeline {label}: {p['rows']} rows = {p['tokens']:,} tokens in {p['total_s']:5.2f} s = "
              f"{p['tokens_per_s']:>10,.0f} tokens/s  (first batch after {p['first_batch_s']:.2f} s)")
    print(f"   trainer              : {t['tokens_per_s']:>10,.0f} tokens/s  "
          f"({t['step_s'] * 1e3:.1f} ms/step, best of {args.reps}, one process, {args.threads} threads)")
    cold, warm = (p["tokens_per_s"] / t["tokens_per_s"] for p in passes)
    ok = warm >= 5.0
    print(f"   ratio pipeline/trainer: warm {warm:.1f}x, cold {cold:.1f}x  (goal: warm >= 5x)  {verdict(ok)}")
    return ok


# ---------------------------------------------------------------------------------------
# 2. Step time vs loop count
# ---------------------------------------------------------------------------------------
def step_times(mcfg, loops_list, bptt_fixed: int, batch: int, seq: int, device: torch.device,
               reps: int) -> dict[str, list[float]]:
    """{"full": [s per step for each loop count], "fixed": [...]}: best of `reps` interleaved
    repetitions, one model for all. A loop count <= bptt_fixed is full backprop either way:
    measured once, used in both rows."""
    tr = Trainer.build(mcfg, batch, seq, device)
    full = [(n, n) for n in loops_list]
    fixed = [(n, min(bptt_fixed, n)) for n in loops_list]
    best = tr.best_times(list(dict.fromkeys(full + fixed)), reps)
    return {"full": [best[c] for c in full], "fixed": [best[c] for c in fixed]}


def loop_heading(number: int, title: str, args, note: str) -> None:
    """The first line of a section measured against the loop count: `title`, the batch shape and `note`."""
    print(f"\n== {number}. {title} vs loop count  (batch {args.batch} x seq {args.seq}{note})")


def section_step_time(args, mcfg, device: torch.device) -> bool:
    loops_list, k = args.time_loops, args.bptt
    loop_heading(2, "Step time", args, f", best of {args.reps}, fwd + bwd + AdamW")
    res = step_times(mcfg, loops_list, k, args.batch, args.seq, device, args.reps)
    print(f"   {'loops':>5} | {'full bptt ms':>12} {'ms/loop':>8} | {f'bptt={k} ms':>12} {'ms/loop':>8}")
    for i, loops in enumerate(loops_list):
        f, x = res["full"][i] * 1e3, res["fixed"][i] * 1e3
        print(f"   {loops:>5} | {f:>12.1f} {f / loops:>8.1f} | {x:>12.1f} {x / loops:>8.1f}")
    ok = True
    for name, label, lo in (("full", "full bptt", 1), ("fixed", f"bptt={k}", k)):
        pts = [(n, t * 1e3) for n, t in zip(loops_list, res[name]) if n >= lo]
        if len(pts) < 3:
            print(f"   fit {label:>9}: fewer than 3 loop counts >= {lo}, no fit")
            continue
        slope, icpt, r2 = linear_fit(*zip(*pts))
        good = r2 >= 0.95
        ok &= good
        where = "all loop counts" if lo <= min(loops_list) else f"loops >= {lo}, where the depth is fixed"
        print(f"   fit {label:>9}: ms = {slope:7.2f} * loops + {icpt:7.2f}   R^2 = {r2:.4f}  {verdict(good)}"
              f"   ({where})")
    return ok


# ---------------------------------------------------------------------------------------
# 3. Peak memory vs loop count
# ---------------------------------------------------------------------------------------
def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def saved_activation_step(tr: Trainer, loops: int, bptt: int) -> int:
    """One training step; returns the bytes autograd saved for its backward pass (unique
    storages, parameters excluded)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in tr.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in param_ptrs and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        tr.step(loops, bptt)
    return sum(seen.values())


def measure_step_memory(mcfg_dict: dict, loops: int, bptt: int, batch: int, seq: int, device: str,
                        threads: int, ac: str = "none") -> dict:
    """Peak bytes of one training step above the memory live before it (run this in a fresh process on CPU)."""
    from mythos.config import MythosConfig

    torch.set_num_threads(threads)
    dev = torch.device(device)
    mcfg = MythosConfig.from_dict(mcfg_dict)
    tr = Trainer.build(mcfg, batch, seq, dev, ac)
    if dev.type == "cuda":
        saved = saved_activation_step(tr, loops, bptt)  # also the warm-up
        tr.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        tr.step(loops, bptt)
        torch.cuda.synchronize()
        return {"peak": torch.cuda.max_memory_allocated() - before, "saved": saved,
                "method": "torch.cuda.max_memory_allocated"}
    # Warm-up with the smallest step (AdamW state, lazy buffers, oneDNN caches); its peak lies
    # below the measured step's, which matters for ru_maxrss, the fallback, that only grows.
    tr.step(1, 1)
    tr.opt.zero_grad(set_to_none=True)
    gc.collect()
    before = _proc_status_kib("VmRSS") * 1024
    reset = _reset_hwm()
    saved = saved_activation_step(tr, loops, bptt)  # the measured step (the hooks allocate nothing)
    if reset:
        peak, method = _proc_status_kib("VmHWM") * 1024, "VmHWM after a /proc/self/clear_refs reset"
    else:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"
    return {"peak": peak - before, "saved": saved, "method": method, "rss_before": before}


def step_memory(mcfg, loops: int, bptt: int, batch: int, seq: int, device: torch.device,
                threads: int = 2, ac: str = "none") -> dict:
    """`measure_step_memory` in a fresh subprocess (CPU) or in this process (CUDA)."""
    if device.type == "cuda":
        return measure_step_memory(mcfg.to_dict(), loops, bptt, batch, seq, "cuda", threads, ac)
    spec = json.dumps({"cfg": mcfg.to_dict(), "loops": loops, "bptt": bptt, "batch": batch, "seq": seq,
                       "threads": threads, "ac": ac})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_mem-child", spec],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess failed (loops={loops}, bptt={bptt}, ac={ac}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_configs(mcfg, configs, batch: int, seq: int, device: torch.device, jobs: int = 2,
                    threads: int = 1) -> dict[tuple[int, int, str], dict]:
    """`step_memory` of every (loops, bptt, ac) in `configs`, each measured once.

    CPU: `jobs` subprocesses at a time (each process measures only itself, so running them
    side by side does not change the figures, only the wall time)."""
    order = sorted(set(configs), key=lambda c: -(c[0] + 4 * c[1]))  # longest first
    if device.type == "cuda":
        return {c: step_memory(mcfg, c[0], c[1], batch, seq, device, threads, c[2]) for c in order}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = {c: pool.submit(step_memory, mcfg, c[0], c[1], batch, seq, device, threads, c[2]) for c in order}
        return {c: f.result() for c, f in futs.items()}


def memory_configs(loops_list, bptt_fixed: int, ac_modes=("none",)) -> list[tuple[int, int, str]]:
    """Section 3's configurations: per loop count, bptt_fixed and full backprop (no checkpointing);
    with other `ac_modes`, per mode: every loop count at bptt_fixed, and the deepest loop count at
    every backprop depth in `loops_list` (configurations that coincide are measured once)."""
    out = [(n, min(bptt_fixed, n), "none") for n in loops_list] + [(n, n, "none") for n in loops_list]
    deepest = max(loops_list)
    for mode in ac_modes:
        out += [(n, min(bptt_fixed, n), mode) for n in loops_list]
    if any(m != "none" for m in ac_modes):
        out += [(deepest, k, mode) for mode in ("none", *ac_modes) for k in loops_list]
    return out


def memory_table(mcfg, loops_list, bptt_fixed: int, batch: int, seq: int, device: torch.device,
                 jobs: int = 2, threads: int = 1) -> dict[str, list[dict]]:
    """{"fixed": [...], "full": [...]} of `step_memory` results per loop count (no checkpointing)."""
    res = measure_configs(mcfg, memory_configs(loops_list, bptt_fixed), batch, seq, device, jobs, threads)
    return {"fixed": [res[(n, min(bptt_fixed, n), "none")] for n in loops_list],
            "full": [res[(n, n, "none")] for n in loops_list]}


def section_memory(args, mcfg, device: torch.device) -> dict[str, bool]:
    loops_list, k = args.mem_loops, args.bptt
    modes = [m for m in args.ac if m != "none"]
    loop_heading(3, "Peak memory of one training step", args, "; MiB above what is live before the step")
    res = measure_configs(mcfg, memory_configs(loops_list, k, modes), args.batch, args.seq, device,
                          args.mem_jobs, args.mem_threads)
    tab = {"fixed": [res[(n, min(k, n), "none")] for n in loops_list],
           "full": [res[(n, n, "none")] for n in loops_list]}
    method = tab["fixed"][0]["method"]
    print(f"   peak: {method}, one fresh process per configuration; "
          f"saved: activations autograd keeps for backward (exact)")
    print(f"   {'loops':<20}" + "".join(f"{n:>8}" for n in loops_list))
    for name, label in (("fixed", f"bptt={k}"), ("full", "full bptt")):
        print(f"   {label + ' peak MiB':<20}" + "".join(f"{r['peak'] / MIB:>8.1f}" for r in tab[name]))
        print(f"   {label + ' saved MiB':<20}" + "".join(f"{r['saved'] / MIB:>8.1f}" for r in tab[name]))
    fixed = [r["peak"] for r in tab["fixed"]]
    full = [r["peak"] for r in tab["full"]]
    spread = max(fixed) / min(fixed) - 1.0 if min(fixed) > 0 else float("inf")
    ok = spread <= 0.10
    slope, icpt, r2 = linear_fit(loops_list, [p / MIB for p in full])
    print(f"   bptt={k}: max/min - 1 = {spread * 100:.1f}% (goal <= 10%)  {verdict(ok)}")
    print(f"   full bptt: {full[-1] / max(full[0], 1):.1f}x from {loops_list[0]} to {loops_list[-1]} loops, "
          f"{slope:.1f} MiB/loop + {icpt:.1f} MiB (R^2 {r2:.4f})")
    out = {"3 fixed-depth memory flat": ok}
    if modes:
        out["3 checkpointing: iteration < block < none"] = checkpointing_memory(args, res, ["none", *modes])
        checkpointing_time(args, mcfg, device, ["none", *modes])
    return out


def checkpointing_memory(args, res: dict, modes: list[str]) -> bool:
    """The peak (and saved) MiB of each activation checkpointing mode against loops and backprop depth."""
    loops_list, k, deepest = args.mem_loops, args.bptt, max(args.mem_loops)
    print("   activation checkpointing (train.activation_checkpointing), peak MiB / saved MiB:")
    rows = {"loops": [(n, min(k, n)) for n in loops_list], "bptt": [(deepest, b) for b in loops_list]}
    for axis, head in (("loops", f"at bptt={k}, loops"), ("bptt", f"at {deepest} loops, bptt")):
        print(f"   {head:<20}" + "".join(f"{n:>14}" for n in loops_list))
        for mode in modes:
            cells = [res[(n, b, mode)] for n, b in rows[axis]]
            print(f"   {mode:<20}" + "".join(f"{r['peak'] / MIB:>7.1f} /{r['saved'] / MIB:>5.1f}" for r in cells))
    slopes = {}
    for mode in modes:
        slopes[mode] = linear_fit(loops_list, [res[(deepest, b, mode)]["peak"] / MIB for b in loops_list])[0]
    print("   peak per differentiated iteration (fit over bptt): "
          + ", ".join(f"{m} {v:.2f} MiB" for m, v in slopes.items()))
    peaks = [res[(deepest, deepest, m)]["peak"] for m in modes]
    ok = all(a > b for a, b in zip(peaks, peaks[1:]))
    print(f"   at {deepest} loops, full backprop: " + " > ".join(f"{m} {p / MIB:.1f}" for m, p in zip(modes, peaks))
          + f" MiB  {verdict(ok)}")
    return ok


def checkpointing_time(args, mcfg, device: torch.device, modes: list[str]) -> None:
    """ms/step of each mode at the deepest timed loop count, full and truncated backprop (best of
    args.reps, the repetitions interleaved over modes and configurations)."""
    loops = max(args.time_loops)
    configs = [(loops, loops), (loops, min(args.bptt, loops))]
    trainers = {m: Trainer.build(mcfg, args.batch, args.seq, device, m) for m in modes}
    for tr in trainers.values():
        for c in configs:
            tr.step(*c)
    best = {(m, c): float("inf") for m in modes for c in configs}
    for _ in range(args.reps):
        for m, tr in trainers.items():
            for c in configs:
                best[(m, c)] = min(best[(m, c)], tr.timed_step(*c))
    for c in configs:
        base = best[(modes[0], c)]
        cells = [f"{m} {best[(m, c)] * 1e3:.1f}" + ("" if m == modes[0] else f" ({best[(m, c)] / base - 1:+.0%})")
                 for m in modes]
        print(f"   ms/step at {c[0]} loops, bptt={c[1]} (best of {args.reps}): " + ", ".join(cells))


# ---------------------------------------------------------------------------------------
# 4. The memory plan against the measurement
# ---------------------------------------------------------------------------------------
PLAN_CONFIGS = {
    "debug (GQA, MoE)": {},
    "MLA, MoE, 2 core layers": {"attn_type": "mla", "q_lora_rank": 64, "core_layers": 2},
    "dense, no ACT": {"n_experts": 0, "act_enabled": False, "core_layers": 2, "tie_embeddings": False},
}


def planned_step_memory(mcfg, loops: int, bptt: int, batch: int, seq: int, ac: str) -> dict:
    """What mythos/memory_plan.py predicts for `measure_step_memory` on CPU (fp32, one process):
    the saved bytes, and the peak above what is live before the step: the activation peak, plus,
    with checkpointing, the gradients that exist when it comes (the peak is then a recomputation
    inside the loop, after the backward pass of the head, the loop's glue and the coda)."""
    from mythos.memory_plan import StepShape, activation_bytes, param_layout
    from mythos.sizing import meta_model

    fused = not (mcfg.attn_type == "mla" and mcfg.qk_nope_head_dim + mcfg.qk_rope_head_dim != mcfg.v_head_dim)
    act = activation_bytes(mcfg, StepShape(batch, seq, loops, bptt, ac, "fp32", fused))
    model = meta_model(mcfg)
    tail = param_layout(mcfg, model).root + sum(p.numel() for p in model.coda.parameters())
    return {"saved": act.saved, "peak": act.peak + (4 * tail if ac != "none" else 0)}


def plan_rows(configs: dict, modes, loops: int, bptt: int, batch: int, seq: int, jobs: int = 2,
              threads: int = 1) -> list[dict]:
    """Planned against measured (`step_memory`, fresh subprocesses) for each config and mode."""
    from concurrent.futures import ThreadPoolExecutor

    todo = [(name, get_variant("debug", **over), mode) for name, over in configs.items() for mode in modes]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futs = [pool.submit(step_memory, m, loops, bptt, batch, seq, torch.device("cpu"), threads, mode)
                for _, m, mode in todo]
        measured = [f.result() for f in futs]
    return [{"config": name, "mode": mode, "measured": got, "plan": planned_step_memory(m, loops, bptt, batch, seq, mode)}
            for (name, m, mode), got in zip(todo, measured)]


def section_plan(args) -> bool:
    loops, bptt = 6, 3
    print(f"\n== 4. Memory plan (mythos/memory_plan.py) vs measured  (CPU fp32, batch {args.batch} x seq "
          f"{args.seq}, {loops} loops, bptt {bptt}; MiB)")
    configs = dict(list(PLAN_CONFIGS.items())[:2]) if args.quick else PLAN_CONFIGS
    rows = plan_rows(configs, args.ac, loops, bptt, args.batch, args.seq, args.mem_jobs, args.mem_threads)
    print(f"   {'config':<26}{'mode':<10}{'saved plan':>11}{'measured':>9}{'':>8}{'peak plan':>11}{'measured':>9}")
    worst = 0.0
    for r in rows:
        sp, sm = r["plan"]["saved"] / MIB, r["measured"]["saved"] / MIB
        pp, pm = r["plan"]["peak"] / MIB, r["measured"]["peak"] / MIB
        worst = max(worst, abs(pp / pm - 1))
        print(f"   {r['config']:<26}{r['mode']:<10}{sp:>11.1f}{sm:>9.1f}{sp / sm - 1:>+8.1%}{pp:>11.1f}{pm:>9.1f}"
              f"{pp / pm - 1:>+8.1%}")
    ok = worst <= 0.15
    print(f"   largest peak difference {worst:.1%} (goal <= 15%)  {verdict(ok)}")
    return ok


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------
def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--config", default=str(DEFAULT_CONFIG), help="job config for section 1 (and the model)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for section 1, e.g. data.shuffle_seed=null (repeatable)")
    ap.add_argument("--n-docs", type=int, default=None,
                    help="generated problems the pipeline produces (default: the config's data.n_docs)")
    ap.add_argument("--ray-cpus", type=int, default=2)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 2), help="torch intra-op threads")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (the best is kept)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bptt", type=int, default=2, help="fixed backprop depth of sections 2 and 3")
    ap.add_argument("--time-loops", type=ints, default=[1, 2, 4, 8, 16])
    ap.add_argument("--mem-loops", type=ints, default=[2, 4, 8, 16, 32])
    ap.add_argument("--mem-jobs", type=int, default=2, help="memory subprocesses run side by side (CPU)")
    ap.add_argument("--mem-threads", type=int, default=1, help="torch threads of each memory subprocess")
    ap.add_argument("--ac", type=lambda v: [m for m in v.split(",") if m], default=["none", "block", "iteration"],
                    help="activation checkpointing modes section 3 compares (none: the plain table only)")
    ap.add_argument("--only", type=ints, default=[1, 2, 3, 4], help="sections to run, e.g. 2,3")
    ap.add_argument("--quick", action="store_true", help="smaller run: 10k docs, 2 reps, fewer loop counts")
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n_docs, args.reps = min(args.n_docs or 10000, 10000), min(args.reps, 2)
        args.time_loops, args.mem_loops = [1, 2, 4, 8], [2, 4, 8, 16]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mem_child is not None:
        spec = json.loads(args.mem_child)
        r = measure_step_memory(spec["cfg"], spec["loops"], spec["bptt"], spec["batch"], spec["seq"], "cpu",
                                spec["threads"], spec.get("ac", "none"))
        print(json.dumps(r))
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from mythos_platform.config import load_config

    mcfg = load_config(args.config, overrides=[s for s in args.set if s.startswith("model.")]).model.build()
    t0 = time.perf_counter()
    print(f"train_bench: device {device} ({'bf16 autocast' if device.type == 'cuda' else 'fp32'}), "
          f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; "
          f"model {sum(p.numel() for p in Mythos(mcfg).parameters()) / 1e6:.2f}M params")
    results = {}
    if 1 in args.only:
        results["1 pipeline >= 5x trainer"] = section_pipeline(args, device)
    if 2 in args.only:
        results["2 step time linear in loops"] = section_step_time(args, mcfg, device)
    if 3 in args.only:
        results.update(section_memory(args, mcfg, device))
    if 4 in args.only and device.type == "cpu":
        results["4 memory plan within 15% of measured"] = section_plan(args)
    print(f"\n== Summary ({time.perf_counter() - t0:.0f} s)")
    for name, ok in results.items():
        print(f"   {verdict(ok)}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
