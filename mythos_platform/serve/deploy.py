"""Deploy the completions app on the Ray cluster this process is connected to, and wait until healthy.

    from mythos_platform.ray_env import init_ray
    init_ray()
    url = deploy(cfg)        # e.g. http://127.0.0.1:8000
    ...
    serve.delete(cfg.deployment.app_name)   # or `serve shutdown` / `serve.shutdown()`

Serve's HTTP options (host, port) are cluster-wide and fixed by the first `serve.start` on the
cluster; when Serve already runs with other options, `deploy` reports the address it really has.
"""

from __future__ import annotations

import logging
import os
import time

import httpx

from .app import build_app
from .config import ServeConfig

log = logging.getLogger("mythos")


def start_serve(cfg: ServeConfig) -> tuple[str, int]:
    """Start Serve (idempotent) with cfg.http's host and port; the (host, port) it actually listens on."""
    from ray import serve
    from ray.serve.context import _get_global_client

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port}, proxy_location="HeadOnly")
    try:
        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # noqa: BLE001 - a private API: fall back to what was asked for
        host, port = cfg.http.host, cfg.http.port
    if (host, port) != (cfg.http.host, cfg.http.port):
        log.warning("Serve already runs on %s:%s on this cluster (asked for %s:%s); using it", host, port,
                    cfg.http.host, cfg.http.port)
    return host, port


def base_url(host: str, port: int, route_prefix: str = "/") -> str:
    """The URL a client on this machine uses (0.0.0.0 / :: are reached through loopback)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}{route_prefix.rstrip('/')}"


def wait_healthy(url: str, timeout_s: float = 120.0, headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/health", timeout=5.0, headers=headers)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise TimeoutError(f"{url}/health did not answer 200 within {timeout_s:.0f} s (last: {last})")


def deploy(cfg: ServeConfig, api_key: str | None = None, timeout_s: float = 300.0) -> str:
    """Run the app (replacing an app of the same name) and return its base URL once /health answers."""
    from ray import serve

    host, port = start_serve(cfg)
    serve.run(build_app(cfg, api_key=api_key), name=cfg.deployment.app_name, route_prefix=cfg.http.route_prefix,
              blocking=False)
    url = base_url(host, port, cfg.http.route_prefix)
    wait_healthy(url, timeout_s)
    return url


def resolve_served_model(cfg: ServeConfig) -> ServeConfig:
    """`cfg` with the model checked before any replica starts: a local folder becomes an absolute
    path, the MLflow tracking URI and the served name are filled in. Raises ModelNotFoundError."""
    from ..registry import resolve_model

    tracking = cfg.model.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    folder = resolve_model(cfg.model.source, tracking_uri=tracking)
    sets: dict = {"model.tracking_uri": tracking}
    if not cfg.model.source.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        sets["model.source"] = str(folder.resolve())
    if not cfg.model.served_name:
        sets["model.served_name"] = cfg.model.model_id()
    return cfg.updated(sets)


def example_request(url: str, model_id: str, key_env: str | None) -> str:
    """A curl command and the openai client calls (completion, chat) that query the served model."""
    auth = f' -H "Authorization: Bearer ${key_env}"' if key_env and os.environ.get(key_env) else ""
    key = f'os.environ["{key_env}"]' if auth else '"none"'
    return (
        f"  curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{model_id}\", \"prompt\": \"Q: \", \"max_tokens\": 32, \"temperature\": 0, "
        f"\"n_loops\": 8}}'\n\n"
        f"  from openai import OpenAI\n"
        f"  client = OpenAI(base_url=\"{url}/v1\", api_key={key})\n"
        f"  client.completions.create(model=\"{model_id}\", prompt=\"Q: \", max_tokens=32, "
        f"extra_body={{\"n_loops\": 8}})\n"
        f"  client.chat.completions.create(model=\"{model_id}\", messages=[{{\"role\": \"user\", "
        f"\"content\": \"Hi\"}}], max_tokens=32, extra_body={{\"n_loops\": 8}})"
    )
