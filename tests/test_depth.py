"""Mechanics of the depth-extrapolation experiment on a tiny budget (not its result)."""

from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from mythos_platform.config import ConfigError, load_config
from mythos_platform.data.multihop import generate_problems
from mythos_platform.data.multihop_tokens import PairTokenFormat
from mythos_platform.depth import DepthConfig, run_depth_experiment
from mythos import Mythos
from mythos_platform.depth.curriculum import HopCurriculum
from mythos_platform.depth.pair_embedding import PairEmbedding
from mythos_platform.depth.train import model_config, predict, step_plan
from mythos_platform.train.losses import per_loop_answer_loss

ROOT = Path(__file__).resolve().parents[1]


def test_pair_token_format_and_per_loop_targets():
    fmt = PairTokenFormat(16)
    p = generate_problems(1, 3, seed=5)[0]
    ids = fmt.encode(p)  # default layout: pairs, hop marks, then the start symbol answers
    assert len(ids) == 16 + 3 + 1 == fmt.max_len(3) and ids[-1] == fmt.symbol(p.start)
    assert ids[-4:-1] == [fmt.hop_id] * 3
    eq = PairTokenFormat(16, answer_at="eq").encode(p)
    assert len(eq) == 16 + 1 + 3 + 1 and eq[-1] == fmt.eq_id and eq[16] == fmt.symbol(p.start)
    with pytest.raises(ValueError, match="answer_at"):
        PairTokenFormat(16, answer_at="middle")
    mapping = p.mapping
    for tok in ids[:16]:  # every pair token decodes back to (x, f(x))
        x, fx = divmod(tok - fmt.pair_offset, 16)
        assert mapping["abcdefghijklmnop"[x]] == "abcdefghijklmnop"[fx]
    batch = fmt.batch([p], n_loops=6)
    steps = [fmt.symbol(s) for s in p.steps]
    assert batch["loop_targets"][0].tolist() == [steps[0], steps[1], steps[2], steps[2], steps[2], steps[2]]
    assert batch["answers"][0] == steps[2] and batch["answer_pos"][0] == len(ids) - 1


def test_curriculum_advances_on_accuracy_or_at_the_step_limit():
    cur = HopCurriculum(max_hops=3, max_steps=100, accuracy=0.9, window=4)
    assert cur.top == 1
    for step in range(3):
        assert not cur.update(step, 1.0)  # the window is not full yet
    assert cur.update(3, 1.0) and cur.top == 2  # 4 steps at accuracy 1.0 >= 0.9
    for step in range(4, 103):
        assert not cur.update(step, 0.5)
    assert cur.update(103, 0.5) and cur.top == 3  # 100 steps at this level: moves on anyway
    assert not cur.update(104, 1.0) and cur.top == 3  # never beyond max_hops
    assert cur.advances == [(4, 2), (104, 3)]
    off = HopCurriculum(max_hops=4, max_steps=0, accuracy=0.9)
    assert off.top == 4 and not off.update(0, 1.0)


def test_per_loop_loss_uses_each_loops_target():
    logits = [torch.full((1, 3, 5), -10.0) for _ in range(2)]
    logits[0][0, 2, 1] = 10.0  # loop 1 predicts 1 at the answer position
    logits[1][0, 2, 4] = 10.0  # loop 2 predicts 4
    pos, targets = torch.tensor([2]), torch.tensor([[1, 4]])
    assert per_loop_answer_loss(logits, pos, targets, first_loop=0).item() < 1e-3
    assert per_loop_answer_loss(logits, pos, targets.flip(-1), first_loop=0).item() > 5


def test_pair_embedding_is_factored_and_merges_exactly():
    fmt = PairTokenFormat(4)
    torch.manual_seed(0)
    weight = torch.randn(fmt.vocab_size, 8)
    emb = PairEmbedding(fmt, 8, std=1.0)
    pair = fmt.pair_offset + 2 * 4 + 3  # (x=2, y=3)
    ids = torch.tensor([[pair, 1, fmt.hop_id]])
    out = emb(ids, weight)
    torch.testing.assert_close(out[0, 0], weight[2] + emb.target[3])
    torch.testing.assert_close(out[0, 1:], weight[[1, fmt.hop_id]])  # other ids: plain rows
    merged = weight.clone()
    emb.merge_into(merged)
    torch.testing.assert_close(merged[ids], out)
    torch.testing.assert_close(merged[:4], weight[:4])  # symbols untouched


