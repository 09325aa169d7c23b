"""One Ctrl-C stops `mythos pipeline` cleanly in every stage, and the same command goes on from there.

The pipeline runs as a user runs it: the `mythos` command in its own process group (its own Ray
cluster, as `make demo` starts one), and Ctrl-C is what a terminal sends, SIGINT to the whole
group. One run root is interrupted stage after stage: in pretraining (the looped model and its
baseline side by side), in the sweep, in the evaluation, while deploying, and while serving. Each
launch must exit at the first Ctrl-C (130, or 0 once the endpoint was up as asked), say what
stopped, mark what it was doing KILLED in MLflow and leave no process behind; each relaunch goes
on from what the earlier ones finished.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.slow]

# the demo's pipeline, shrunk: every stage runs, in seconds
TINY = """
extends: {root}/jobs/configs/pipeline-debug.yaml
eval_loops: [2]
eval_max_hops: 2
eval_limit: 4
question_hops: 2
question_loops: [2]
pretrain:
  scaling: {{num_workers: 1, cpus_per_worker: 0.5}}
  train: {{steps: 60, warmup_steps: 2, log_every: 2, eval_every: 30, val_batches: 1, batch_size: 8}}
  checkpoint: {{every_steps: 10}}
  data: {{n_docs: 1000, val_docs: 16, val_blocks: 16, val_hops: 4}}
baseline:
  scaling: {{num_workers: 1, cpus_per_worker: 0.5}}
  train: {{steps: 4, warmup_steps: 1, log_every: 2, eval_every: 4, val_batches: 1, batch_size: 8}}
  checkpoint: {{every_steps: 2}}
  data: {{n_docs: 400, val_docs: 16, val_blocks: 16, val_hops: 4}}
sweep:
  name: tiny-sweep
  asha: {{enabled: false}}
  space: {{data.label_loops: [4], model.overrides.lora_rank: [2]}}
  base:
    train: {{steps: 12, warmup_steps: 1, log_every: 2, eval_every: 12, val_batches: 1, batch_size: 8}}
    checkpoint: {{every_steps: 10}}
    data: {{n_docs: 400, val_docs: 16, val_blocks: 16, val_hops: 4}}
"""


@dataclass
class Launch:
    rc: int
    output: str
    left: list[str]
    """Command lines of the job's processes still alive 20 s after it exited."""
    seconds: float
    """From Ctrl-C to the exit."""


def _descendants(pid: int) -> set[int]:
    import psutil  # Ray's bundled copy

    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> list[str]:
    import psutil

    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline()[:3]))
        except psutil.NoSuchProcess:
            pass
    return out


def ctrl_c(config: Path, root: Path, port: int, until: str, after_s: float = 0.0) -> Launch:
    """Launch `mythos pipeline`, wait for a line matching `until`, then `after_s`; press Ctrl-C."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)

    cmd = [sys.executable, "-m", "mythos_platform.cli", "pipeline", "--config", str(config), "--set", f"root={root}",
           "--set", f"serve.http.port={port}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}  # every progress line, as printed
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(until, line):
            break
    else:
        proc.wait()
        raise AssertionError(f"the pipeline ended before {until!r}:\n" + "".join(lines)[-6000:])
    time.sleep(after_s)
    pids = _descendants(proc.pid)
    t = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    try:
        rest, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rest, _ = proc.communicate()
        raise AssertionError("one Ctrl-C did not stop the pipeline within 90 s:\n" + ("".join(lines) + rest)[-6000:])
    seconds = time.monotonic() - t
    deadline = time.monotonic() + 20
    while _alive(pids | _descendants(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    print(f"Ctrl-C on {until!r}: {t - started:.0f} s after the launch; exit {proc.returncode} {seconds:.1f} s later")
    return Launch(proc.returncode, "".join(lines) + rest, _alive(pids), seconds)


def runs_by_status(root: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments()]
    newest_last = client.search_runs(exps, order_by=["attributes.start_time ASC"])
    return {r.info.run_name: r.info.status for r in newest_last}  # of runs with one name, the newest


def run_count(root: Path, name: str) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exps = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(exps, f"attributes.run_name = '{name}'"))


def registry(root: Path) -> list:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    return MlflowClient(uri, registry_uri=uri).search_model_versions("name='mythos-rdt'")


def test_one_ctrl_c_stops_the_pipeline_in_every_stage_and_the_same_command_goes_on(tmp_path, free_port):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(root=ROOT))
    root, port = tmp_path / "run", free_port()
    stopped = "[mythos] interrupted: the pipeline stopped in stage "

    def check(launch: Launch, stage: str) -> None:
        assert launch.rc == 130, (stage, launch.rc, launch.output[-4000:])
        assert stopped + stage in launch.output, launch.output[-4000:]
        assert "the same command goes on from there" in launch.output
        assert launch.left == [], (stage, launch.left)
        assert "Traceback" not in launch.output.split(stopped)[-1]  # the message, not a stack

    # 1. pretraining (looped model and baseline side by side): both MLflow runs KILLED
    # well before the last step: steps take ~0.1 s and progress lines reach the driver late, so a
    # press at step 12 of 20 could land after the run's final checkpoint
    launch = ctrl_c(config, root, port, r"\[mythos\] step +12/60")
    check(launch, "1/5 (pretrain")
    assert "training runs 'pipeline-pretrain', 'pipeline-baseline' stopped" in launch.output
    assert runs_by_status(root)["pipeline-pretrain"] == "KILLED"

    # 2. the sweep: pretraining resumes from its checkpoint and finishes first
    launch = ctrl_c(config, root, port, r"\[mythos\] step +4/12", after_s=1)
    check(launch, "2/5 (sweep")
    assert re.search(r"resumed from checkpoint at step (\d+)", launch.output) or "resuming" in launch.output
    assert runs_by_status(root)["pipeline-pretrain"] == "FINISHED"
    assert run_count(root, "pipeline-pretrain") == 1  # the same MLflow run, continued
    assert "sweep 'tiny-sweep' was interrupted with 1 of 1 trials unfinished; nothing was registered" in launch.output
    assert runs_by_status(root)["tiny-sweep"] == "KILLED"  # the sweep's parent run
    assert [int(v.version) for v in registry(root)] == [1]  # the pretrained model only: the sweep promoted nothing

    # 3. the evaluation: the finished pretraining is not run again; the sweep's trial resumes and ends
    launch = ctrl_c(config, root, port, r"evaluating .* on \d+ task", after_s=1)
    check(launch, "3/5 (evaluate")
    assert "training run 'pipeline-pretrain' finished earlier with this config" in launch.output
    assert runs_by_status(root)["pipeline-eval"] == "KILLED"

    # 4. deploying: no Serve application is left behind (and no process: checked above)
    launch = ctrl_c(config, root, port, r"===== 4/5 deploy")
    check(launch, "4/5 (deploy")

    # 5. serving, as asked (keep_serving): the endpoint stops and the job ends well
    launch = ctrl_c(config, root, port, r"n_loops=2 +-> ")  # the served answer, the summary's last line
    assert launch.rc == 0, launch.output[-4000:]
    assert "[mythos pipeline] endpoint stopped." in launch.output and launch.left == []
    assert "press Ctrl-C (or `ray job stop <id>`) to stop it" in launch.output
    assert len(registry(root)) == 2  # the resumed sweep finished and its best trial was registered
    assert runs_by_status(root)["pipeline-eval"] == "FINISHED"
