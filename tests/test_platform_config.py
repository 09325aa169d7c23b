"""Job config: YAML + CLI overrides, and errors that name the dotted path of the bad key."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import mythos.config
from mythos_platform.config import (
    ConfigError,
    DataConfig,
    PretrainConfig,
    TrainConfig,
    apply_overrides,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "jobs" / "configs"


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str) -> Path:
        p = tmp_path / "job.yaml"
        p.write_text(text)
        return p

    return write


def test_defaults_are_valid_and_typed():
    cfg = load_config()
    assert cfg == PretrainConfig()
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.betas, tuple)
    assert cfg.model.build().dim > 0
    assert cfg.run.root == "./runs"


def test_yaml_then_cli_precedence(yaml_file):
    path = yaml_file(
        "train:\n  lr: 3e-4\n  steps: 50\n  warmup_steps: 5\n"
        "data:\n  seq_len: 64\n"
        "scaling:\n  cpus_per_worker: 0.5\n"
    )
    cfg = load_config(path, ["train.lr=1e-3", "train.betas=[0.8, 0.9]", "model.overrides.n_loops=6"])
    assert cfg.train.lr == pytest.approx(1e-3)  # CLI beats file
    assert cfg.train.steps == 50  # file beats default
    assert cfg.train.warmup_steps == 5
    assert isinstance(cfg.train.lr, float)  # '3e-4' is a string to YAML 1.1; read as a number
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.data.seq_len == 64
    assert cfg.scaling.cpus_per_worker == 0.5  # fractional CPUs allowed
    assert cfg.train.batch_size == TrainConfig().batch_size  # default kept
    assert cfg.model.build().n_loops == 6


def test_flatten_and_round_trip():
    cfg = load_config(None, ["model.overrides.lora_rank=4", "data.paths=[a.txt]", "data.source=local"])
    flat = cfg.flatten()
    assert flat["train.lr"] == 3e-4
    assert flat["model.overrides.lora_rank"] == 4
    assert flat["data.paths"] == ["a.txt"]
    assert all("." in k for k in flat)
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize(
    "override, path, allowed",
    [
        ("foo=1", "foo", "allowed at the top level"),
        ("train.lrr=1", "train.lrr", "did you mean 'lr'"),
        ("scaling.gpus=1", "scaling.gpus", "num_workers"),
        ("model.overrides.dimm=64", "model.overrides.dimm", "did you mean 'dim'"),
    ],
)
def test_unknown_keys_name_the_dotted_path(override, path, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.path == path
    assert path in str(err.value) and allowed in str(err.value)


def test_unknown_nested_key_in_yaml(yaml_file):
    with pytest.raises(ConfigError) as err:
        load_config(yaml_file("data:\n  source: generated\n  sequence_len: 128\n"))
    assert err.value.path == "data.sequence_len"
    assert "seq_len" in str(err.value)


@pytest.mark.parametrize(
    "override, path, allowed",
    [
        ("train.lr=-0.001", "train.lr", "must be > 0"),
        ("train.parallelism=tp", "train.parallelism", "'fsdp', 'ddp'"),
        ("train.mixed_precision=fp8", "train.mixed_precision", "'auto', 'bf16', 'fp32'"),
        ("train.steps=ten", "train.steps", "expected an integer"),
        ("train.betas=[0.9]", "train.betas", "2 items"),
        ("train.min_lr=1.0", "train.min_lr", "lr="),
        ("scaling.cpus_per_worker=0", "scaling.cpus_per_worker", "> 0"),
        ("data.source=s3", "data.source", "'generated', 'local', 'fineweb'"),
        ("data.source=local", "data.paths", "at least one"),
        ("data.seq_len=100000", "data.seq_len", "max_seq_len"),
        ("model.variant=7b", "model.variant", "unknown model variant"),
        ("model.overrides.dim=wide", "model.overrides.dim", "expected an integer"),
        ("model.overrides.n_heads=7", "model.overrides.n_heads", "must divide dim"),
        ("model.overrides.attn_type=rnn", "model.overrides.attn_type", "'gqa', 'mla'"),
        ("train.lr.peak=1", "train.lr", "expected a number"),
    ],
)
def test_bad_values_name_the_path_and_what_is_allowed(override, path, allowed):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert err.value.path == path, str(err.value)
    assert str(err.value).startswith(path) and allowed in str(err.value)
    # one exception class for everything, catchable as the model package's ConfigError too
    assert isinstance(err.value, mythos.config.ConfigError)


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_sections_load_on_their_own():
    data = DataConfig.from_dict({"source": "fineweb", "min_score": 3, "paths": ["x.parquet"]}, "data")
    assert data.min_score == 3.0 and isinstance(data.min_score, float)
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({"lr": 0}, "train")
    assert err.value.path == "train.lr"


def test_data_order_is_fixed_except_for_the_uncapped_hub_stream():
    assert DataConfig().resolved_order == "fixed"  # generated corpus: materialized, same order every launch
    assert DataConfig(source="fineweb").resolved_order == "streaming"  # the hub stream: too large to hold
    assert DataConfig(source="fineweb", num_blocks=1000).resolved_order == "fixed"
    assert DataConfig(source="fineweb", paths=["x.parquet"]).resolved_order == "fixed"
    assert DataConfig(order="streaming").resolved_order == "streaming"
    with pytest.raises(ConfigError, match=r"^data\.order: got 'fixed'; 'fixed' materializes the training set"):
        DataConfig.from_dict({"source": "fineweb", "order": "fixed"}, "data")
    assert load_config(CONFIGS / "fineweb-1b-8gpu.yaml").data.resolved_order == "streaming"


def test_shipped_debug_config():
    cfg = load_config(CONFIGS / "debug.yaml")
    assert cfg.data.source == "generated" and cfg.model.variant == "debug"
    assert cfg.scaling.num_workers == 2 and cfg.scaling.use_gpu is False
    # two workers and data tasks fit on a 2-CPU machine
    assert cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.cpus_per_task <= 2
    assert cfg.model.build().vocab_size >= 259


def test_shipped_gpu_config():
    cfg = load_config(CONFIGS / "fineweb-1b-8gpu.yaml")
    assert cfg.data.source == "fineweb" and cfg.data.fineweb_config == "sample-10BT"
    assert cfg.data.min_score == 3.0 and cfg.data.tokenizer == "gpt2"
    assert cfg.scaling.num_workers == 8 and cfg.scaling.use_gpu
    assert cfg.train.parallelism == "fsdp" and cfg.train.mixed_precision == "bf16"
    model = cfg.model.build()
    assert model.vocab_size >= 50257  # GPT-2's vocabulary
    assert model.max_seq_len >= cfg.data.seq_len
    assert cfg.scaling.worker_resources()["GPU"] == 1.0


def test_extends_composes_files_and_own_keys_win(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  lr: 2.0e-3\n  steps: 40\n  warmup_steps: 4\ndata:\n  seq_len: 64\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {base}\ntrain:\n  steps: 80\n")
    cfg = load_config(child, ["train.batch_size=3"])
    assert (cfg.train.lr, cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len) == (2e-3, 80, 3, 64)
    # a section extends a file too (how the pipeline and the sweep hold stage configs), at any depth
    from mythos_platform.tune import SweepConfig

    sweep = SweepConfig.from_dict({"base": {"extends": str(child), "train": {"steps": 90}},
                                   "space": {"train.lr": [1e-3, 2e-3]}})
    assert sweep.base.train.steps == 90 and sweep.base.train.lr == 2e-3 and sweep.base.data.seq_len == 64
    # errors in an extended file are named by their place in the composed config
    child.write_text(f"extends: {base}\ntrain:\n  stepz: 80\n")
    with pytest.raises(ConfigError) as err:
        SweepConfig.from_dict({"base": {"extends": str(child)}, "space": {"train.lr": [1e-3]}})
    assert err.value.path == "base.train.stepz" and "did you mean 'steps'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"extends={tmp_path / 'nope.yaml'}"])
    assert err.value.path == "extends" and "does not exist" in str(err.value)


def test_updated_sets_dotted_keys_and_validates():
    cfg = PretrainConfig()
    new = cfg.updated({"run.root": "/tmp/x", "train.lr": 1e-3})
    assert (new.run.root, new.train.lr, cfg.run.root) == ("/tmp/x", 1e-3, "./runs")
    with pytest.raises(ConfigError) as err:
        cfg.updated({"train.steps": 0})
    assert err.value.path == "train.steps" and "must be >= 1" in str(err.value)


def test_several_errors_are_all_named_and_unions_say_what_they_accept():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.lr=-1", "data.val_blocks=many", "scaling.gpus=2"])
    assert err.value.path == "data.val_blocks" and "expected an integer" in str(err.value)
    assert "also invalid: train.lr, scaling.gpus" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.min_score=high"])
    assert str(err.value) == "data.min_score: got 'high'; expected a number"
    from mythos_platform.evaluation.config import LoopEvalConfig

    with pytest.raises(ConfigError) as err:
        LoopEvalConfig.from_dict({"limit": "all"})
    assert err.value.path == "limit" and "got 'all'" in str(err.value)


def test_sections_document_their_fields():
    # attribute docstrings are the field descriptions (and so the JSON schema's)
    assert TrainConfig.model_fields["lr"].description == "Peak learning rate (after warmup)."
    schema = PretrainConfig.model_json_schema()
    assert "train" in schema["properties"] and "TrainConfig" in schema["$defs"]