def test_merged_model_predicts_like_the_trained_pair(tmp_path):
    """Training feeds inputs_embeds; after merge_into, plain input_ids give the same answers."""
    cfg = load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", cls=DepthConfig)
    fmt = cfg.token_format
    model = Mythos(model_config(cfg, True)).eval()
    emb = PairEmbedding(fmt, model.cfg.dim, std=0.5)
    batch = fmt.batch(generate_problems(6, [1, 2], seed=3), n_loops=1)
    ids = batch["input_ids"]
    with torch.no_grad():
        before = model(inputs_embeds=emb(ids, model.tok_emb.weight), n_loops=3).logits
        emb.merge_into(model.tok_emb.weight)
        after = model(ids, n_loops=3).logits
    torch.testing.assert_close(after[..., :fmt.n_symbols], before[..., :fmt.n_symbols])
    assert torch.equal(predict(after, batch["answer_pos"], fmt.n_symbols),
                       predict(before, batch["answer_pos"], fmt.n_symbols))
    assert predict(after, batch["answer_pos"], fmt.n_symbols).max() < fmt.n_symbols


def test_schedule_curriculum_and_baseline_shape():
    cfg = load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", ["curriculum_steps=0"], cls=DepthConfig)
    plans = [step_plan(cfg, s, looped=True) for s in range(50)]
    assert all(h == [n] and 1 <= n <= 4 for h, n in plans)  # k-hop batches run k loops
    assert plans == [step_plan(cfg, s, looped=True) for s in range(50)]
    assert step_plan(cfg, 3, looped=False) == ([1, 2, 3, 4], 1)
    assert {step_plan(cfg, s, looped=True, top=2)[1] for s in range(50)} == {1, 2}
    assert step_plan(cfg, 3, looped=False, top=2) == ([1, 2], 1)  # the baseline follows its curriculum too
    mixed = load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", ["schedule=mixed", "mixed_fraction=0.5"],
                        cls=DepthConfig)
    plans = [step_plan(mixed, s, looped=True) for s in range(200)]
    hops_steps = [p for p in plans if len(p[0]) == 1]  # k-hop batch, k loops
    random_steps = [p for p in plans if len(p[0]) > 1]  # all hop counts, 4..loop_max loops
    assert all(h == [n] for h, n in hops_steps) and all(4 <= n <= mixed.loop_max for _, n in random_steps)
    assert 60 <= len(random_steps) <= 140
    base, rdt = model_config(cfg, False), model_config(cfg, True)
    assert base.n_loops == 1 and (base.dim, base.core_layers) == (64, 4) and (rdt.dim, rdt.core_layers) == (128, 1)
    n_base, n_rdt = (sum(p.numel() for p in Mythos(c).parameters()) for c in (base, rdt))
    assert abs(n_base / n_rdt - 1) < 0.1  # parameter-matched within 10%
    same = load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", ["baseline_overrides={}"], cls=DepthConfig)
    assert model_config(same, False) == model_config(same, True).replace(
        n_loops=1, train_loops_min=1, train_loops_mean=1.0, loop_distribution="fixed")  # empty: the RDT's blocks once
    with pytest.raises(ConfigError, match="baseline_overrides.*n_head"):
        load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", ["baseline_overrides={n_headz: 3}"],
                    cls=DepthConfig)
    with pytest.raises(ConfigError, match="eval_max_hops"):
        load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", ["eval_max_hops=2"], cls=DepthConfig)
    with pytest.raises(ConfigError, match="model.overrides.vocab_size"):
        load_config(ROOT / "jobs/configs/depth-extrapolation.yaml", ["model.overrides.vocab_size=100"], cls=DepthConfig)


@pytest.mark.ray
def test_tiny_experiment_fills_every_cell(tmp_path):
    import ray

    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 1024**2, configure_logging=False)
    try:
        cfg = load_config(ROOT / "jobs/configs/depth-extrapolation.yaml",
                          [f"run.root={tmp_path}", "steps=6", "log_every=3", "eval_problems=4",
                           "train_max_hops=2", "eval_max_hops=4", "eval_loops=[1,2,8]", "warmup_steps=2"],
                          cls=DepthConfig)
        res = run_depth_experiment(cfg)
    finally:
        ray.shutdown()
    assert set(res.grid) == {(h, n) for h in range(1, 5) for n in (1, 2, 3, 4, 8)}
    assert set(res.baseline) == {1, 2, 3, 4} and set(res.floor) == {1, 2, 3, 4}
    assert abs(res.params["baseline"] / res.params["rdt"] - 1) < 0.1  # parameter-matched within 10%
    assert res.plot_path.exists() and res.plot_path.stat().st_size > 10_000
    assert "| 4 |" in res.table_md and "RDT 8 loops" in res.table_md and "RDT loops = hops" in res.table_md
    assert (3, 3) in res.grid and (4, 4) in res.grid  # loops = hops is always evaluated
    client = MlflowClient(res.tracking_uri)
    hist = client.get_metric_history(res.run_id, "rdt_acc_hops_3")
    assert sorted(m.step for m in hist) == [1, 2, 3, 4, 8]
    assert client.get_metric_history(res.run_id, "baseline_loss")
    curriculum = sorted(client.get_metric_history(res.run_id, "rdt_max_train_hops"), key=lambda m: m.step)
    assert curriculum[0].step == 0 and curriculum[0].value == 1  # the curriculum starts at one hop
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"plots", "results", "models"} <= arts
