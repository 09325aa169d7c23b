"""Model references shared by evaluation and serving, and the MLflow Model Registry.

A model is referred to by a local folder (config.json + model.safetensors) or an MLflow URI:
`models:/<name>@<alias>` (the registry; the sweep registers its winner as
`models:/mythos-rdt@champion`), `models:/<name>/<version>`, or `runs:/<run_id>/model`.
`resolve_model` turns any of them into a local folder that `mythos` loads.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("mythos")

DEFAULT_MODEL_NAME = "mythos-rdt"
DEFAULT_ALIAS = "champion"
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ModelNotFoundError(FileNotFoundError):
    """The model reference does not lead to a Mythos model folder."""


def _check_folder(path: Path, spec: str) -> Path:
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise ModelNotFoundError(
            f"model {spec!r}: {path} is not a Mythos model folder (needs config.json and model.safetensors)")
    return path


def _registry_source(spec: str, tracking_uri: str | None) -> str:
    """models:/name@alias or models:/name/version -> the registered version's artifact source."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    ref = spec[len("models:/"):].strip("/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return client.get_model_version_by_alias(name, alias).source
    name, _, version = ref.partition("/")
    if not version:
        raise ValueError("expected models:/<name>@<alias> or models:/<name>/<version>")
    return client.get_model_version(name, version).source


def resolve_model(spec: str, tracking_uri: str | None = None, dst: str | os.PathLike | None = None) -> Path:
    """A local folder for `spec` (a folder path or an MLflow models:/ or runs:/ URI)."""
    if spec.startswith(MLFLOW_SCHEMES):
        import mlflow

        target = Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="mythos-model-"))
        target.mkdir(parents=True, exist_ok=True)
        try:
            uri = _registry_source(spec, tracking_uri) if spec.startswith("models:/") else spec
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target),
                                                        tracking_uri=tracking_uri)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelNotFoundError(
                f"model {spec!r} could not be resolved in MLflow at {tracking_uri or mlflow.get_tracking_uri()}: "
                f"{first}") from exc
        return _check_folder(Path(local), spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model {spec!r}: no such folder (give a model folder or a models:/name@alias URI)")
    return _check_folder(path, spec)


@dataclass
class Registration:
    name: str
    version: str
    alias: str
    alias_moved: bool
    """False when the alias already pointed at a version with a better metric."""
    champion_version: str
    champion_metric: float


def register_model(
    tracking_uri: str,
    run_id: str,
    metric: float,
    metric_name: str = "val_loss",
    artifact_path: str = "model",
    name: str = DEFAULT_MODEL_NAME,
    alias: str = DEFAULT_ALIAS,
    lower_is_better: bool = True,
) -> Registration:
    """Register the run's exported model as a new version; move `alias` to it only if its
    metric beats the version the alias points at now."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Mythos Recurrent-Depth Transformers")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={metric_name: str(metric), "metric_name": metric_name})
    try:
        current = client.get_model_version_by_alias(name, alias)
        current_metric = float(current.tags.get(metric_name, "nan"))
    except MlflowException:
        current, current_metric = None, float("nan")
    better = current is None or current_metric != current_metric or (
        metric < current_metric if lower_is_better else metric > current_metric)
    if better:
        client.set_registered_model_alias(name, alias, version.version)
        champion, champion_metric = version.version, metric
    else:
        champion, champion_metric = current.version, current_metric
        log.info("registered %s v%s (%s=%.4f); alias %r stays on v%s (%.4f)", name, version.version, metric_name,
                 metric, alias, champion, champion_metric)
    return Registration(name, str(version.version), alias, better, str(champion), champion_metric)
