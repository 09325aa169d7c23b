"""Serving benchmark: the iteration-level engine against the old static batcher, on mixed loop depths.

    python benchmarks/serve_bench.py [--model FOLDER] [--clients 16] [--per-client 4] [--lone 8]
                                     [--threads 1] [--quick] [--http]

A. In process, no Ray (the main figure). The same request list runs against
   (a) the old static batcher (`static_batcher.Batcher`, max_batch_size 16, max_wait 0.1 s: a batch
       forms when the model is free, runs to completion, one loop count at a time) and
   (b) the new `mythos_platform.serve.engine.Engine` (max_rows 16: requests join at the next decode
       step, rows of different loop counts share each pass),
   with the same model object and torch thread count (default 1, a replica's `model.torch_threads`:
   on these 2-core machines a forward pass run from a worker thread with 2 torch threads is about
   2.4x slower than from the main thread, which slows both engines alike).
   1. Mixed depths: `--clients` concurrent asyncio clients each send `--per-client` requests one
      after another; each request draws (random.Random(0)) n_loops from {1, 2, 4, 8, 16},
      max_tokens from 16..64 and a random prompt of 8-24 bytes; greedy, ignore_eos (every request
      generates max_tokens tokens). Prints tokens, wall seconds, tokens/s, p50/p95 latency and p50
      time to first token of each, and new/old tokens/s (goal >= 3x). Time to first token is the
      time to a request's first event (Delta, or Finished if all its text was held back, e.g. an
      incomplete UTF-8 character), measured the same way for both.
   2. Lone client: `--lone` sequential requests (n_loops 8, 32 tokens): p50 time to first token of
      each and new/old (goal: new not worse, i.e. <= 1).
   3. The new engine's rows per decode pass during the mixed run (`engine.stats.occupancy`):
      mean, max, and the mean per tenth of the run; and the share of the run spent in forward
      passes (prefills and decode passes, `engine.stats.busy_s`): what is not is the scheduling.
   4. What one decode pass costs by rows and depth, and 16 rows of mixed depth in one pass against
      one pass per depth (the old batcher's groups): on a small model a loop iteration costs
      nearly the same for 1 row as for 16, which caps what sharing a pass can gain.
   5. The load's floor: each client sends its requests one after another and each token needs its
      loop iterations one after another, so no engine finishes the load before its longest client
      would finish alone. That client's requests run alone on the new engine; the old batcher's
      wall time over that time is the most any schedule could gain on this load and machine.
   Also counts requests whose greedy text differs between the two (expected 0).
B. `--http` (off by default): what Ray Serve adds to a request's latency, and batching on/off over
   HTTP (a private local Ray on 127.0.0.1, apps /on and /off; "off" is `batching: {enabled: false}`,
   one row at a time).

Model: `--model`, else runs/debug/export/debug when present, else a random debug model saved to a
temporary folder. Prints figures (not a test).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # static_batcher, when run from elsewhere

LOOPS = (1, 2, 4, 8, 16)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_folder(spec: str | None) -> str:
    if spec:
        return spec
    trained = ROOT / "runs/debug/export/debug"
    if (trained / "model.safetensors").exists():
        return str(trained)
    from mythos import Mythos, get_variant
    from mythos.checkpoint import save_pretrained
    from mythos.tokenizer import ByteTokenizer

    folder = Path(tempfile.mkdtemp(prefix="serve-bench-")) / "debug-random"
    torch.manual_seed(0)
    save_pretrained(Mythos(get_variant("debug")), folder, tokenizer=ByteTokenizer())
    return str(folder)


# ---------------------------------------------------------------------------------------
# A. in process: static batcher vs iteration-level engine
# ---------------------------------------------------------------------------------------
@dataclass
class Req:
    prompt_ids: list[int]
    max_tokens: int
    n_loops: int


@dataclass
class Run:
    wall_s: float
    tokens: int
    latency_ms: list[float]
    ttft_ms: list[float]
    texts: list[str]
    client_s: list[float]
    """When each client's last request ended, seconds from the start."""


