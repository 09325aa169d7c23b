"""Ray Serve deployment of a Mythos model behind an OpenAI-style completions API.

    config.py   ServeConfig (model, http, limits, defaults, batching, deployment)
    schemas.py  request/response bodies and the OpenAI-style error format
    engine.py   Engine (model + tokenizer, batched generation, stop strings) and Batcher
    app.py      the FastAPI ingress deployment, build_app / app_builder
    deploy.py   deploy(cfg) -> URL: start Serve on 127.0.0.1 (by default), run the app, wait healthy
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
