"""The Ray Serve application: an OpenAI-style completions API in front of `Engine` + `Batcher`.

Routes (under http.route_prefix):
    POST /v1/completions   prompt, max_tokens, temperature, top_p, stop, stream, seed, ...
                           + n_loops, exit_threshold, top_k, ignore_eos (extensions); SSE when stream=true
    GET  /v1/models        the served model id
    GET  /health           200 {"status": "ok"} while the replica can serve (the same check as
                           Serve's `check_health`)

Every bad request gets a 4xx `{"error": {"message", "type", "param", "code"}}` naming the field,
and the replica keeps serving. With `http.api_key_env` naming a set environment variable (read
where the application is built), requests need `Authorization: Bearer <key>`; the replicas only
receive the key's SHA-256.

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
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServeConfig
from .engine import Batcher, Delta, Engine, Failed, Finished, Job, events
from .schemas import (APIError, CompletionRequest, choice, chunk, completion, error_body, mythos_info, new_id,
                      parse_request, usage)

log = logging.getLogger("mythos")

api = FastAPI(title="Mythos RDT completions", version="1", docs_url=None, redoc_url=None, openapi_url=None)


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


class _Generation:
    """A request's jobs as they generate: `async with _Generation(jobs, queue) as gen: async for i, ev in gen:`
    gives `events` and counts the tokens and loop iterations of the finished rows. On leaving the block
    every job is marked cancelled: a no-op for finished rows; drops the rest if the client went away."""

    def __init__(self, jobs: list[Job], queue: asyncio.Queue) -> None:
        self.jobs, self.queue = jobs, queue
        self.tokens, self.loops = 0, 0.0

    async def __aenter__(self) -> "_Generation":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        for j in self.jobs:
            j.cancelled = True

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta | Finished | Failed]]:
        async for i, ev in events(self.queue, len(self.jobs)):
            if isinstance(ev, Finished):
                self.tokens += ev.completion_tokens
                self.loops += ev.loops_used * ev.completion_tokens
            yield i, ev

    def mythos(self, n_loops: int, exit_threshold: float | None) -> dict[str, Any]:
        """The response's `mythos` field: loop iterations per generated token over the finished rows."""
        return mythos_info(n_loops, self.loops / max(self.tokens, 1), exit_threshold)


