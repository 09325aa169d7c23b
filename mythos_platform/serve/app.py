"""The Ray Serve application: an OpenAI-style API in front of the `Engine` (iteration-level batching).

Routes (under http.route_prefix):
    POST /v1/completions        prompt (text or token ids), max_tokens, temperature, top_p, stop, stream,
                                seed, echo, logprobs, ... + n_loops, exit_threshold, top_k, ignore_eos
                                (extensions); SSE when stream=true
    POST /v1/chat/completions   messages (rendered by the model's chat template), the same sampling fields
                                and extensions, logprobs/top_logprobs; SSE `delta` chunks when stream=true
    GET  /v1/models             the served model id
    GET  /tokenizer_info, POST /tokenize, POST /detokenize    vLLM's tokenizer routes (tokenizer_api.py)
    GET  /health                200 {"status": "ok"} while the replica can serve (the same check as
                                Serve's `check_health`), with the engine's counts
    GET  /metrics               Prometheus text format: requests, tokens, rows per pass, queue depth,
                                loops per request, seconds per pass (metrics.py)

Every bad request gets a 4xx `{"error": {"message", "type", "param", "code"}}` naming the field
(415 for a body that is not JSON), and the replica keeps serving. With `http.api_key_env` naming a
set environment variable (read where the application is built), requests need
`Authorization: Bearer <key>`; the replicas only receive the key's SHA-256.

    app = build_app(cfg)            # cfg: ServeConfig
    serve.run(app, name=cfg.deployment.app_name, route_prefix=cfg.http.route_prefix)

`app_builder` is the import path for `serve deploy` / `serve run` configs
(`mythos_platform.serve.app:app_builder`, `args:` a ServeConfig mapping).
"""

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .admission import Admission, Plan
from .chat_template import ChatTemplate
from .config import ServeConfig
from .engine import Delta, Engine, Failed, Finished, Job, events
from .formats import ChatFormat, CompletionFormat
from .metrics import CONTENT_TYPE_LATEST, ServeMetrics
from .schemas import (APIError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
                      error_body, mythos_info, parse_request, usage)
from .tokenizer_api import detokenize, eos_text, tokenize, tokenizer_info

log = logging.getLogger("mythos")

api = FastAPI(title="Mythos RDT completions", version="1", docs_url=None, redoc_url=None, openapi_url=None)


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info",
           "/health")


@api.middleware("http")
async def _count_requests(request: Request, call_next):
    response = await call_next(request)
    try:  # the replica's own MythosServer (Serve keeps one per replica process)
        metrics = serve.get_replica_context().servable_object.metrics
    except Exception:  # noqa: BLE001 - outside a replica, or before it is built: nothing to count
        metrics = None
    if metrics is not None:
        path = request.url.path
        route = next((r for r in _ROUTES if path.endswith(r)), "other")
        if route != "other" or not path.endswith("/metrics"):
            metrics.request(route, response.status_code)
    return response


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": "invalid"}
    param = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
    return JSONResponse(error_body(f"{param or 'request'}: {err['msg']}", param=param, code=err["type"]), 400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", param=None, code=code),
                        exc.status_code)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


JSON_TYPES = ("application/json",)


def _check_json_body(request: Request, raw: bytes, max_bytes: int) -> None:
    """415 for a body declared as something other than JSON (no Content-Type: read as JSON); 413 when too large."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in JSON_TYPES and not ctype.endswith("+json"):
        raise APIError(415, f"Content-Type {ctype!r} is not supported; send the body as JSON with "
                       "'Content-Type: application/json'", code="unsupported_media_type")
    if len(raw) > max_bytes:
        raise APIError(413, f"request body has {len(raw)} bytes, more than {max_bytes}", code="body_too_large")


class _Generation:
    """A request's jobs as they generate: `async with _Generation(jobs, queue) as gen: async for i, ev in gen:`
    gives `events` and counts the tokens and loop iterations of the finished rows. On leaving the block
    every job is marked cancelled: a no-op for finished rows; drops the rest if the client went away."""

    def __init__(self, jobs: list[Job], queue: asyncio.Queue) -> None:
        self.jobs, self.queue = jobs, queue
        self.tokens, self.steps, self.loops = 0, 0, 0.0

    async def __aenter__(self) -> "_Generation":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for j in self.jobs:
            j.cancelled = True

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta | Finished | Failed]]:
        async for i, ev in events(self.queue, len(self.jobs)):
            if isinstance(ev, Finished):
                steps = max(ev.completion_tokens, 1)  # a job of 0 tokens (echo only) ran the prefill
                self.tokens += ev.completion_tokens
                self.steps += steps
                self.loops += ev.loops_used * steps
            yield i, ev

    def mythos(self, n_loops: int, exit_threshold: float | None) -> dict[str, Any]:
        """The response's `mythos` field: loop iterations per step over the finished rows."""
        return mythos_info(n_loops, self.loops / max(self.steps, 1), exit_threshold)


