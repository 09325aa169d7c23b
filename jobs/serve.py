"""Serve a Mythos model behind an OpenAI-style completions API (Ray Serve).

    python jobs/serve.py --model runs/debug/export/debug [--config jobs/configs/serve-debug.yaml] [--set ...]
    python jobs/serve.py --model models:/mythos-rdt@champion --set model.tracking_uri=sqlite:///runs/debug/mlflow.db
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/serve.py --model <folder|models:/...> --detach

Starts a local Ray (bound to 127.0.0.1) when none is running; under `ray job submit` (or with
RAY_ADDRESS set) it deploys to that cluster. Prints the URL and an example request once the app
answers /health, then keeps running until Ctrl-C (which removes the app), or with --detach
returns and leaves the app running on the cluster: stop it with `serve shutdown -y` (or
`serve delete mythos`) against the cluster, or by stopping the cluster.

Listens on 127.0.0.1 unless http.host says otherwise. Set the environment variable named by
http.api_key_env (MYTHOS_API_KEY) to require `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `ray job submit`

from mythos_platform.config import ConfigError, load_config  # noqa: E402
from mythos_platform.serve.config import ServeConfig  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or MLflow URI (models:/mythos-rdt@champion); sets model.source")
    ap.add_argument("--config", default="jobs/configs/serve-debug.yaml", help="YAML serve config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set limits.max_tokens=64 (repeatable)")
    ap.add_argument("--detach", action="store_true", help="return once healthy, leaving the app on the cluster")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app to become healthy")
    return ap.parse_args(argv)


def example(url: str, model_id: str, key_env: str | None) -> str:
    auth = f' -H "Authorization: Bearer ${key_env}"' if key_env and os.environ.get(key_env) else ""
    key = f'os.environ["{key_env}"]' if auth else '"none"'
    return (
        f"  curl -s {url}/v1/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{model_id}\", \"prompt\": \"Q: \", \"max_tokens\": 32, \"temperature\": 0, "
        f"\"n_loops\": 8}}'\n\n"
        f"  from openai import OpenAI\n"
        f"  client = OpenAI(base_url=\"{url}/v1\", api_key={key})\n"
        f"  client.completions.create(model=\"{model_id}\", prompt=\"Q: \", max_tokens=32, "
        f"extra_body={{\"n_loops\": 8}})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"model.source={args.model}")
    try:
        cfg = load_config(args.config, overrides, cls=ServeConfig)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # fail fast here rather than in replicas that retry; a local folder is passed on as an absolute path
    from mythos_platform.registry import ModelNotFoundError, resolve_model

    tracking = cfg.model.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    try:
        folder = resolve_model(cfg.model.source, tracking_uri=tracking)
    except (ModelNotFoundError, ValueError) as exc:
        print(f"error: model.source: {exc}", file=sys.stderr)
        return 2
    sets: dict = {"tracking_uri": tracking}
    if not cfg.model.source.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        sets["source"] = str(folder.resolve())
    if not cfg.model.served_name:
        sets["served_name"] = cfg.model.model_id()
    cfg = cfg.replace(model=cfg.model.replace(**sets).to_dict())

    from ray import serve

    from mythos_platform.ray_env import init_ray
    from mythos_platform.serve.deploy import deploy

    init_ray()
    url = deploy(cfg, timeout_s=args.timeout)
    print(f"\nServing {cfg.model.served_name!r} ({cfg.model.source}) at {url}\n")
    print(example(url, cfg.model.served_name, cfg.http.api_key_env), flush=True)
    if args.detach:
        print(f"\nDetached: the app stays on the cluster. Stop it with `serve delete {cfg.deployment.app_name}` "
              "or `serve shutdown -y` (RAY_AUTH_MODE=token for a cluster with token auth).")
        return 0
    print("\nCtrl-C to stop.", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored there)
    signal.signal(signal.SIGTERM, stop)  # `ray job stop`, kill
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping ...")
        serve.delete(cfg.deployment.app_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