def mixed_requests(tok, clients: int, per_client: int, max_tokens_hi: int, max_seq_len: int) -> list[list[Req]]:
    rng = random.Random(0)
    out = []
    for _ in range(clients):
        reqs = []
        for _ in range(per_client):
            n_loops = rng.choice(LOOPS)
            max_tokens = rng.randint(16, max_tokens_hi)
            n = rng.randint(8, 24)
            ids = tok.encode("".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n)))[:n]
            reqs.append(Req(ids, min(max_tokens, max_seq_len - len(ids)), n_loops))
        out.append(reqs)
    return out


async def drive(submit, make_job, per_client: list[list[Req]]) -> Run:
    """Each client sends its requests one after another; all clients at once."""
    lat: list[float] = []
    ttft: list[float] = []
    texts: dict[tuple[int, int], str] = {}
    ends: dict[int, float] = {}
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for k, r in enumerate(per_client[c]):
            job = make_job(r)
            t = time.perf_counter()
            queue = await submit([job])
            first = None
            parts = []
            while True:
                _, ev = await queue.get()
                if first is None:
                    first = time.perf_counter() - t
                if hasattr(ev, "error"):
                    raise ev.error
                parts.append(ev.text)
                if hasattr(ev, "completion_tokens"):
                    tokens += ev.completion_tokens
                    break
            lat.append((time.perf_counter() - t) * 1000)
            ttft.append(first * 1000)
            texts[c, k] = "".join(parts)
        ends[c] = time.perf_counter() - t0

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(len(per_client))))
    wall = time.perf_counter() - t0
    return Run(wall, tokens, lat, ttft, [texts[k] for k in sorted(texts)], [ends[c] for c in range(len(per_client))])


