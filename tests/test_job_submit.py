"""`ray job submit` of jobs/pretrain.py against a local head started by cluster/start_head.sh."""

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def head():
    env = {**os.environ, "NUM_CPUS": "2", "GCS_PORT": "6391", "DASHBOARD_PORT": "8271",
           "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "cluster/start_head.sh", "--print-env"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=240, check=True)
    for line in out.stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    yield env
    subprocess.run(["bash", "cluster/stop_head.sh"], cwd=ROOT, env=env, capture_output=True, timeout=120)


def test_ray_job_submit_runs_pretrain(head, tmp_path):
    assert head["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:8271" and head["RAY_AUTH_MODE"] == "token"
    cmd = ["ray", "job", "submit", "--working-dir", ".", "--", "python", "jobs/pretrain.py",
           "--config", "jobs/configs/debug.yaml", "--set", "train.steps=6", "--set", "train.warmup_steps=2",
           "--set", "train.log_every=3", "--set", "train.eval_every=6", "--set", "checkpoint.every_steps=6",
           "--set", "data.n_docs=600", "--set", "data.seq_len=64", "--set", f"run.root={tmp_path}"]
    out = subprocess.run(cmd, cwd=ROOT, env=head, capture_output=True, text=True, timeout=400)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "succeeded" in log and "[mythos] step     6/6" in log and "[mythos] done." in log
    assert (tmp_path / "export" / "debug" / "model.safetensors").exists()
    assert (tmp_path / "mlflow.db").exists()
