"""Typed configuration of the Serve application (`jobs/configs/serve-debug.yaml`).

    cfg = load_config("jobs/configs/serve-debug.yaml", ["model.source=models:/mythos-rdt@champion"], cls=ServeConfig)

Same rules as every job config (`mythos_platform.config`): unknown keys and bad values raise
`ConfigError` naming the dotted path, before any Ray work starts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from mythos_platform.config import Section
from mythos_platform.registry import DEFAULT_ALIAS, DEFAULT_MODEL_NAME


class ServeModelConfig(Section):
    """Which model the replicas load and how."""

    source: str = f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"
    """A model folder (config.json + model.safetensors) or an MLflow URI (models:/name@alias)."""
    tracking_uri: str | None = None
    """MLflow tracking URI for models:/ sources; null: MLFLOW_TRACKING_URI or MLflow's default."""
    served_name: str | None = None
    """The model id clients pass (`model`); null: the registered name, or the folder's name."""
    device: str = "cpu"
    torch_threads: int = 1
    """Intra-op threads per replica (one replica per CPU: 1)."""
    prefix_token: bool = True
    """Put the tokenizer's end-of-text token before every prompt: training documents follow an EOS
    separator (and reasoning-corpus rows start with one), so it is the start-of-document signal, as
    in the lm-eval adapter. Not counted in usage.prompt_tokens."""

    def check(self) -> None:
        self.need(bool(self.source), "source", "must be a model folder or a models:/ URI")
        self.need(self.torch_threads >= 1, "torch_threads", "must be >= 1", self.torch_threads)

    def model_id(self) -> str:
        if self.served_name:
            return self.served_name
        src = self.source.rstrip("/")
        if src.startswith("models:/"):
            return src[len("models:/"):].split("@", 1)[0].split("/", 1)[0]
        return src.replace("\\", "/").rsplit("/", 1)[-1] or "mythos"


class HTTPConfig(Section):
    """Where the Serve proxy listens and who may call it."""

    host: str = "127.0.0.1"
    """Loopback by default; 0.0.0.0 exposes the API to the network (set an API key then)."""
    port: int = 8000
    route_prefix: str = "/"
    api_key_env: str | None = "MYTHOS_API_KEY"
    """Environment variable holding the bearer token; unset or empty variable: no authentication."""

    def check(self) -> None:
        self.need(bool(self.host), "host", "must be a host name or address")
        self.need(0 <= self.port <= 65535, "port", "must be in 0..65535", self.port)
        self.need(self.route_prefix.startswith("/"), "route_prefix", "must start with '/'",
                  self.route_prefix)