@serve.deployment
@serve.ingress(api)
class MythosServer:
    """One replica: the model, its tokenizer and a batcher."""

    def __init__(self, config: dict, api_key_sha256: Optional[str] = None) -> None:
        from mythos_platform.registry import resolve_model

        self.cfg = cfg = ServeConfig.from_dict(config)
        logging.getLogger("mythos").setLevel(cfg.log_level)
        folder = resolve_model(cfg.model.source, tracking_uri=cfg.model.tracking_uri)
        self.engine = Engine.load(folder, cfg.model.model_id(), cfg.model.device, cfg.model.torch_threads)
        b = cfg.batching
        self.batcher = Batcher(self.engine, b.max_batch_size, b.max_wait_ms / 1000, b.enabled)
        self.key_hash = api_key_sha256
        self.created = int(time.time())
        log.info("serving %s from %s (n_loops default %d, max_seq_len %d, batching %s)", self.engine.model_id,
                 folder, self.engine.cfg.n_loops, self.engine.cfg.max_seq_len, b)

    # --- health ---------------------------------------------------------------------------
    def check_health(self) -> None:
        """Called by Serve's controller; raising marks the replica unhealthy (it is restarted)."""
        self.engine.check_health()
        if not self.batcher.alive():
            raise RuntimeError("the batching loop has stopped")

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        try:
            self.check_health()
        except Exception as exc:  # noqa: BLE001
            raise APIError(503, f"unhealthy: {exc}", code="unhealthy", type="server_error") from None
        e = self.engine
        return {"status": "ok", "model": e.model_id, "stats": {"batches": e.batches_run, "requests": e.rows_run,
                                                            "busy_s": round(e.busy_s, 4),
                                                            "recent_batches": self.batcher.batch_sizes[-16:]}}

    # --- auth -------------------------------------------------------------------------------
    def _auth(self, request: Request) -> None:
        if not self.key_hash:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        if not hmac.compare_digest(_key_hash(token.strip()), self.key_hash):
            raise APIError(401, "invalid API key", code="invalid_api_key")

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
        c = self.engine.cfg
        return {"id": self.engine.model_id, "object": "model", "created": self.created, "owned_by": "mythos",
                "mythos": {"n_loops": self.cfg.defaults.n_loops or c.n_loops, "max_loops": self.cfg.limits.max_loops,
                           "max_seq_len": c.max_seq_len, "max_prompt_tokens": self._max_prompt_tokens(),
                           "max_tokens": self.cfg.limits.max_tokens}}

    def _check_model(self, model_id: str) -> None:
        if model_id != self.engine.model_id:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {self.engine.model_id!r}",
                           param="model", code="model_not_found")

    def _max_prompt_tokens(self) -> int:
        return min(self.cfg.limits.max_prompt_tokens, self.engine.cfg.max_seq_len - 1)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._auth(request)
        raw = await request.body()
        if len(raw) > self.cfg.limits.max_body_bytes:
            raise APIError(413, f"request body has {len(raw)} bytes, more than {self.cfg.limits.max_body_bytes}",
                           code="body_too_large")
        req = parse_request(raw)
        jobs, n_loops, exit_threshold, prompt_tokens = self._jobs(req)
        rid = new_id()
        queue = await self.batcher.submit(jobs)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self._stream(rid, jobs, queue, n_loops, exit_threshold, prompt_tokens,
                                                  include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts = [""] * len(jobs)
        reasons = ["length"] * len(jobs)
        async with _Generation(jobs, queue) as gen:
            async for i, ev in gen:
                if isinstance(ev, Failed):
                    raise APIError(500, f"generation failed: {type(ev.error).__name__}: {ev.error}",
                                   code="generation_failed", type="server_error")
                texts[i] += ev.text
                if isinstance(ev, Finished):
                    reasons[i] = ev.reason
        body = completion(rid, self.engine.model_id, [choice(i, t, r) for i, (t, r) in enumerate(zip(texts, reasons))],
                          usage(prompt_tokens, gen.tokens), gen.mythos(n_loops, exit_threshold))
        return JSONResponse(body)

    async def _stream(self, rid: str, jobs: list[Job], queue: asyncio.Queue, n_loops: int,
                      exit_threshold: float | None, prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
        model = self.engine.model_id
        async with _Generation(jobs, queue) as gen:
            async for i, ev in gen:
                if isinstance(ev, Delta):
                    yield _sse(chunk(rid, model, [choice(i, ev.text, None)]))
                elif isinstance(ev, Finished):
                    yield _sse(chunk(rid, model, [choice(i, ev.text, ev.reason)],
                                     mythos=mythos_info(n_loops, ev.loops_used, exit_threshold)))
                elif isinstance(ev, Failed):
                    yield _sse(error_body(f"generation failed: {type(ev.error).__name__}: {ev.error}",
                                          type="server_error", code="generation_failed"))
                    break
            if include_usage:
                yield _sse(chunk(rid, model, [], usage=usage(prompt_tokens, gen.tokens),
                                 mythos=gen.mythos(n_loops, exit_threshold)))
            yield "data: [DONE]\n\n"

    # --- request -> jobs -------------------------------------------------------------------
    def _jobs(self, req: CompletionRequest) -> tuple[list[Job], int, float | None, int]:
        """Check the request against the limits; one Job per prompt. APIError(400) names the field."""
        lim, cfg = self.cfg.limits, self.engine.cfg
        self._check_model(req.model)
        if req.echo:
            raise APIError(400, "echo: only false is supported", "echo", "unsupported_value")
        prompts = req.prompts()
        if not prompts:
            raise APIError(400, "prompt: the list is empty", "prompt", "empty")
        if len(prompts) > lim.max_prompts:
            raise APIError(400, f"prompt: {len(prompts)} prompts, more than the limit {lim.max_prompts}", "prompt",
                           "too_many")
        max_tokens = lim.default_max_tokens if req.max_tokens is None else req.max_tokens
        if max_tokens > lim.max_tokens:
            raise APIError(400, f"max_tokens: {max_tokens} is more than the limit {lim.max_tokens}", "max_tokens",
                           "out_of_range")
        n_loops = req.n_loops or self.cfg.defaults.n_loops or cfg.n_loops
        if n_loops > lim.max_loops:
            raise APIError(400, f"n_loops: {n_loops} is more than the limit {lim.max_loops}", "n_loops",
                           "out_of_range")
        exit_threshold = req.exit_threshold if req.exit_threshold is not None else self.cfg.defaults.exit_threshold
        stops = req.stops()
        if len(stops) > lim.max_stop:
            raise APIError(400, f"stop: {len(stops)} stop strings, more than the limit {lim.max_stop}", "stop",
                           "too_many")
        if any(not s for s in stops):
            raise APIError(400, "stop: stop strings must not be empty", "stop", "empty")
        eos = self.engine.tokenizer.eos_id
        prefix = [eos] if self.cfg.model.prefix_token and eos is not None else []
        ids = []
        max_prompt = self._max_prompt_tokens()
        for k, text in enumerate(prompts):
            where = "prompt" if isinstance(req.prompt, str) else f"prompt[{k}]"
            own = self.engine.tokenizer.encode(text)
            if not own:
                raise APIError(400, f"{where}: is empty; need at least one token", "prompt", "empty")
            p = prefix + own
            ids.append(p)
            if len(p) > max_prompt:
                raise APIError(400, f"{where}: {len(p)} tokens, more than the limit {max_prompt}", "prompt",
                               "too_long")
            if len(p) + max_tokens > cfg.max_seq_len:
                raise APIError(400, f"max_tokens: {where} ({len(p)} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"model's max_seq_len={cfg.max_seq_len}; ask for at most {cfg.max_seq_len - len(p)}",
                               "max_tokens", "out_of_range")
        jobs = [Job(p, max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                    n_loops=n_loops, exit_threshold=exit_threshold, stop=stops, ignore_eos=req.ignore_eos,
                    stream=req.stream) for p in ids]
        return jobs, n_loops, exit_threshold, sum(len(p) - len(prefix) for p in ids)


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
