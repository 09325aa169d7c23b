"""cluster/ files parse, and everything they name exists in the repo."""

import importlib
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


def yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.mark.parametrize("name", ["launcher-gpu.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml",
                                  "kuberay/rayservice.yaml"])
def test_yaml_parses(name):
    docs = yaml_docs(CLUSTER / name)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_kuberay_kinds_and_serve_import_path():
    kinds = {yaml_docs(p)[0]["kind"] for p in (CLUSTER / "kuberay").glob("*.yaml")}
    assert kinds == {"RayCluster", "RayJob", "RayService"}
    service = yaml_docs(CLUSTER / "kuberay/rayservice.yaml")[0]
    serve_cfg = yaml.safe_load(service["spec"]["serveConfigV2"])
    module, attr = serve_cfg["applications"][0]["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    from mythos_platform.serve.config import ServeConfig

    ServeConfig.from_dict(serve_cfg["applications"][0]["args"])  # the args validate


def test_launcher_shapes_the_cluster():
    cfg = yaml_docs(CLUSTER / "launcher-gpu.yaml")[0]
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert any("p4d" in t["node_config"]["InstanceType"] for t in cfg["available_node_types"].values())
    assert "constraints.txt" in " ".join(cfg["setup_commands"])


def test_scripts_are_valid_bash():
    for script in CLUSTER.glob("*.sh"):
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_every_referenced_file_exists():
    texts = {p: p.read_text() for p in CLUSTER.rglob("*") if p.is_file()}
    referenced = set()
    for text in texts.values():
        referenced |= set(re.findall(r"\b((?:jobs|cluster)/[\w./-]+\.(?:py|yaml|sh))\b", text))
    assert referenced, "expected the cluster files to name jobs and configs"
    missing = sorted(r for r in referenced if not (ROOT / r).exists())
    assert missing == []


def test_dockerfile_copies_what_exists_and_pins_torch():
    text = (CLUSTER / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src
    assert "torch==2.13.0" in text and "constraints.txt" in text
