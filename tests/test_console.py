"""The console: this project's lines in the terminal, every library's output in the run's log file."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LIBRARY = '''
import logging, os, sys, warnings

def chatter():
    print("Trial status: 3 RUNNING")                                   # a library's print
    logging.getLogger("fakelib").warning("a library warning through logging")
    warnings.warn("a library deprecation", DeprecationWarning, stacklevel=1)
    os.write(2, b"[2026-11-30 E 1 2] core_worker.cc:2465: from C++ straight to fd 2\\n")
    # what Ray's log monitor forwards from worker processes
    print("\\x1b[36m(RayTrainWorker pid=42)\\x1b[0m [mythos demo-run] step    50/100 | loss 1.000 | 9 tok/s")
    print("\\x1b[36m(RayTrainWorker pid=42)\\x1b[0m Checkpoint successfully created at: /x")
    print("\\x1b[33m(raylet)\\x1b[0m WARNING: 8 PYTHON worker processes have been started")
'''

SCRIPT = '''
import logging, sys, warnings
warnings.simplefilter("always")
sys.path.insert(0, {lib!r})
from mythos_platform.console import progress, route_output
import fakelib

path = route_output({root!r}, "job", verbose={verbose})
print("[mythos] our own line")
fakelib.chatter()
print("\\x1b[36m(RayTrainWorker pid=42)\\x1b[0m [mythos demo-run] step   100/100 | loss 0.500 | 9 tok/s")
progress("evaluation", 1, 2, "[  1/2] loops=1 acc 0.5", "points")
progress("evaluation", 2, 2, "[  2/2] loops=2 acc 0.9", "points")
import builtins
from ray.train.v2._internal.logging.patch_print import redirected_print
builtins.print = redirected_print  # what Ray Train V2 leaves in a driver that ran a trainer
print("[mythos] after Ray Train patched print")
print("our error line", file=sys.stderr)
raise RuntimeError("an uncaught error")
'''


def _script(tmp_path: Path, verbose: bool = False) -> list[str]:
    lib = tmp_path / "lib"
    lib.mkdir(exist_ok=True)
    (lib / "fakelib.py").write_text(textwrap.dedent(LIBRARY))
    code = SCRIPT.format(lib=str(lib), root=str(tmp_path / "run"), verbose=verbose)
    return [sys.executable, "-c", code]


def test_routed_job_shows_its_own_lines_and_logs_everything(tmp_path):
    out = subprocess.run(_script(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "MYTHOS_VERBOSE": ""})
    terminal = out.stdout + out.stderr
    log_file = tmp_path / "run" / "logs" / "job.log"
    assert out.returncode == 1
    assert f"library output (Ray, Tune, MLflow, warnings) goes to {log_file}" in terminal
    shown = [line for line in terminal.splitlines() if line and "goes to" not in line]
    # ours, in order; forwarded project lines lose Ray's prefix; not a TTY: progress stays plain lines
    assert shown[:7] == ["[mythos] our own line", "[mythos demo-run] step    50/100 | loss 1.000 | 9 tok/s",
                         "[mythos demo-run] step   100/100 | loss 0.500 | 9 tok/s",
                         "[  1/2] loops=1 acc 0.5", "[  2/2] loops=2 acc 0.9", "[mythos] after Ray Train patched print",
                         "our error line"]
    assert "RuntimeError: an uncaught error" in terminal  # the interpreter's traceback is shown
    for noise in ("Trial status", "library warning", "DeprecationWarning", "core_worker.cc", "Checkpoint successfully",
                  "(raylet)", "PYTHON worker processes"):
        assert noise not in terminal, noise
    log = log_file.read_text()
    for line in ("[mythos] our own line", "Trial status: 3 RUNNING", "a library warning through logging",
                 "DeprecationWarning: a library deprecation", "core_worker.cc:2465", "Checkpoint successfully created",
                 "(raylet)", "[  2/2] loops=2 acc 0.9", "RuntimeError: an uncaught error"):
        assert line in log, line


def test_verbose_shows_everything_and_writes_no_log(tmp_path):
    out = subprocess.run(_script(tmp_path, verbose=True), cwd=ROOT, capture_output=True, text=True, timeout=60)
    terminal = out.stdout + out.stderr
    assert "Trial status: 3 RUNNING" in terminal and "core_worker.cc:2465" in terminal and "(raylet)" in terminal
    assert "goes to" not in terminal and not (tmp_path / "run" / "logs").exists()


def test_a_terminal_gets_live_progress_bars(tmp_path):
    """On a TTY, step lines and progress calls become tqdm bars (count, ETA) instead of lines."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(_script(tmp_path), cwd=ROOT, stdin=follower, stdout=follower, stderr=follower,
                            env={**os.environ, "TERM": "xterm", "MYTHOS_VERBOSE": "", "COLUMNS": "160"})
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "demo-run" in screen and "100/100 steps" in screen and "loss 0.500" in screen
    assert "evaluation" in screen and "2/2 points" in screen
    assert "[mythos demo-run] step    50/100" not in screen  # a bar, not the line
    assert "[mythos] our own line" in screen and "Trial status" not in screen


DEDUP = "import {module}, ray._private.ray_constants as c; print(c.RAY_DEDUP_LOGS)"


@pytest.mark.parametrize("module", ["mythos_platform.tune.sweep", "mythos_platform.pipeline"])
def test_ray_log_deduplication_is_off_in_every_job_unless_the_user_asks(module):
    """Ray folds lines that differ only in numbers (a sweep's trials: "training run '..._00000'",
    their step lines) into "[repeated Nx]", and a trial's first lines were lost; modules that import
    ray before mythos_platform.ray_env must not turn it back on. A value the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_DEDUP_LOGS"}
    code = DEDUP.format(module=module)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "RAY_DEDUP_LOGS": "1"},
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True"], out.stderr[-2000:]
