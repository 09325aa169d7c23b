"""The MLflow Model Registry: register an exported model, move the champion alias.

A model is referred to by a local folder (config.json + model.safetensors) or an MLflow URI:
`models:/<name>@<alias>` (the registry; the sweep registers its winner as
`models:/mythos-rdt@champion`), `models:/<name>/<version>`, or `runs:/<run_id>/model`.
`resolve_model` (from `mythos.model_ref`, re-exported here) turns any of them into a local folder
that `mythos` loads; it lives in the model package so that the lm-eval adapter (`evals`) can use
it without depending on the platform.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mythos.model_ref import MLFLOW_SCHEMES, ModelNotFoundError, resolve_model

log = logging.getLogger("mythos")

DEFAULT_MODEL_NAME = "mythos-rdt"
DEFAULT_ALIAS = "champion"

__all__ = ["DEFAULT_ALIAS", "DEFAULT_MODEL_NAME", "MLFLOW_SCHEMES", "ModelNotFoundError", "Registration",
           "register_model", "resolve_model", "version_params"]


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
    """Register the run's exported model as a new version (or find the version this run already
    has: a relaunched pipeline does not add versions); move `alias` to it only if its metric beats
    the version the alias points at now."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Mythos Recurrent-Depth Transformers")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    earlier = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = earlier[0] if earlier else client.create_model_version(
        name, source=source, run_id=run_id, tags={metric_name: str(metric), "metric_name": metric_name})
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


def version_params(tracking_uri: str, version: str, name: str = DEFAULT_MODEL_NAME) -> dict[str, str]:
    """The training parameters (the flattened job config) of the run that made model `version`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    return dict(client.get_run(client.get_model_version(name, version).run_id).data.params)