@serve.deployment
@serve.ingress(api)
class MythosServer:
    """One replica: the model, its tokenizer, its chat template and a batcher."""

    def __init__(self, config: dict, api_key_sha256: Optional[str] = None) -> None:
        from mythos_platform.registry import resolve_model

        self.cfg = cfg = ServeConfig.from_dict(config)
        logging.getLogger("mythos").setLevel(cfg.log_level)
        folder = resolve_model(cfg.model.source, tracking_uri=cfg.model.tracking_uri)
        b = cfg.batching
        self.engine = Engine.load(folder, cfg.model.model_id(), cfg.model.device, cfg.model.torch_threads,
                                  max_rows=b.max_batch_size if b.enabled else 1)
        eos_token = eos_text(folder)
        self.admit = Admission(cfg, self.engine, ChatTemplate.load(folder, eos_token))
        self.tokenizer_info = tokenizer_info(self.admit, eos_token)
        self.engine.start()
        self.metrics = ServeMetrics(self.engine)
        self.key_hash = api_key_sha256
        self.created = int(time.time())
        log.info("serving %s from %s (n_loops default %d, max_seq_len %d, chat template %s, batching %s)",
                 self.engine.model_id, folder, self.engine.cfg.n_loops, self.engine.cfg.max_seq_len,
                 self.admit.template.origin, b)

    # --- health ---------------------------------------------------------------------------
    def check_health(self) -> None:
        """Called by Serve's controller; raising marks the replica unhealthy (it is restarted)."""
        self.engine.check_health()

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        try:
            self.check_health()
        except Exception as exc:  # noqa: BLE001
            raise APIError(503, f"unhealthy: {exc}", code="unhealthy", type="server_error") from None
        e, st = self.engine, self.engine.stats
        return {"status": "ok", "model": e.model_id,
                "stats": {"requests": st.requests, "tokens": st.tokens, "steps": st.steps, "decoded": st.decoded,
                          "busy_s": round(st.busy_s, 4),
                          "running_rows": len(e.rows), "queue_depth": e.queue_depth,
                          "recent_rows": [n for _, n in list(st.occupancy)[-16:]]}}

    @api.get("/metrics")
    def get_metrics(self) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # --- auth and body ----------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.key_hash:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(_key_hash(token.strip()), self.key_hash):
            raise APIError(401, "invalid API key", code="invalid_api_key")

    async def _parse(self, request: Request, cls: type) -> Any:
        """The authorised request's JSON body as `cls` (4xx naming the field otherwise)."""
        self._auth(request)
        raw = await request.body()
        _check_json_body(request, raw, self.cfg.limits.max_body_bytes)
        return parse_request(raw, cls)

    # --- routes -----------------------------------------------------------------------------
    @api.get("/v1/models")
    def models(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return {"object": "list", "data": [self._model_card()]}

    @api.get("/v1/models/{model_id}")
    def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self._auth(request)
        self._check_model(model_id)
        return self._model_card()

    def _model_card(self) -> dict[str, Any]:
        c, lim = self.engine.cfg, self.cfg.limits
        return {"id": self.engine.model_id, "object": "model", "created": self.created, "owned_by": "mythos",
                "mythos": {"n_loops": self.cfg.defaults.n_loops or c.n_loops, "max_loops": lim.max_loops,
                           "max_seq_len": c.max_seq_len, "max_prompt_tokens": self.admit.max_prompt_tokens(),
                           "max_tokens": lim.max_tokens, "max_logprobs": lim.max_logprobs,
                           "chat_template": self.admit.template.origin}}

    def _check_model(self, model_id: str | None) -> None:
        if model_id is not None and model_id != self.engine.model_id:
            raise APIError(404, f"model: {model_id!r} does not exist; this server serves {self.engine.model_id!r}",
                           param="model", code="model_not_found")

    @api.get("/tokenizer_info")
    def get_tokenizer_info(self, request: Request) -> dict[str, Any]:
        self._auth(request)
        return self.tokenizer_info

    @api.post("/tokenize")
    async def post_tokenize(self, request: Request) -> dict[str, Any]:
        req = await self._parse(request, TokenizeRequest)
        self._check_model(req.model)
        return tokenize(self.admit, req)

    @api.post("/detokenize")
    async def post_detokenize(self, request: Request) -> dict[str, Any]:
        req = await self._parse(request, DetokenizeRequest)
        self._check_model(req.model)
        return detokenize(self.admit, req)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        self._check_model(req.model)
        plan = self.admit.completion(req)
        fmt = CompletionFormat(self.engine.model_id, self.engine.tokenizer, req.logprobs is not None, plan.echo,
                               len(plan.jobs))
        return await self._respond(req, plan, fmt)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        req = await self._parse(request, ChatCompletionRequest)
        self._check_model(req.model)
        plan = self.admit.chat(req)
        return await self._respond(req, plan, ChatFormat(self.engine.model_id, self.engine.tokenizer, req.logprobs))

    # --- running a plan -----------------------------------------------------------------------
    async def _respond(self, req: Any, plan: Plan, fmt: CompletionFormat):
        queue = await self.engine.submit(plan.jobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(plan, queue, fmt, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        n = len(plan.jobs)
        texts, reasons, entries = [""] * n, ["length"] * n, [[] for _ in range(n)]
        async with _Generation(plan.jobs, queue) as gen:
            async for i, ev in gen:
                if isinstance(ev, Failed):
                    raise APIError(500, f"generation failed: {type(ev.error).__name__}: {ev.error}",
                                   code="generation_failed", type="server_error")
                texts[i] += ev.text
                entries[i] += ev.logprobs
                if isinstance(ev, Finished):
                    reasons[i] = ev.reason
        return JSONResponse(fmt.body(texts, reasons, entries, usage(plan.prompt_tokens, gen.tokens),
                                     gen.mythos(plan.n_loops, plan.exit_threshold)))

    async def _stream(self, plan: Plan, queue: asyncio.Queue, fmt: CompletionFormat,
                      include_usage: bool) -> AsyncIterator[str]:
        for first in fmt.begin():
            yield _sse(first)
        async with _Generation(plan.jobs, queue) as gen:
            async for i, ev in gen:
                if isinstance(ev, Delta):
                    yield _sse(fmt.piece(i, ev.text, ev.logprobs, None))
                elif isinstance(ev, Finished):
                    yield _sse({**fmt.piece(i, ev.text, ev.logprobs, ev.reason),
                                "mythos": mythos_info(plan.n_loops, ev.loops_used, plan.exit_threshold)})
                elif isinstance(ev, Failed):
                    yield _sse(error_body(f"generation failed: {type(ev.error).__name__}: {ev.error}",
                                          type="server_error", code="generation_failed"))
                    break
            if include_usage:
                yield _sse(fmt.chunk([], usage=usage(plan.prompt_tokens, gen.tokens),
                                     mythos=gen.mythos(plan.n_loops, plan.exit_threshold)))
            yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------------------------
# Building and deploying
# ---------------------------------------------------------------------------------------
def build_app(cfg: ServeConfig, api_key: str | None = None):
    """The Serve Application for `cfg`. The API key: `api_key`, else the environment variable
    `cfg.http.api_key_env` (unset or empty: no authentication)."""
    if api_key is None and cfg.http.api_key_env:
        api_key = os.environ.get(cfg.http.api_key_env) or None
    key_hash = _key_hash(api_key) if api_key else None
    return MythosServer.options(**cfg.deployment.options()).bind(cfg.to_dict(), key_hash)


def app_builder(args: dict[str, Any]):
    """`serve deploy` / `serve run` entry: `args` is a ServeConfig mapping (ConfigError names bad keys)."""
    return build_app(ServeConfig.from_dict(dict(args or {})))
