"""The MLflow UI of a run root's store, served on 127.0.0.1 and read by headless Chromium.

Used by the interrupt chain (its demo's evaluation run must show the accuracy-versus-loops plot
where a trainer looks) and by `python tests/mlflow_ui.py ROOT OUT.png` for the README screenshot.
Chromium is Debian's package (`make test` installs it); it runs with the flags this closed network
needs (no background networking, no component updates) and a fresh profile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from ports import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


@contextlib.contextmanager
def mlflow_ui(store: Path, timeout: float = 90.0) -> Iterator[str]:
    """`mlflow server` on the SQLite store at `store` (a run root's mlflow.db) -> its base URL."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", f"sqlite:///{store}",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with tempfile.TemporaryFile() as log:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlflow server did not start: {log.read().decode()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:  # the CLI and the uvicorn server it starts: the whole process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def artifact_page(url: str, experiment_id: str, run_id: str, path: str) -> str:
    """The UI page of one artifact of a run (the run's Artifacts tab, the file opened), in the UI's
    model-training view (a fresh browser profile would start in its GenAI view)."""
    return f"{url}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?workflowType=machine_learning"


def chromium(page: str, *args: str, budget_ms: int = 20_000, timeout: float = 120.0) -> str:
    """Run headless Chromium on `page` with `args` (e.g. --dump-dom) after letting its scripts run for
    `budget_ms` of virtual time -> stdout."""
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
                              *args, page], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"chromium failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout


def screenshot(page: str, png: Path, size: str = "1400,900") -> Path:
    chromium(page, f"--screenshot={png}", f"--window-size={size}")
    return png


def main(argv: list[str]) -> int:
    """python tests/mlflow_ui.py RUN_ROOT OUT.png [RUN_NAME]: screenshot of that evaluation run's plot."""
    from mlflow.tracking import MlflowClient

    root, png = Path(argv[0]).resolve(), Path(argv[1]).resolve()
    name = argv[2] if len(argv) > 2 else "pipeline-eval"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"])[0]
    with mlflow_ui(root / "mlflow.db") as url:
        screenshot(artifact_page(url, run.info.experiment_id, run.info.run_id, "results/accuracy_vs_loops.png"), png)
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
