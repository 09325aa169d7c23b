"""Checks of a valid config against this machine (mythos_platform/preflight.py): a bad run root,
missing files or too little data stop the job before Ray starts, naming the key."""

from pathlib import Path

import pytest

from mythos_platform.cli import main
from mythos_platform.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def cfg(tmp_path, *sets, config="jobs/configs/debug.yaml"):
    return load_config(ROOT / config, [f"run.root={tmp_path / 'runs'}", *sets])


@pytest.mark.parametrize("sets, key, words", [
    (["run.root=/proc/mythos/runs"], "run.root", "cannot write there"),
    (["data.source=local", "data.paths=[{tmp}/none/*.txt]"], "data.paths[0]", "no file matches"),
    (["data.tokenizer={tmp}/tokenizer.json"], "data.tokenizer", "no such tokenizer file"),
    (["data.n_docs=1"], "data.n_docs", "makes 0 rows, fewer than one batch per worker (train.batch_size=8 x 2"),
    (["data.num_blocks=3"], "data.num_blocks", "makes 3 rows"),
])
def test_what_the_machine_cannot_give_is_named(tmp_path, sets, key, words):
    c = cfg(tmp_path, *(s.replace("{tmp}", str(tmp_path)) for s in sets))
    with pytest.raises(ConfigError) as err:
        c.preflight()
    assert err.value.path == key and words in str(err.value)


def test_run_root_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    for root, words in ((tmp_path / "f", "is a file, not a folder"), (tmp_path / "f" / "sub", "Not a directory")):
        with pytest.raises(ConfigError) as err:
            load_config(ROOT / "jobs/configs/debug.yaml", [f"run.root={root}"]).preflight()
        assert err.value.path == "run.root" and words in str(err.value)


def test_reasoning_rows_are_counted_exactly_and_shipped_configs_pass(tmp_path):
    c = cfg(tmp_path, "data.n_docs=31", "train.batch_size=16", "scaling.num_workers=2",
            config="jobs/configs/reasoning.yaml")
    with pytest.raises(ConfigError, match="makes 31 rows"):
        c.preflight()
    cfg(tmp_path, "data.n_docs=32", "train.batch_size=16", "scaling.num_workers=2",
        config="jobs/configs/reasoning.yaml").preflight()  # exactly one batch per worker is enough
    cfg(tmp_path).preflight()
    assert (tmp_path / "runs").is_dir()  # created, as the job would


def test_jobs_preflight_their_stages_before_ray(tmp_path, capsys):
    assert main(["pipeline", "--set", f"root={tmp_path}", "--set", "sweep.base.data.n_docs=2"]) == 2
    assert "error: sweep.base.data.n_docs: got 2; the training data makes 2 rows" in capsys.readouterr().err
    assert main(["depth", "--set", f"root={tmp_path}", "--set", "baseline.data.n_docs=2"]) == 2
    assert "error: baseline.data.n_docs: got 2" in capsys.readouterr().err
    assert main(["pretrain", "--set", "train.lr=.inf"]) == 2
    assert "error: train.lr: got inf; must be a finite number" in capsys.readouterr().err