def part_a(args, model, tok) -> None:
    from static_batcher import Batcher, StaticEngine

    from mythos_platform.serve.engine import Engine
    from mythos_platform.serve.jobs import Job

    L = model.cfg.max_seq_len
    hi = min(64, L - 24)
    mixed = mixed_requests(tok, args.clients, args.per_client, hi, L)
    lone = [[Req(tok.encode("f(a)=c f(c)=b f(b)=a. f(f(a))=")[:24], min(32, L - 24), 8) for _ in range(args.lone)]]
    flat = [r for c in mixed for r in c]
    print(f"mixed load: {args.clients} clients x {args.per_client} requests, n_loops from {LOOPS}, "
          f"max_tokens {min(r.max_tokens for r in flat)}..{max(r.max_tokens for r in flat)} "
          f"(mean {statistics.mean(r.max_tokens for r in flat):.1f}, mean n_loops "
          f"{statistics.mean(r.n_loops for r in flat):.1f}), prompts "
          f"{min(len(r.prompt_ids) for r in flat)}-{max(len(r.prompt_ids) for r in flat)} tokens, greedy, "
          f"ignore_eos; max_seq_len {L}")

    def make_job(r: Req) -> Job:
        return Job(list(r.prompt_ids), r.max_tokens, temperature=0.0, n_loops=r.n_loops, ignore_eos=True,
                   stream=True)

    async def both():
        old = Batcher(StaticEngine(model, tok), max_batch_size=args.max_rows, max_wait_s=0.1)
        new = Engine(model, tok, "bench", max_rows=args.max_rows)
        new.start()
        warm = [[Req(flat[0].prompt_ids, 8, n)] for n in LOOPS]
        res = {}
        for name, sys_ in (("old", old), ("new", new)):
            await drive(sys_.submit, make_job, warm)  # warm up: every loop count once
            if name == "new":
                t0 = time.monotonic()
                busy0, prefills = new.stats.busy_s, []
                new.stats.observers.append(lambda event, v: prefills.append(v) if event == "prefill_s" else None)
            res[name, "mixed"] = await drive(sys_.submit, make_job, mixed)
            if name == "new":
                t1 = time.monotonic()
                occ = [(t, n) for t, n in new.stats.occupancy if t0 <= t <= t1]
                busy = (new.stats.busy_s - busy0, sum(prefills), len(prefills))
            await asyncio.sleep(0.3)  # the static batcher's recent sizes would make a lone request wait
            old._recent = [1]
            res[name, "lone"] = await drive(sys_.submit, make_job, lone)
        # 5. the load's floor: the client with the most iterations and the one that finished last in
        # the mixed run, each alone on the new engine (its thread)
        slowest = max(range(len(mixed)), key=lambda c: res["new", "mixed"].client_s[c])
        for c in sorted({slowest, max(range(len(mixed)), key=lambda c: iterations(mixed[c]))}):
            res["alone", c] = await drive(new.submit, make_job, [mixed[c]])
        old.close()
        new.stop()
        return res, occ, (t0, t1), busy

    res, occ, (t0, t1), busy = asyncio.run(both())
    label = {"old": "static batcher (old)", "new": "iteration-level (new)"}
    print(f"\n1. mixed depths, {len(flat)} requests, max batch / rows {args.max_rows}:")
    for name in ("old", "new"):
        r = res[name, "mixed"]
        print(f"  {label[name]:22s} {r.tokens:5d} tokens in {r.wall_s:6.1f} s = {r.tokens / r.wall_s:6.1f} tokens/s | "
              f"latency p50 {pct(r.latency_ms, 50):6.0f} ms p95 {pct(r.latency_ms, 95):6.0f} ms | "
              f"TTFT p50 {pct(r.ttft_ms, 50):6.0f} ms")
    o, n = res["old", "mixed"], res["new", "mixed"]
    ratio = (n.tokens / n.wall_s) / (o.tokens / o.wall_s)
    print(f"  new / old tokens/s: {ratio:.2f}x  (goal >= 3x)")
    diff = sum(a != b for a, b in zip(o.texts, n.texts))
    print(f"  greedy texts that differ between the two: {diff} of {len(flat)}")

    print(f"\n2. lone client, {args.lone} sequential requests (n_loops 8, {lone[0][0].max_tokens} tokens):")
    for name in ("old", "new"):
        r = res[name, "lone"]
        print(f"  {label[name]:22s} TTFT p50 {pct(r.ttft_ms, 50):6.1f} ms | latency p50 {pct(r.latency_ms, 50):6.0f} ms")
    ratio = pct(res["new", "lone"].ttft_ms, 50) / pct(res["old", "lone"].ttft_ms, 50)
    print(f"  new / old TTFT p50: {ratio:.2f}  (goal <= 1: new not worse)")

    print(f"\n3. new engine's rows per decode pass during the mixed run ({len(occ)} passes):")
    if occ:
        rows = [n for _, n in occ]
        print(f"  mean {statistics.mean(rows):.1f}, max {max(rows)} (of {args.max_rows})")
        bins: list[list[int]] = [[] for _ in range(10)]
        for t, k in occ:
            bins[min(9, int((t - t0) / (t1 - t0) * 10))].append(k)
        means = [statistics.mean(b) if b else 0.0 for b in bins]
        print("  mean rows per tenth of the run: " + " ".join(f"{m:4.1f}" for m in means))
    print(f"  in forward passes {busy[0]:.2f} s of the run's {t1 - t0:.2f} s ({busy[0] / (t1 - t0):.0%}; "
          f"{busy[2]} prefills {busy[1]:.2f} s, the rest decode passes): the scheduling around them is the rest")
    pass_costs(model)
    floor(res, mixed)


def iterations(reqs: list[Req]) -> int:
    """Loop iterations a client's requests need one after another: tokens x n_loops, summed."""
    return sum(r.max_tokens * r.n_loops for r in reqs)


def floor(res: dict, mixed: list[list[Req]]) -> None:
    """5. The load's floor: a client's requests run one after another, and each token of a request
    needs its n_loops iterations one after another, so no schedule finishes the load before its
    longest client would finish alone."""
    old, new = res["old", "mixed"], res["new", "mixed"]
    alone = {c: r.wall_s for (kind, c), r in res.items() if kind == "alone"}
    c = max(alone, key=alone.get)
    tokens = sum(r.max_tokens for r in mixed[c])
    print(f"\n5. the load's floor: client {c}'s {len(mixed[c])} requests ({tokens} tokens, "
          f"n_loops {[r.n_loops for r in mixed[c]]}: {iterations(mixed[c])} loop iterations one after another) "
          f"take {alone[c]:.2f} s alone on the new engine; in the mixed run that client finished after "
          f"{new.client_s[c]:.2f} s (the run: {new.wall_s:.2f} s).")
    print(f"  No schedule finishes this load in less than {alone[c]:.2f} s, so none exceeds "
          f"{old.wall_s / alone[c]:.2f}x the old batcher's tokens/s ({old.wall_s:.2f} s) on this machine, "
          f"even if the other {sum(map(len, mixed)) - len(mixed[c])} requests cost nothing; 3x needs "
          f"{old.wall_s / 3:.2f} s.")


