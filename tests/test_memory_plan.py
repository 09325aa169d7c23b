"""The memory plan (mythos/memory_plan.py, mythos_platform/plan.py, `mythos plan`): the activation
model against what autograd saves and what a training step's peak measures, the per-GPU
arithmetic, the shipped scale configs, and the command's errors."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from saved_bytes import saved_bytes
import torch

from mythos import Mythos, get_variant
from mythos.memory_plan import StepShape, activation_bytes, param_layout
from mythos_platform.cli import main
from mythos_platform.config import ConfigError, PretrainConfig, load_config
from mythos_platform.plan import GIB, Hardware, make_plan
from mythos_platform.train.activation_checkpointing import apply_activation_checkpointing

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dim=64, n_heads=4, n_kv_heads=2, n_experts=4, top_k=2, expert_dim=32, loop_emb_dim=16, lora_rank=4,
             core_layers=2, max_seq_len=64)
CONFIGS = {"gqa-moe": (get_variant("debug", **SMALL), True),
           "mla-fused": (get_variant("debug", attn_type="mla", q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                                     qk_rope_head_dim=8, v_head_dim=16, **SMALL), True),
           "mla-math": (get_variant("debug", attn_type="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                                    v_head_dim=8, **SMALL), False),
           "dense": (get_variant("debug", **{**SMALL, "n_experts": 0}, act_enabled=False, tie_embeddings=False), True)}


def autograd_saved(cfg, mode: str, B: int, S: int, loops: int, bptt: int) -> int:
    """Bytes autograd saves in one forward (unique storages, parameters excluded)."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(Mythos(cfg).train(), mode)
    x = torch.randint(0, 256, (B, S + 1))
    with saved_bytes(model) as total:
        model(x[:, :-1], targets=x[:, 1:], n_loops=loops, bptt_depth=bptt)
    return total[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_saved_activations_match_what_autograd_saves(name):
    cfg, fused = CONFIGS[name]
    for mode, loops, bptt in (("none", 3, 3), ("none", 5, 2), ("block", 5, 2), ("iteration", 5, 2)):
        got = autograd_saved(cfg, mode, 2, 48, loops, bptt)
        planned = activation_bytes(cfg, StepShape(2, 48, loops, bptt, mode, "fp32", fused)).saved
        # the model counts per token; what it leaves out is per call (a loop embedding, A: D numbers)
        assert planned == pytest.approx(got, rel=0.04 if name == "mla-math" else 0.01), (mode, loops, bptt)


def test_the_model_counts_loops_depth_checkpointing_and_the_attention_kernel():
    cfg = get_variant("1b")
    act = lambda **kw: activation_bytes(cfg, StepShape(**{**dict(micro_batch=1, seq_len=2048, n_loops=8,  # noqa: E731
                                                               bptt_depth=4), **kw}))
    assert act(n_loops=32).saved == act(n_loops=8).saved  # truncated iterations keep nothing
    per_iteration = act(bptt_depth=5).saved - act(bptt_depth=4).saved
    assert act(bptt_depth=6).saved - act(bptt_depth=5).saved == pytest.approx(per_iteration)
    assert act().saved > 4 * act(checkpointing="block").saved > act(checkpointing="iteration").saved
    assert act(checkpointing="none").recompute == 0 < act(checkpointing="block").recompute
    assert act(dtype="fp32").saved > 1.8 * act().saved
    # a kernel without fused attention keeps S x S scores per head: quadratic in the sequence
    math = [act(fused_attention=False, seq_len=s).saved / s for s in (1024, 2048)]
    fused = [act(seq_len=s).saved / s for s in (1024, 2048)]
    assert fused[0] == pytest.approx(fused[1]) and math[1] > math[0] * 1.2


def _train_bench():
    spec = importlib.util.spec_from_file_location("train_bench", ROOT / "benchmarks" / "train_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("train_bench", module)
    spec.loader.exec_module(module)
    return module


def test_planned_step_peak_is_within_15_percent_of_the_measured_one():
    """A fresh process (benchmarks/train_bench.py's VmHWM measurement) with block checkpointing: the
    saved tensors, a recomputed block and the gradients so far (section 4 of the benchmark runs
    every mode and more configs)."""
    tb = _train_bench()
    configs = {"debug": {"dim": 128, "n_heads": 4, "expert_dim": 128}}
    for row in tb.plan_rows(configs, ["block"], loops=4, bptt=2, batch=4, seq=64):
        planned, measured = row["plan"]["peak"], row["measured"]["peak"]
        assert planned == pytest.approx(measured, rel=0.15), row["mode"]


def _plan(variant: str, gpus: int, ep: int = 1, ac: str = "block", **train) -> PretrainConfig:
    return PretrainConfig.from_dict({"model": {"variant": variant}, "scaling": {"num_workers": gpus, "use_gpu": True},
                                     "train": {"expert_parallel": ep, "activation_checkpointing": ac, "batch_size": 1,
                                               **train}, "data": {"seq_len": 2048}})


def test_per_gpu_states_are_16_bytes_per_local_parameter():
    layout = param_layout(get_variant("50b"))
    plan = make_plan(_plan("50b", 64, ep=64))
    local = (layout.total - layout.routed) / 64 + layout.routed / 64
    lines = {line.name: line.bytes for line in plan.lines}
    assert lines["parameters"] == pytest.approx(4 * local) and lines["gradients"] == pytest.approx(4 * local)
    assert lines["optimizer"] == pytest.approx(8 * local)
    # experts sharded over 16 workers instead of 64: 4x the expert bytes, the rest as before
    lines16 = {line.name: line.bytes for line in make_plan(_plan("50b", 64, ep=16)).lines}
    assert lines16["parameters"] - lines["parameters"] == pytest.approx(4 * layout.routed * (1 / 16 - 1 / 64))
    assert plan.total == pytest.approx(sum(lines.values()))
    t = plan.throughput
    assert t["tokens_per_s_gpu"] == pytest.approx(0.4 * 989e12 / (t["train_flops"] + t["recompute_flops"]))
    assert make_plan(_plan("50b", 64, ep=64, ac="none")).throughput["recompute_flops"] == 0


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs" / "scale").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_scale_config_fits_the_cluster_it_states(path):
    gpus, memory = map(int, re.search(r"^# cluster: (\d+) GPUs x (\d+) GiB$", path.read_text(), re.M).groups())
    cfg = load_config(path)
    assert cfg.model.variant == path.stem and cfg.scaling.num_workers == gpus and cfg.scaling.use_gpu
    plan = make_plan(cfg, Hardware(gpu_memory_gb=memory))
    assert plan.fits, f"{plan.total / GIB:.1f} GiB > {plan.usable / GIB:.1f}"


def test_scale_configs_cover_every_named_size_from_1b():
    assert {p.stem for p in (ROOT / "jobs" / "configs" / "scale").glob("*.yaml")} == \
        {"1b", "3b", "10b", "50b", "100b", "500b", "1t"}


def test_plan_command_exit_codes_and_messages(capsys):
    assert main(["plan", "--config", "jobs/configs/scale/1t.yaml"]) == 0
    out = capsys.readouterr().out
    assert "384 GPUs x 80 GiB" in out and "fits" in out and "tokens/s per GPU" in out
    # 1t on 256 GPUs: a 128-way expert split leaves 7.8B expert parameters per GPU
    assert main(["plan", "--variant", "1t", "--gpus", "256", "--ep", "128", "--micro-batch", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: the plan does not fit" in err and "optimizer" in err and "train.expert_parallel" in err
    assert main(["plan", "--config", "jobs/configs/scale/1t.yaml", "--seq-len", "4096"]) == 1
    assert "would fit: --set data.seq_len=2048" in capsys.readouterr().err
    assert main(["plan", "--variant", "1t", "--gpus", "256", "--ep", "3"]) == 2
    assert "error: train.expert_parallel: got 3; must divide scaling.num_workers=256" in capsys.readouterr().err
    assert main(["plan", "--variant", "1t", "--gpus", "256", "--ep", "5"]) == 2
    assert "must divide the model's n_experts=384" in capsys.readouterr().err
    assert main(["plan", "--variant", "1b", "--ac", "layer"]) == 2
    assert "error: train.activation_checkpointing: got 'layer'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--fsdp"):
        make_plan(_plan("1b", 8), Hardware(fsdp=3))


def _plan_total_gib(args: list[str], capsys) -> tuple[int, float]:
    code = main(["plan", *args])
    out = capsys.readouterr().out
    return code, float(re.search(r"^  total\s+([\d.]+)", out, re.M).group(1))


def test_every_documented_plan_command_fits_and_every_stated_figure_is_the_plans(capsys):
    """The `mythos plan` command lines a user copies (the command's --help, the plan module's
    docstring, docs/memory.md) fit (exit 0), and the GiB per GPU that each scale config's header and
    docs/memory.md's table state are what the plan prints now."""
    import shlex

    from mythos_platform import cli, plan

    sources = {"mythos --help": cli.__doc__, "mythos_platform/plan.py": plan.__doc__,
               "docs/memory.md": (ROOT / "docs" / "memory.md").read_text()}
    examples = [(where, line.split("#")[0].split("mythos plan", 1)[1]) for where, text in sources.items()
                for line in text.splitlines() if line.strip().startswith("mythos plan ")]
    assert len(examples) >= 5, examples
    for where, args in examples:
        code, total = _plan_total_gib(shlex.split(args), capsys)
        assert code == 0, f"{where}: `mythos plan{args}` does not fit ({total} GiB)"
    table = dict(re.findall(r"^\| (\w+) \|.*\| ([\d.]+) \|$", sources["docs/memory.md"], re.M))
    for path in sorted((ROOT / "jobs" / "configs" / "scale").glob("*.yaml")):
        code, total = _plan_total_gib(["--config", str(path)], capsys)
        stated = float(re.search(r"\(80 GiB GPUs, the default\): ([\d.]+) GiB per GPU", path.read_text()).group(1))
        assert (code, stated, float(table[path.stem])) == (0, total, total), path.name
    # 1t at seq_len 4096: the header and the docs say how far over it is
    code = main(["plan", "--config", "jobs/configs/scale/1t.yaml", "--seq-len", "4096"])
    over = re.search(r"DOES NOT FIT: ([\d.]+) GiB over", capsys.readouterr().out).group(1)
    assert code == 1
    assert f"seq_len 4096 is {over} GiB over" in (ROOT / "jobs/configs/scale/1t.yaml").read_text()
    assert f"at seq_len 4096 that is {over} GiB over" in sources["docs/memory.md"]
