"""The whole life cycle as one job: pretrain -> sweep -> evaluate at several loop counts ->
deploy the winner -> send one real request. Every stage is the same code its own job runs;
all stages share one run root, so one MLflow store holds their runs and the Model Registry.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from .config import Section, _join
from .registry import DEFAULT_ALIAS, DEFAULT_MODEL_NAME, register_model

log = logging.getLogger("mythos")


@dataclass
class PipelineConfig(Section):
    """Which configs each stage starts from, and what the pipeline changes in them."""

    root: str = "./runs/pipeline"
    """Run root of every stage: checkpoints, exports, the MLflow store and registry."""
    pretrain_config: str = "jobs/configs/debug.yaml"
    pretrain_overrides: list[str] = field(default_factory=list)
    sweep: bool = True
    sweep_config: str = "jobs/configs/sweep-debug.yaml"
    sweep_overrides: list[str] = field(default_factory=list)
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    eval_tasks: list[str] = field(default_factory=lambda: ["multihop_k1", "multihop_k2", "multihop_k4", "multihop_k8"])
    eval_limit: float | None = 50
    eval_exit_thresholds: list[float] = field(default_factory=lambda: [0.05])
    serve_config: str = "jobs/configs/serve-debug.yaml"
    serve_overrides: list[str] = field(default_factory=list)
    prompt: str = "ab bc cd da b>>="
    request_loops: int = 8
    request_max_tokens: int = 8
    keep_serving: bool = True
    """Keep the endpoint up (until Ctrl-C) after the summary; false ends the job with it."""

    def check(self, path: str) -> None:
        for name in ("pretrain_config", "sweep_config", "serve_config"):
            self.need(Path(getattr(self, name)).is_file(), _join(path, name), "config file does not exist",
                      getattr(self, name))
        self.need(bool(self.eval_loops) and all(n >= 1 for n in self.eval_loops), _join(path, "eval_loops"),
                  "must be a non-empty list of ints >= 1", self.eval_loops)
        self.need(bool(self.eval_tasks), _join(path, "eval_tasks"), "must name at least one task")
        self.need(self.request_loops >= 1, _join(path, "request_loops"), "must be >= 1", self.request_loops)


@dataclass
class PipelineSummary:
    root: Path
    tracking_uri: str
    stages: dict[str, float]
    """Wall seconds per stage."""
    pretrain_run_id: str | None
    sweep_run_id: str | None
    eval_run_id: str | None
    champion: dict[str, Any]
    loops_table: str
    url: str
    request: dict[str, Any]
    completion: dict[str, Any]


def _stage_configs(cfg: PipelineConfig, root: Path):
    """Validate every stage's config before any Ray work (a bad key fails here, naming it)."""
    from .config import PretrainConfig, load_config
    from .serve.config import ServeConfig
    from .tune.config import load_sweep_config

    pre = load_config(cfg.pretrain_config, [*cfg.pretrain_overrides, f"run.root={root}", "run.name=pipeline-pretrain",
                                            "tracking.experiment=mythos-pretrain"], cls=PretrainConfig)
    swp = load_sweep_config(cfg.sweep_config, [*cfg.sweep_overrides, f"root={root}"]) if cfg.sweep else None
    srv = load_config(cfg.serve_config, [*cfg.serve_overrides, f"model.source=models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"],
                      cls=ServeConfig)
    return pre, swp, srv