class LimitsConfig(Section):
    """Per-request bounds; a request beyond them gets a 400 naming the field."""

    max_prompt_tokens: int = 384
    max_tokens: int = 128
    """Upper bound of a request's max_tokens (prompt + max_tokens must also fit max_seq_len)."""
    default_max_tokens: int = 16
    """max_tokens when the request leaves it out (OpenAI's default is 16)."""
    max_loops: int = 32
    """Upper bound of the n_loops extension field."""
    max_prompts: int = 8
    """Prompts per request (prompt given as a list)."""
    max_stop: int = 4
    """Stop strings per request."""
    max_logprobs: int = 20
    """Upper bound of `logprobs` (completions) and `top_logprobs` (chat): most likely tokens per position."""
    max_body_bytes: int = 1 << 20

    def check(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_loops", "max_prompts",
                     "max_stop", "max_logprobs", "max_body_bytes"):
            self.need(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        self.need(self.default_max_tokens <= self.max_tokens, "default_max_tokens",
                  f"must be <= max_tokens={self.max_tokens}", self.default_max_tokens)


class DefaultsConfig(Section):
    """Values of the extension fields when a request leaves them out."""

    n_loops: int | None = None
    """null: the model's trained default (config.json n_loops)."""
    exit_threshold: float | None = None
    """Adaptive exit: stop looping once the relative state change drops below it; null: off."""

    def check(self) -> None:
        self.need(self.n_loops is None or self.n_loops >= 1, "n_loops", "must be >= 1 or null",
                  self.n_loops)
        self.need(self.exit_threshold is None or self.exit_threshold >= 0, "exit_threshold",
                  "must be >= 0 or null", self.exit_threshold)


class BatchingConfig(Section):
    """Iteration-level batching inside each replica (mythos_platform/serve/engine.py): requests join
    the running batch at the next decode step and leave when they finish, whatever their loop count."""

    enabled: bool = True
    """false: one request at a time."""
    max_batch_size: int = 16
    """Rows generating at once (the KV cache holds this many sequences of max_seq_len); more requests
    wait for a free row."""

    def check(self) -> None:
        self.need(self.max_batch_size >= 1, "max_batch_size", "must be >= 1", self.max_batch_size)


class AutoscalingSection(Section):
    """Ray Serve autoscaling_config (used when enabled; otherwise deployment.num_replicas)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def check(self) -> None:
        self.need(self.min_replicas >= 0, "min_replicas", "must be >= 0", self.min_replicas)
        self.need(self.max_replicas >= max(1, self.min_replicas), "max_replicas",
                  f"must be >= max(1, min_replicas={self.min_replicas})", self.max_replicas)
        self.need(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0",
                  self.target_ongoing_requests)

    def to_ray(self) -> dict[str, Any]:
        return {k: v for k, v in self.to_dict().items() if k != "enabled"}


class DeploymentConfig(Section):
    """Ray Serve deployment options of the model server."""

    app_name: str = "mythos"
    name: str = "MythosServer"
    num_replicas: int = 1
    num_cpus: float = 1.0
    """CPUs each replica reserves (fractional allowed)."""
    num_gpus: float = 0.0
    max_ongoing_requests: int = 64
    """Requests a replica accepts at once (must be >= batching.max_batch_size)."""
    max_queued_requests: int = 512
    """Requests waiting for a replica before the proxy answers 503; -1: unbounded."""
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)

    def check(self) -> None:
        self.need(bool(self.app_name), "app_name", "must be a name")
        self.need(self.num_replicas >= 1, "num_replicas", "must be >= 1", self.num_replicas)
        self.need(self.num_cpus >= 0, "num_cpus", "must be >= 0", self.num_cpus)
        self.need(self.num_gpus >= 0, "num_gpus", "must be >= 0", self.num_gpus)
        self.need(self.max_ongoing_requests >= 1, "max_ongoing_requests", "must be >= 1",
                  self.max_ongoing_requests)
        self.need(self.max_queued_requests == -1 or self.max_queued_requests >= 1, "max_queued_requests",
                  "must be >= 1 or -1", self.max_queued_requests)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options`."""
        opts: dict[str, Any] = {
            "name": self.name,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling.enabled:
            opts["autoscaling_config"] = self.autoscaling.to_ray()
        else:
            opts["num_replicas"] = self.num_replicas
        return opts


class ServeConfig(Section):
    """Everything `jobs/serve.py` and the Serve application need."""

    model: ServeModelConfig = Field(default_factory=ServeModelConfig)
    http: HTTPConfig = Field(default_factory=HTTPConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    defaults: DefaultsConfig = Field(default_factory=DefaultsConfig)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    deployment: DeploymentConfig = Field(default_factory=DeploymentConfig)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    def check(self) -> None:
        self.need(self.defaults.n_loops is None or self.defaults.n_loops <= self.limits.max_loops,
                  "defaults.n_loops", f"must be <= limits.max_loops={self.limits.max_loops}",
                  self.defaults.n_loops)
        self.need(self.deployment.max_ongoing_requests >= self.batching.max_batch_size,
                  "deployment.max_ongoing_requests",
                  f"must be >= batching.max_batch_size={self.batching.max_batch_size}",
                  self.deployment.max_ongoing_requests)
