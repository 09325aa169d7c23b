"""The `mythos` command and the thin scripts in jobs/: one parser, `--config` + `--set` for every
job, errors naming the key with exit code 2 before any Ray work."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mythos_platform.cli import JOBS, main, parser

ROOT = Path(__file__).resolve().parents[1]


def test_every_job_has_a_script_a_shipped_config_and_a_command():
    assert set(JOBS) == {"pretrain", "sweep", "evaluate", "serve", "pipeline", "depth", "plan"}
    for name, job in JOBS.items():
        assert (ROOT / "jobs" / f"{name}.py").is_file()
        assert (ROOT / job.default_config).is_file() if name != "plan" else job.default_config is None
        assert f'run_job("{name}")' in (ROOT / "jobs" / f"{name}.py").read_text()


@pytest.mark.parametrize("name", sorted(JOBS))
def test_each_job_loads_its_shipped_config(name, capsys):
    from mythos_platform.cli import _load
    from mythos_platform.config import load_config

    cfg = load_config(JOBS[name].default_config, [], cls=_load(JOBS[name].config_class))
    assert cfg.to_dict()  # validated, typed


def test_bad_key_is_named_with_exit_code_2(capsys):
    assert main(["pretrain", "--set", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: train.lrr: unknown key (did you mean 'lr'?)")
    assert main(["pipeline", "--set", "sweep.base.train.lr=-1"]) == 2
    assert capsys.readouterr().err.startswith("error: sweep.base.train.lr: got -1.0; must be > 0")
    assert main(["depth", "--config", "jobs/configs/nope.yaml"]) == 2
    assert "config file 'jobs/configs/nope.yaml' does not exist" in capsys.readouterr().err


def test_shorthand_flags_are_sets_in_command_line_order():
    args = parser().parse_args(["serve", "--set", "model.source=a", "--model", "models:/m@champion",
                                "--set", "http.port=9000"])
    assert args.overrides == ["model.source=a", 'model.source="models:/m@champion"', "http.port=9000"]
    args = parser().parse_args(["evaluate", "--tasks", "pointer_k1,pointer_k2", "--model", "on"])
    assert args.overrides == ['tasks=["pointer_k1", "pointer_k2"]', 'model="on"']  # 'on' stays a name


def test_console_script_and_job_script_are_the_same_command(tmp_path):
    mythos = Path(sys.executable).with_name("mythos")
    assert mythos.is_file(), "the console script is installed with the package (pyproject [project.scripts])"
    out = subprocess.run([str(mythos), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(name in out for name in JOBS)
    # the script runs from any directory (as `ray job submit` runs it from a copy of the repo)
    for cmd in ([str(mythos), "sweep"], [sys.executable, str(ROOT / "jobs/sweep.py")]):
        res = subprocess.run([*cmd, "--set", "search.algorithm=bayes"], capture_output=True, text=True,
                             cwd=tmp_path)
        assert res.returncode == 2, res.stderr
        assert "error: search.algorithm: got 'bayes'; allowed: 'grid', 'random', 'optuna'" in res.stderr
        assert "Traceback" not in res.stderr and "Started a local Ray instance" not in res.stderr


def _documented_commands() -> list[tuple[str, str, str]]:
    """(file, job, arguments) of every job command line in the README, docs/ and the shipped configs'
    comments: `mythos <job> ...` or `python jobs/<job>.py ...`, continuation lines joined, optional
    `[...]` parts dropped; lines with placeholders (`<folder>`, `...`, `$VAR`) are left out."""
    import re

    pattern = re.compile(r"(?:\bmythos |python jobs/)(pretrain|sweep|evaluate|serve|pipeline|depth)(?:\.py)?\s(.*)")
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                 *sorted((ROOT / "jobs" / "configs").rglob("*.yaml"))]:
        text = re.sub(r"\\\n\s*#?\s*", " ", path.read_text())
        for line in text.splitlines():
            match = pattern.search(line)
            if not match:
                continue
            job, rest = match.groups()
            rest = re.split(r"[`|]|\s#", rest)[0]
            rest = re.sub(r"\[--[^\]]*\]", "", rest)
            if "--help" in rest or (rest.strip() and not rest.lstrip().startswith("--")):
                continue  # prose that names a job ("mythos serve / the demo's")
            if not any(ch in rest for ch in "<$") and "..." not in rest:
                found.append((str(path.relative_to(ROOT)), job, rest))
    return found


def test_every_documented_command_line_parses_and_its_config_validates():
    """What a user copies from the docs must at least get past the config check: every documented
    job command's --config and --set keys and values validate (no Ray, nothing runs). A model folder
    that an earlier documented step writes (under runs/) may be missing here, and only that."""
    import shlex

    from mythos_platform.cli import _load
    from mythos_platform.config import ConfigError, load_config

    commands = _documented_commands()
    assert len(commands) >= 30, commands
    failed = []
    for where, job, rest in commands:
        args = parser().parse_args([job, *shlex.split(rest)])
        try:
            load_config(args.config or JOBS[job].default_config, args.overrides, cls=_load(JOBS[job].config_class))
        except ConfigError as exc:
            if not ("is not a model folder" in str(exc) and "'runs/" in str(exc)):
                failed.append(f"{where}: {job} {rest.strip()}: {exc}")
    assert failed == []


def test_a_ctrl_c_right_after_press_ctrl_c_is_printed_is_a_stop_not_an_interruption():
    """The pipeline and `mythos serve` arm the stop before printing "press Ctrl-C": a SIGINT (or
    SIGTERM) that lands before the wait begins sets the stop instead of raising KeyboardInterrupt
    (which exited 130 without stopping the endpoint), and the wait then returns at once."""
    import signal

    from mythos_platform.commands import arm_stop, wait_for_stop

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            stop = arm_stop()
            os.kill(os.getpid(), sig)  # in the gap between the printed line and the wait
            assert stop.wait(5), sig
            wait_for_stop(stop)  # returns at once: the stop was not lost
            # afterwards a second Ctrl-C interrupts the shutdown at once
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
