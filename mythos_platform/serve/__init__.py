"""Ray Serve deployment of a Mythos model behind an OpenAI-style API (completions, chat completions).

    config.py         ServeConfig (model, http, limits, defaults, batching, deployment)
    schemas.py        request bodies (completions, chat, tokenize) and the OpenAI-style error format
    admission.py      a request checked against the limits and turned into engine jobs (the prefix token)
    chat_template.py  the chat template of the model folder (Jinja2), or the plain default
    jobs.py           a request's Job and the events it gets back (Delta, Finished, Failed)
    engine.py         Engine: iteration-level batching of mixed loop depths, stop strings, logprobs
    metrics.py        the Prometheus metrics of a replica (GET /metrics)
    logprobs.py       token logprobs from the logits, in OpenAI's completions and chat formats
    formats.py        response bodies and stream chunks of the two routes
    tokenizer_api.py  vLLM's /tokenize, /detokenize, /tokenizer_info (lm-eval's remote tokenizer)
    app.py            the FastAPI ingress deployment, build_app / app_builder
    deploy.py         deploy(cfg) -> URL: start Serve on 127.0.0.1 (by default), run the app, wait healthy
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