def pass_costs(model, context: int = 40, reps: int = 20) -> None:
    """4. What one decode pass costs by rows and depth (main thread): why sharing passes is capped."""
    from mythos.slot_cache import SlotCache

    def ms(loops: list[int]) -> float:
        cache = SlotCache(len(loops), context + reps + 2)
        with torch.inference_mode():
            for i, n in enumerate(loops):
                model(torch.randint(0, 256, (1, context)), n_loops=torch.tensor([n]), cache=cache.batch([i]))
            ids, counts = torch.randint(0, 256, (len(loops), 1)), torch.tensor(loops)
            t = time.perf_counter()
            for _ in range(reps):
                model(ids, n_loops=counts, cache=cache.batch(range(len(loops))))
        return (time.perf_counter() - t) / reps * 1000

    mixed = sorted([16, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1], reverse=True)
    groups = sum(ms([n] * mixed.count(n)) for n in sorted(set(mixed), reverse=True))
    print(f"\n4. one decode pass ({context} positions cached), ms: 16 loops x 1 row {ms([16]):.1f}, x 4 rows "
          f"{ms([16] * 4):.1f}, x 16 rows {ms([16] * 16):.1f}; 16 rows of mixed depth (1-16) in one pass "
          f"{ms(mixed):.1f} vs the same rows as one pass per depth {groups:.1f} "
          f"(at most sum/max depth = {sum(sorted(set(mixed))) / 16:.2f}x where a pass costs its deepest row)")


