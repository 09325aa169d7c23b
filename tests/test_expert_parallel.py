"""Expert parallelism (mythos_platform/train/expert_parallel.py): two processes over gloo against
the single-process MoE and model, and a two-worker Ray Train run against the run without it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mythos import Mythos, MythosConfig
from mythos.moe import MoE

ROOT = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)


def _spawn(fn, port: int, *args, world: int = 2) -> None:
    """Run fn(rank, *args) in `world` processes joined in a gloo group on 127.0.0.1. Forked, so
    that they inherit the references the test computed (and skip importing torch again)."""
    mp.start_processes(_entry, args=(fn, port, world, args), nprocs=world, start_method="fork")


def _entry(rank: int, fn, port: int, world: int, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


# --- one MoE layer -------------------------------------------------------------------------------
def _moe() -> MoE:
    moe = MoE(dim=16, n_experts=4, top_k=2, expert_dim=8, n_shared_experts=1)
    moe.init_weights(0.5, 0.5)
    return moe


def _skewed(moe: MoE, x: torch.Tensor) -> None:
    """Routing by hand: expert e scores 10 * x[..., e]; expert 3 (rank 1's) is never chosen, and
    rank 0's tokens (batch rows 0-1) favour experts 0 and 1, so rank 0 sends rank 1 nothing."""
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :4] = 10 * torch.eye(4)
        moe.router_bias[3] = -100.0
        x[:2, :, :2] = 3.0
        x[:2, :, 2:4] = -3.0


def _layer_cases():
    """(case, single-process MoE after its backward, full input with its grad, output, upstream grad)."""
    out = []
    for case in ("random", "skewed"):
        torch.manual_seed(1)
        moe = _moe().train()
        x = torch.randn(4, 5, 16)  # rank r gets batch rows 2r, 2r+1
        if case == "skewed":
            _skewed(moe, x)
        x.requires_grad_(True)
        g = torch.randn(4, 5, 16)
        y, _ = moe(x)
        (y * g).sum().backward()
        out.append((case, moe, x, y.detach(), g))
    return out


def _layer_worker(rank: int, cases) -> None:
    from mythos_platform.train.expert_parallel import expert_mesh, reduce_expert_grads, shard_experts

    mesh = expert_mesh("cpu", 2, 2)
    rows = slice(2 * rank, 2 * rank + 2)
    for case, ref, x_full, y_full, g in cases:
        moe = copy.deepcopy(ref)
        moe.zero_grad(set_to_none=True)
        moe.expert_load.zero_()
        shard_experts(moe, mesh)
        assert moe.w13.to_local().shape == (2, 16, 16) and moe.w13.shape == (4, 16, 16)
        x = x_full.detach()[rows].clone().requires_grad_(True)
        y, _ = moe(x)
        torch.testing.assert_close(y, y_full[rows], **TOL, msg=f"{case}: output")
        (y * g[rows]).sum().backward()
        torch.testing.assert_close(x.grad, x_full.grad[rows], **TOL, msg=f"{case}: input grad")
        experts = slice(2 * rank, 2 * rank + 2)  # this rank's experts: their grads sum both ranks' tokens
        for name in ("w13", "w2"):
            torch.testing.assert_close(getattr(moe, name).grad.to_local(), getattr(ref, name).grad[experts], **TOL,
                                       msg=f"{case}: {name} grad")
        for name, p in moe.named_parameters():  # replicated: the sum over ranks is the batch's gradient
            if name not in ("w13", "w2"):
                dist.all_reduce(p.grad)
                torch.testing.assert_close(p.grad, dict(ref.named_parameters())[name].grad, **TOL,
                                           msg=f"{case}: {name} grad")
        load = moe.expert_load.clone()
        dist.all_reduce(load)
        assert torch.equal(load, ref.expert_load), case  # the global load, for the router-bias update
        if case == "skewed":
            assert load[3] == 0 and (rank == 1 or moe.expert_load[2:].sum() == 0)
            assert load[2] > 0 and load[0] != load[1]  # uneven splits
        w13 = moe.w13.grad.to_local().clone()
        reduce_expert_grads(moe)  # the data-parallel mean: / world size (edp = 1)
        torch.testing.assert_close(moe.w13.grad.to_local(), w13 / 2)


def test_moe_layer_matches_single_process(free_port):
    """Outputs, input and parameter gradients and the expert load of an MoE layer split over two
    ranks (two experts each) equal the single-process layer on the concatenated batch; also with
    skewed routing: uneven splits, an expert that gets no token, a rank that sends another nothing."""
    _spawn(_layer_worker, free_port(), _layer_cases())


# --- the whole model, trained, checkpointed and exported ------------------------------------------
CFG = dict(vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, max_seq_len=16, n_experts=4, top_k=2, expert_dim=16,
           loop_emb_dim=8, lora_rank=4, n_loops=2, train_loops_max=4)
STEPS, LOOPS, CLIP, LR = 3, 2, 0.5, 3e-3


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (4, 13), generator=g) for _ in range(STEPS + 1)]  # rank r: rows 2r, 2r+1