def run_pipeline(cfg: PipelineConfig) -> PipelineSummary:
    from evals.loop_sweep import SweepConfig as EvalConfig
    from evals.loop_sweep import run_sweep as run_eval

    from .ray_env import init_ray
    from .serve.deploy import deploy
    from .train import run_pretrain
    from .tune.sweep import run_sweep

    root = Path(cfg.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root}/mlflow.db"
    pre_cfg, sweep_cfg, serve_cfg = _stage_configs(cfg, root)
    serve_cfg = serve_cfg.replace(model={**serve_cfg.model.to_dict(), "tracking_uri": uri})
    stages: dict[str, float] = {}

    def stage(name: str) -> float:
        print(f"\n[mythos pipeline] ===== {name} =====", flush=True)
        return time.perf_counter()

    t = stage("1/5 pretrain")
    init_ray()
    pre = run_pretrain(pre_cfg)
    val = pre.metrics.get("val_loss", pre.metrics.get("loss"))
    reg = register_model(uri, pre.mlflow_run_id, metric=float(val)) if pre.mlflow_run_id else None
    stages["pretrain"] = time.perf_counter() - t

    sweep_run = None
    if sweep_cfg is not None:
        t = stage("2/5 sweep")
        sres = run_sweep(sweep_cfg)
        sweep_run = sres.parent_run_id
        reg = sres.registration or reg
        stages["sweep"] = time.perf_counter() - t

    t = stage("3/5 evaluate the champion at several loop counts")
    ecfg = EvalConfig(model=f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}", loops=list(cfg.eval_loops),
                      tasks=list(cfg.eval_tasks), limit=cfg.eval_limit, exit_thresholds=list(cfg.eval_exit_thresholds),
                      run_root=str(root), tracking_uri=uri, run_name="pipeline-eval")
    eres = run_eval(ecfg)
    stages["evaluate"] = time.perf_counter() - t

    t = stage("4/5 deploy the champion")
    url = deploy(serve_cfg)
    stages["deploy"] = time.perf_counter() - t

    t = stage("5/5 one real request")
    request = {"model": serve_cfg.model.served_name or DEFAULT_MODEL_NAME, "prompt": cfg.prompt,
               "max_tokens": cfg.request_max_tokens, "temperature": 0.0, "n_loops": cfg.request_loops}
    headers = {}
    key_env = serve_cfg.http.api_key_env
    if key_env and os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()
    request["model"] = models["data"][0]["id"]
    resp = httpx.post(f"{url}/v1/completions", json=request, headers=headers, timeout=120)
    resp.raise_for_status()
    stages["request"] = time.perf_counter() - t
    champion = {}
    if reg is not None:
        champion = {"name": reg.name, "version": reg.champion_version, "alias": reg.alias,
                    "val_loss": reg.champion_metric}
    return PipelineSummary(root, uri, stages, pre.mlflow_run_id, sweep_run, eres.run_id, champion, eres.table_md,
                           url, request, resp.json())


def print_summary(s: PipelineSummary) -> None:
    c = s.completion
    text = c["choices"][0]["text"]
    print("\n[mythos pipeline] ===== summary =====")
    print("stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in s.stages.items()) +
          f" (total {sum(s.stages.values()) / 60:.1f} min)")
    print(f"MLflow store: {s.tracking_uri}")
    print(f"  pretrain run {s.pretrain_run_id} | sweep parent run {s.sweep_run_id} | evaluation run {s.eval_run_id}")
    if s.champion:
        print(f"  winner: models:/{s.champion['name']}@{s.champion['alias']} = version {s.champion['version']} "
              f"(val_loss {s.champion['val_loss']:.4f})")
    print("\naccuracy vs loops (the champion):\n" + s.loops_table)
    print(f"sample completion ({s.request['n_loops']} loops, used {c.get('mythos', {}).get('loops_used')}): "
          f"{s.request['prompt']!r} -> {text!r}")
    if s.tracking_uri.startswith("sqlite:"):
        print(f"\nopen MLflow:    mlflow ui --backend-store-uri {s.tracking_uri} --host 127.0.0.1 --port 5000")
    print(f"query the API:  curl {s.url}/v1/completions -H 'Content-Type: application/json' "
          f"-d '{{\"model\": \"{s.request['model']}\", \"prompt\": \"ab ba b>=\", \"max_tokens\": 4, \"n_loops\": 16}}'")
