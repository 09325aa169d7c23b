"""Model references: a local folder (config.json + model.safetensors) or an MLflow URI.

`models:/<name>@<alias>` (the registry; the sweep registers its winner as
`models:/mythos-rdt@champion`), `models:/<name>/<version>`, or `runs:/<run_id>/model`.
`resolve_model` turns any of them into a local folder that `mythos.checkpoint.load_pretrained`
loads. MLflow is imported only for an MLflow URI. The evaluation adapter (`evals`) and the
platform (serving, the evaluation job, the registry) share it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")

__all__ = ["MLFLOW_SCHEMES", "ModelNotFoundError", "resolve_model"]


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