def _train_step(model, core: Mythos, opt, ids: torch.Tensor) -> tuple[float, float]:
    """What Trainer.step does, on fixed batches and loop counts: (loss, grad norm)."""
    from mythos_platform.train.expert_parallel import reduce_expert_grads
    from mythos_platform.train.grad_clip import clip_grad_norm_
    from mythos_platform.train.parallel import all_reduce_mean, all_reduce_sum_

    out = model(ids[:, :-1], targets=ids[:, 1:], n_loops=LOOPS, bptt_depth=LOOPS)
    (out.loss + out.aux_loss).backward()
    reduce_expert_grads(core)
    norm = clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    core.update_router_biases(all_reduce_sum_([m.expert_load for m in core.moe_layers()]))
    return float(all_reduce_mean(out.loss.detach())), float(norm)


def _reference():
    """The single-process model trained on the whole batches: (losses and grad norms, state after STEPS)."""
    from mythos_platform.train.optim import build_optimizer

    torch.manual_seed(0)
    model = Mythos(MythosConfig(**CFG)).train()
    opt = build_optimizer(model, LR, (0.9, 0.95), 0.1, torch.device("cpu"))
    history = [_train_step(model, model, opt, ids) for ids in _batches()[:STEPS]]
    return history, {k: v.clone() for k, v in model.state_dict().items()}


def _full_state(model) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _model_worker(rank: int, parallelisms: tuple[str, ...], ref_history, ref_state, folder: Path) -> None:
    from torch.distributed.tensor import DTensor

    from mythos.checkpoint import load_pretrained
    from mythos_platform.train.checkpointing import TrainState, export_model, load_checkpoint, save_checkpoint
    from mythos_platform.train.optim import build_optimizer, build_scheduler
    from mythos_platform.train.parallel import build_model, unwrap

    n = 4 // dist.get_world_size()  # rows of the batch per rank
    cfg, cpu, rows = MythosConfig(**CFG), torch.device("cpu"), slice(n * rank, n * rank + n)
    batches = [ids[rows] for ids in _batches()]

    def build(parallelism: str, seed: int):
        model = build_model(cfg, parallelism, cpu, False, seed, expert_parallel=2)
        opt = build_optimizer(model, LR, (0.9, 0.95), 0.1, cpu)
        return model, unwrap(model).train(), opt, build_scheduler(opt, 0, 10, LR, LR)

    for parallelism in parallelisms:
        model, core, opt, sched = build(parallelism, 0)
        w13 = core.core.layers[0].ffn.w13
        assert isinstance(w13, DTensor) and w13.to_local().shape[0] == 2  # two of the four experts here
        assert core.core.layers[0].ffn.expert_dispatcher.edp == dist.get_world_size() // 2
        history = [_train_step(model, core, opt, ids) for ids in batches[:STEPS]]
        for (loss, norm), (ref_loss, ref_norm) in zip(history, ref_history):
            assert loss == pytest.approx(ref_loss, rel=1e-5) and norm == pytest.approx(ref_norm, rel=1e-5), \
                (parallelism, history, ref_history)
        state = _full_state(model)
        assert state.keys() == ref_state.keys()
        for k, v in ref_state.items():
            torch.testing.assert_close(state[k], v, **TOL, msg=f"{parallelism}: {k}")
        # a sharded checkpoint restores into a model built from another seed, optimizer state included
        ckpt = folder / f"ckpt-{parallelism}"
        save_checkpoint(ckpt, model, opt, sched, TrainState(step=STEPS), rank)
        model2, core2, opt2, sched2 = build(parallelism, 1)
        assert load_checkpoint(ckpt, model2, opt2, sched2, rank).step == STEPS
        for k, v in _full_state(model2).items():
            assert torch.equal(v, state[k]), k
        assert torch.equal(core2.core.layers[0].ffn.router_bias, core.core.layers[0].ffn.router_bias)
        assert _train_step(model2, core2, opt2, batches[STEPS]) == _train_step(model, core, opt, batches[STEPS])
        # the export is the whole model, loadable on one device, equal to the gathered weights
        export_model(model, cfg, folder / f"export-{parallelism}", rank)
        final = _full_state(model)
        if rank == 0:
            plain = load_pretrained(folder / f"export-{parallelism}").state_dict()
            assert plain.keys() == ref_state.keys()
            for k, v in plain.items():
                assert v.shape == ref_state[k].shape and torch.equal(v, final[k]), k
        dist.barrier()


@pytest.mark.parametrize("world, parallelisms", [
    (2, ("ddp", "fsdp")),
    (4, ("fsdp",)),  # two expert-data-parallel replicas of each expert
])
def test_model_training_checkpoint_and_export_match_single_process(free_port, tmp_path, world, parallelisms):
    """A tiny MoE model built by build_model with expert_parallel=2 (on two ranks: each holds two of
    the four experts; on four: two groups of two, each expert on two ranks), under DDP and FSDP2,
    trains step for step as the single-process model on the concatenated batches (losses, clipped
    global grad norms, every weight), restores from its sharded checkpoint and exports the full model."""
    history, state = _reference()
    assert len({n for _, n in history}) == STEPS and all(n > CLIP for _, n in history)  # clipping is exercised
    _spawn(_model_worker, free_port(), parallelisms, history, state, tmp_path, world=world)


