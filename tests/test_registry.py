import pytest
from mlflow.tracking import MlflowClient

from mythos import Mythos, get_variant
from mythos.checkpoint import save_pretrained
from mythos_platform.registry import ModelNotFoundError, register_model, resolve_model


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("t", artifact_location=str(tmp_path / "art"))
    runs = []
    for i in range(3):
        run = client.create_run(exp)
        folder = tmp_path / f"m{i}"
        save_pretrained(Mythos(get_variant("debug")), folder)
        client.log_artifacts(run.info.run_id, str(folder), "model")
        runs.append(run.info.run_id)
    return uri, runs


def test_alias_moves_only_to_a_better_model(store, tmp_path):
    uri, runs = store
    first = register_model(uri, runs[0], metric=2.0)
    assert first.alias_moved and first.champion_version == "1"
    worse = register_model(uri, runs[1], metric=2.5)
    assert not worse.alias_moved and worse.version == "2" and worse.champion_version == "1"
    better = register_model(uri, runs[2], metric=1.5)
    assert better.alias_moved and better.champion_version == "3"
    folder = resolve_model("models:/mythos-rdt@champion", tracking_uri=uri, dst=tmp_path / "dl")
    assert (folder / "model.safetensors").exists()
    assert MlflowClient(uri).get_model_version_by_alias("mythos-rdt", "champion").run_id == runs[2]
    # registering a run again (a relaunched pipeline) finds its version instead of adding one
    again = register_model(uri, runs[1], metric=2.5)
    assert again.version == "2" and not again.alias_moved and again.champion_version == "3"
    assert len(MlflowClient(uri).search_model_versions("name='mythos-rdt'")) == 3


def test_bad_references_fail_clearly(store, tmp_path):
    uri, _ = store
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="not a Mythos model folder"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="could not be resolved in MLflow"):
        resolve_model("models:/unknown-model@champion", tracking_uri=uri)
