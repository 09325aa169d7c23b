"""Prometheus metrics of a replica, served at GET /metrics in the text exposition format.

The standard client (`prometheus_client`, which Ray itself depends on) with a registry per replica,
fed by the engine's observer hook (`EngineStats.observers`) and by the request handlers:

    mythos_requests_total{route, outcome}    requests answered (outcome: ok, client_error, error)
    mythos_generated_tokens_total            tokens generated
    mythos_prompt_tokens_total               prompt tokens prefilled
    mythos_batch_rows                        rows in each decode pass (histogram)
    mythos_step_seconds                      seconds per decode pass (histogram)
    mythos_prefill_seconds                   seconds per prefill (histogram)
    mythos_loops_per_request                 mean loop iterations per token of each finished request
    mythos_queue_depth, mythos_running_rows  requests waiting for a row, rows generating (gauges)

Each replica answers for itself (Serve routes /metrics to any replica); a Prometheus server scrapes
replicas through Serve or reads Ray's own metrics endpoint, where Serve's built-in request metrics are.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the route)

ROWS_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOOPS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class ServeMetrics:
    def __init__(self, engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("mythos_requests", "Requests answered", ["route", "outcome"], registry=r)
        self.tokens = Counter("mythos_generated_tokens", "Tokens generated", registry=r)
        self.prompt_tokens = Counter("mythos_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.rows = Histogram("mythos_batch_rows", "Rows in each decode pass", buckets=ROWS_BUCKETS, registry=r)
        self.step_s = Histogram("mythos_step_seconds", "Seconds per decode pass", buckets=SECONDS_BUCKETS, registry=r)
        self.prefill_s = Histogram("mythos_prefill_seconds", "Seconds per prefill", buckets=SECONDS_BUCKETS,
                                   registry=r)
        self.loops = Histogram("mythos_loops_per_request", "Mean loop iterations per token of a finished request",
                               buckets=LOOPS_BUCKETS, registry=r)
        queue = Gauge("mythos_queue_depth", "Requests waiting for a row", registry=r)
        queue.set_function(lambda: engine.queue_depth)
        running = Gauge("mythos_running_rows", "Rows generating", registry=r)
        running.set_function(lambda: len(engine.rows))
        self._by_event = {"tokens": self.tokens.inc, "prompt_tokens": self.prompt_tokens.inc,
                          "step_rows": self.rows.observe, "step_s": self.step_s.observe,
                          "prefill_s": self.prefill_s.observe, "request_loops": self.loops.observe}
        engine.stats.observers.append(self.observe)

    def observe(self, event: str, value: float) -> None:
        self._by_event[event](value)

    def request(self, route: str, status: int) -> None:
        outcome = "ok" if status < 400 else "client_error" if status < 500 else "error"
        self.requests.labels(route=route, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