# --- configuration -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sets, allowed", [
    (["train.expert_parallel=0"], "must be >= 1"),
    (["train.expert_parallel=3"], "must divide the model's n_experts=8"),
    (["train.expert_parallel=4", "model.overrides.n_experts=4"], "must divide scaling.num_workers=2"),
    (["train.expert_parallel=2", "model.overrides.n_experts=0"], "without routed experts"),
])
def test_bad_expert_parallel_degrees_name_the_key(sets, allowed):
    from mythos_platform.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "jobs/configs/debug.yaml", sets)
    assert err.value.path == "train.expert_parallel" and allowed in str(err.value)
    assert load_config(ROOT / "jobs/configs/debug.yaml", ["train.expert_parallel=2"]).train.expert_parallel == 2


# --- a Ray Train run -------------------------------------------------------------------------------
def _ray_cfg(root: Path, **extra: str):
    from mythos_platform.config import load_config

    sets = {"run.root": str(root), "run.name": "ep", "train.steps": "6", "train.batch_size": "4",
            "train.warmup_steps": "2", "train.log_every": "1", "train.eval_every": "6", "train.val_batches": "1",
            "data.seq_len": "64", "data.n_docs": "300", "data.val_docs": "50", "data.val_blocks": "8",
            "checkpoint.every_steps": "6", "tracking.experiment": "test-ep",
            **extra}
    return load_config(ROOT / "jobs/configs/debug.yaml", [f"{k}={v}" for k, v in sets.items()])


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_run_matches_the_run_without_expert_parallelism(ray_cluster, tmp_path):
    """jobs/pretrain.py's path on two Ray Train workers, the debug model's 8 experts split 4 + 4
    (FSDP2 for the rest), against the same run with every expert on every rank (DDP): the same
    loss, grad-norm and balance curves step for step, and an exported model of the same keys and
    shapes and (to float tolerance) weights that loads on one device."""
    from mlflow.tracking import MlflowClient

    from mythos.checkpoint import load_pretrained
    from mythos_platform.train import run_pretrain

    ep = run_pretrain(_ray_cfg(tmp_path / "ep", **{"train.expert_parallel": "2", "train.parallelism": "fsdp"}))
    plain = run_pretrain(_ray_cfg(tmp_path / "plain", **{"train.parallelism": "ddp"}))

    def curve(res, key):
        return [(m.step, m.value) for m in MlflowClient(res.tracking_uri).get_metric_history(res.mlflow_run_id, key)]

    for key in ("loss", "grad_norm", "expert_load_imbalance", "val_loss"):
        got, want = curve(ep, key), curve(plain, key)
        print(key, [(s, a, b) for (s, a), (_, b) in zip(got, want)])  # shown with -s
        assert [s for s, _ in got] == [s for s, _ in want] and got, key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4), key
    assert [s for s, _ in curve(ep, "loss")] == [1, 2, 3, 4, 5, 6]
    a, b = load_pretrained(ep.export_dir).state_dict(), load_pretrained(plain.export_dir).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5, msg=k)
    assert a["core.layers.0.ffn.w13"].shape[0] == 8  # every expert, gathered from both workers


def _composed_worker(rank: int, ref_history, variants: list[tuple[str, dict]]) -> None:
    """Train STEPS steps for each (parallelism, build_model options) with expert_parallel=2."""
    from mythos_platform.train.optim import build_optimizer
    from mythos_platform.train.parallel import build_model, unwrap

    for parallelism, options in variants:
        model = build_model(MythosConfig(**CFG), parallelism, torch.device("cpu"), False, 0, expert_parallel=2,
                            **options)
        opt = build_optimizer(model, LR, (0.9, 0.95), 0.1, torch.device("cpu"))
        history = [_train_step(model, unwrap(model).train(), opt, ids[2 * rank:2 * rank + 2])
                   for ids in _batches()[:STEPS]]
        assert [v for step in history for v in step] == pytest.approx(
            [v for step in ref_history for v in step], rel=1e-5), (parallelism, options)


def test_composes_with_activation_checkpointing(free_port):
    """The recomputed forward repeats the all-to-alls in the same order on every rank: training
    with checkpointed blocks or iterations still equals the single-process steps."""
    variants = [("ddp", {"activation_checkpointing": "block"}), ("fsdp", {"activation_checkpointing": "iteration"})]
    _spawn(_composed_worker, free_port(), _reference()[0], variants)


@pytest.mark.slow
def test_composes_with_compile(free_port):
    """A compiled loop body (the default on CUDA) runs the dispatch eagerly, one graph break around
    it, and still trains as the single-process model (about a minute of compiling on a CPU)."""
    variants = [("ddp", {"compile": "on"}), ("fsdp", {"compile": "on"})]
    _spawn(_composed_worker, free_port(), _reference()[0], variants)