# ---------------------------------------------------------------------------------------
# B. over HTTP (Ray Serve)
# ---------------------------------------------------------------------------------------
def part_b(args, folder: str, model, tok) -> None:
    import httpx
    import ray
    from ray import serve

    from mythos.generation import SamplingParams, generate
    from mythos_platform.serve.app import build_app
    from mythos_platform.serve.config import ServeConfig
    from mythos_platform.serve.deploy import base_url, start_serve, wait_healthy

    prompt, max_tokens = "f(a)=c f(c)=b f(b)=a. f(f(a))=", 16
    ids = tok.encode(prompt)
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}

    def direct() -> str:
        res = generate(model, [ids], SamplingParams(max_new_tokens=max_tokens, temperature=0.0), pad_id=tok.pad_id)
        return tok.decode(res.tokens[0])

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        urls = {}
        for name, enabled in (("on", True), ("off", False)):
            cfg = ServeConfig.from_dict({
                "model": {"source": folder, "served_name": "bench", "torch_threads": 1},
                "http": {"port": port, "route_prefix": f"/{name}", "api_key_env": None},
                "batching": {"enabled": enabled, "max_batch_size": args.http_clients},
                "deployment": {"app_name": f"bench-{name}", "name": f"Mythos-{name}", "num_cpus": 0.5},
                "log_level": "WARNING",
            })
            host, port = start_serve(cfg)
            serve.run(build_app(cfg), name=cfg.deployment.app_name, route_prefix=cfg.http.route_prefix)
            urls[name] = base_url(host, port, cfg.http.route_prefix)
            wait_healthy(urls[name])
        print(f"\nB. over HTTP: prompt {len(ids)} tokens, max_tokens {max_tokens}, greedy, torch threads 1 "
              f"(replicas and the direct call), {model.cfg.n_loops} loops")

        # --- latency: served vs direct, interleaved ---------------------------------------
        torch.set_num_threads(1)
        mismatches = 0
        with httpx.Client(timeout=120) as http:
            for _ in range(3):  # warm up both paths
                direct()
                http.post(f"{urls['on']}/v1/completions", json=body).raise_for_status()
            before = http.get(f"{urls['on']}/health").json()["stats"]
            d_ms, s_ms, h_ms = [], [], []
            for _ in range(args.http_requests):
                t = time.perf_counter()
                http.get(f"{urls['on']}/health").raise_for_status()
                h_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                text_d = direct()
                d_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                r = http.post(f"{urls['on']}/v1/completions", json=body)
                s_ms.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                mismatches += r.json()["choices"][0]["text"] != text_d
            after = http.get(f"{urls['on']}/health").json()["stats"]
        torch.set_num_threads(args.threads)
        replica_ms = (after["busy_s"] - before["busy_s"]) * 1000 / args.http_requests
        diff = [s - d for s, d in zip(s_ms, d_ms)]
        print(f"latency, 1 client, {args.http_requests} requests each (ms):")
        print(f"  direct in-process generate  p50 {pct(d_ms, 50):7.1f}  p95 {pct(d_ms, 95):7.1f}")
        print(f"  via Serve (HTTP)            p50 {pct(s_ms, 50):7.1f}  p95 {pct(s_ms, 95):7.1f}")
        print(f"  added by Serve              p50 {pct(s_ms, 50) - pct(d_ms, 50):7.1f}  "
              f"(median of per-pair differences {statistics.median(diff):.1f})  goal <= 15 ms")
        print(f"  forward passes inside the replica mean {replica_ms:7.1f}   (served - replica: "
              f"{statistics.mean(s_ms) - replica_ms:.1f} ms mean in HTTP, proxy, queueing, Python)")
        print(f"  floor: GET /health via Serve p50 {pct(h_ms, 50):7.1f}  p95 {pct(h_ms, 95):7.1f}")
        print(f"  served texts that differ from direct generate: {mismatches} of {args.http_requests}")

        # --- throughput: batching on vs off -------------------------------------------------
        async def load(url: str, clients: int) -> tuple[float, int, list[float]]:
            lat: list[float] = []
            tokens = 0

            async def client(http: httpx.AsyncClient) -> None:
                nonlocal tokens
                for _ in range(args.http_per_client):
                    t = time.perf_counter()
                    r = await http.post(f"{url}/v1/completions", json=body)
                    r.raise_for_status()
                    lat.append((time.perf_counter() - t) * 1000)
                    tokens += r.json()["usage"]["completion_tokens"]

            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
                t = time.perf_counter()
                await asyncio.gather(*(client(http) for _ in range(clients)))
                return time.perf_counter() - t, tokens, lat

        n = args.http_clients * args.http_per_client
        print(f"throughput, {args.http_clients} concurrent clients x {args.http_per_client} requests:")
        rates = {}
        for name in ("on", "off"):
            asyncio.run(load(urls[name], 2))  # warm up
            before = httpx.get(f"{urls[name]}/health").json()["stats"]
            secs, tokens, lat = asyncio.run(load(urls[name], args.http_clients))
            after = httpx.get(f"{urls[name]}/health").json()["stats"]
            steps = after["steps"] - before["steps"]
            rates[name] = n / secs
            print(f"  batching {name:3s}: {n / secs:6.2f} req/s, {tokens / secs:7.1f} tokens/s, "
                  f"latency p50 {pct(lat, 50):6.0f} ms p95 {pct(lat, 95):6.0f} ms, "
                  f"mean rows per decode pass {(after['decoded'] - before['decoded']) / max(steps, 1):.1f}")
        print(f"  speed-up from batching: {rates['on'] / rates['off']:.2f}x  (goal >= 3x)")
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the trained debug export, else random)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=4)
    ap.add_argument("--max-rows", type=int, default=16, help="static max_batch_size and the engine's max_rows")
    ap.add_argument("--lone", type=int, default=8, help="lone client: sequential requests")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: a replica's)")
    ap.add_argument("--quick", action="store_true", help="8 clients x 2 requests, lone 4")
    ap.add_argument("--http", action="store_true", help="also part B (Ray Serve over HTTP)")
    ap.add_argument("--http-requests", type=int, default=40, help="B: latency requests (each direct and served)")
    ap.add_argument("--http-clients", type=int, default=8)
    ap.add_argument("--http-per-client", type=int, default=6)
    args = ap.parse_args()
    if args.quick:
        args.clients, args.per_client, args.lone = 8, 2, 4
        args.http_requests, args.http_per_client = 10, 2

    from mythos.checkpoint import load_pretrained
    from mythos.tokenizer import load_tokenizer_from_folder

    folder = model_folder(args.model)
    torch.set_num_threads(args.threads)
    model = load_pretrained(folder).eval()
    tok = load_tokenizer_from_folder(folder)
    print(f"model {folder} | torch threads {args.threads} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
          f"params, dim {model.cfg.dim}")
    part_a(args, model, tok)
    if args.http:
        part_b(args, folder, model, tok)


if __name__ == "__main__":
    main()
