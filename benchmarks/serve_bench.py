"""Serving benchmark: what Ray Serve adds to a request's latency, and what batching buys.

    python benchmarks/serve_bench.py [--model runs/debug/export/debug] [--requests 40] [--clients 8]

1. Latency: one client sends the same greedy request N times over HTTP to the app (batching on),
   interleaved with the same request as a direct in-process call (`mythos.generation.generate` +
   decode, the same torch thread count as a replica), so both see the same background load.
   Prints p50/p95 of each and of the per-pair difference (goal: Serve adds <= 15 ms at p50).
2. Throughput: `--clients` concurrent clients against the app with batching on, then with
   batching off (one request at a time), same requests (goal: on / off >= 3x).
Requests set `ignore_eos` so every one generates max_tokens tokens (the trained debug model
otherwise stops after a couple of tokens).

Starts a private local Ray on 127.0.0.1 with two apps (routes /on and /off); prints figures
(not a test). Without --model it serves runs/debug/export/debug when present, else a random
debug model.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the trained debug export)")
    ap.add_argument("--prompt", default="f(a)=c f(c)=b f(b)=a. f(f(a))=")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=40, help="latency: requests (each direct and served)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=6, help="throughput: requests per client")
    ap.add_argument("--max-wait-ms", type=float, default=100.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (replicas and the direct call)")
    args = ap.parse_args()

    import ray
    from ray import serve

    from mythos.checkpoint import load_pretrained
    from mythos.generation import SamplingParams, generate
    from mythos.tokenizer import load_tokenizer_from_folder
    from mythos_platform.serve.app import build_app
    from mythos_platform.serve.config import ServeConfig
    from mythos_platform.serve.deploy import base_url, start_serve, wait_healthy

    folder = model_folder(args.model)
    torch.set_num_threads(args.threads)
    model = load_pretrained(folder)
    tok = load_tokenizer_from_folder(folder)
    ids = tok.encode(args.prompt)
    body = {"model": "bench", "prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True}

    def direct() -> str:
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0)
        res = generate(model, [ids], params, pad_id=tok.pad_id)
        return tok.decode(res.tokens[0])

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, configure_logging=False)
    try:
        port = free_port()
        urls = {}
        for name, enabled in (("on", True), ("off", False)):
            cfg = ServeConfig.from_dict({
                "model": {"source": folder, "served_name": "bench", "torch_threads": args.threads},
                "http": {"port": port, "route_prefix": f"/{name}", "api_key_env": None},
                "batching": {"enabled": enabled, "max_batch_size": args.clients, "max_wait_ms": args.max_wait_ms},
                "deployment": {"app_name": f"bench-{name}", "name": f"Mythos-{name}", "num_cpus": 0.5},
                "log_level": "WARNING",
            })
            host, port = start_serve(cfg)
            serve.run(build_app(cfg), name=cfg.deployment.app_name, route_prefix=cfg.http.route_prefix)
            urls[name] = base_url(host, port, cfg.http.route_prefix)
            wait_healthy(urls[name])
        print(f"model {folder} | prompt {len(ids)} tokens, max_tokens {args.max_tokens}, greedy, "
              f"torch threads {args.threads}, {model.cfg.n_loops} loops")

        # --- 1. latency: served vs direct, interleaved ------------------------------------
        with httpx.Client(timeout=120) as http:
            for _ in range(3):  # warm up both paths
                direct()
                http.post(f"{urls['on']}/v1/completions", json=body).raise_for_status()
            before = http.get(f"{urls['on']}/health").json()["stats"]
            d_ms, s_ms, h_ms = [], [], []
            for _ in range(args.requests):
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
                assert r.json()["choices"][0]["text"] == text_d, "served and direct greedy outputs differ"
            after = http.get(f"{urls['on']}/health").json()["stats"]
        replica_ms = (after["busy_s"] - before["busy_s"]) * 1000 / args.requests
        diff = [s - d for s, d in zip(s_ms, d_ms)]
        print(f"\nlatency, 1 client, {args.requests} requests each (ms):")
        print(f"  direct in-process generate  p50 {pct(d_ms, 50):7.1f}  p95 {pct(d_ms, 95):7.1f}")
        print(f"  via Serve (HTTP, batching)  p50 {pct(s_ms, 50):7.1f}  p95 {pct(s_ms, 95):7.1f}")
        print(f"  added by Serve              p50 {pct(s_ms, 50) - pct(d_ms, 50):7.1f}  "
              f"(median of per-pair differences {statistics.median(diff):.1f})  goal <= 15 ms")
        print(f"  generate inside the replica mean {replica_ms:7.1f}   (served - replica generate: "
              f"{statistics.mean(s_ms) - replica_ms:.1f} ms mean in HTTP, proxy, queueing)")
        print(f"  floor: GET /health via Serve p50 {pct(h_ms, 50):7.1f}  p95 {pct(h_ms, 95):7.1f}")

        # --- 2. throughput: batching on vs off -------------------------------------------
        async def load(url: str, clients: int) -> tuple[float, int, list[float]]:
            lat: list[float] = []
            tokens = 0

            async def client(http: httpx.AsyncClient) -> None:
                nonlocal tokens
                for _ in range(args.per_client):
                    t = time.perf_counter()
                    r = await http.post(f"{url}/v1/completions", json=body)
                    r.raise_for_status()
                    lat.append((time.perf_counter() - t) * 1000)
                    tokens += r.json()["usage"]["completion_tokens"]

            async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
                t = time.perf_counter()
                await asyncio.gather(*(client(http) for _ in range(clients)))
                return time.perf_counter() - t, tokens, lat

        n = args.clients * args.per_client
        print(f"\nthroughput, {args.clients} concurrent clients x {args.per_client} requests:")
        rates = {}
        for name in ("on", "off"):
            asyncio.run(load(urls[name], 2))  # warm up
            before = httpx.get(f"{urls[name]}/health").json()["stats"]
            secs, tokens, lat = asyncio.run(load(urls[name], args.clients))
            after = httpx.get(f"{urls[name]}/health").json()["stats"]
            batches = after["batches"] - before["batches"]
            rates[name] = n / secs
            print(f"  batching {name:3s}: {n / secs:6.2f} req/s, {tokens / secs:7.1f} tokens/s, "
                  f"latency p50 {pct(lat, 50):6.0f} ms p95 {pct(lat, 95):6.0f} ms, "
                  f"mean batch {(after['requests'] - before['requests']) / max(batches, 1):.1f}")
            print(f"    last batches: {after['recent_batches']}")
        print(f"  speed-up from batching: {rates['on'] / rates['off']:.2f}x  (goal >= 3x)")
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
