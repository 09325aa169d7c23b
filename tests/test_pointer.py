"""The reasoning corpus, the trajectory loss, the pair-embedding parametrization and their config
checks: fast CPU tests, no Ray."""

from pathlib import Path

import numpy as np
import pytest
import torch

from mythos import Mythos
from mythos.checkpoint import save_pretrained
from mythos_platform.config import ConfigError, load_config
from mythos_platform.data import pointer
from mythos_platform.data.pipeline import pointer_rows
from mythos_platform.data.pointer import IGNORE, PointerFormat, pointer_tokenizer
from mythos_platform.train.losses import per_loop_label_loss
from mythos_platform.train.loop import answer_accuracy, init_from_folder, prepare_model, step_loops
from mythos_platform.train.pair_embedding import factor_pair_embedding, merge

ROOT = Path(__file__).resolve().parents[1]
REASONING = ROOT / "jobs/configs/reasoning.yaml"


def test_text_and_ids_agree_with_the_word_level_tokenizer(tmp_path):
    fmt = PointerFormat(16)
    tok = pointer_tokenizer(fmt)
    assert tok.vocab_size == fmt.vocab_size == 276 and tok.eos_id == 1
    for p in pointer.problems(20, [1, 3, 6], 6, seed=0, n_symbols=16, stream=0):
        prompt = fmt.prompt(p)
        assert prompt.split()[: p.hops] == [">"] * p.hops and prompt.split()[-1] == p.start  # marks first, start last
        assert len(prompt.split()) == p.hops + 16 + 1
        ids = tok.encode(prompt + fmt.answer(p))
        assert [tok.eos_id, *ids] == fmt.ids(p)  # one token per pair word
        assert tok.decode(ids[-1:]) == p.answer
    # the tokenizer is saved with a model and loads back from the folder alone
    from mythos.tokenizer import load_tokenizer_from_folder

    tok.save(tmp_path)
    again = load_tokenizer_from_folder(tmp_path)
    assert again.encode("> ab ba a") == tok.encode("> ab ba a") and again.eos_id == tok.eos_id
    hidden = PointerFormat(16, hop_marks=False)
    assert ">" not in hidden.prompt(p) and hidden.prompt_len(9) == fmt.prompt_len(0)


def test_trajectory_and_hold_labels_follow_the_chain():
    fmt = PointerFormat(8)
    probs = pointer.problems(6, [1, 2, 3], 5, seed=3, n_symbols=8, stream=0)
    assert {p.hops for p in probs} == {1, 2, 3}
    traj = fmt.rows(probs, 5, "trajectory")
    hold = fmt.rows(probs, 5, "hold")
    L = traj["input_ids"].shape[1] - 1
    assert traj["loop_labels"].shape == (6, 5, L) and traj["labels"].shape == (6, L)
    sym = lambda s: fmt.symbol_offset + fmt.symbols.index(s)  # noqa: E731
    for i, p in enumerate(probs):
        chain = [p.start, *p.steps]
        n = len(fmt.ids(p))
        pos = n - 2  # the start symbol's position answers
        assert traj["input_ids"][i, pos] == sym(p.start) and traj["input_ids"][i, pos + 1] == sym(p.answer)
        assert list(traj["loop_labels"][i, :, pos]) == [sym(chain[t]) for t in range(1, 6)]
        assert list(hold["loop_labels"][i, :, pos]) == [sym(chain[min(t, p.hops)]) for t in range(1, 6)]
        assert traj["labels"][i, pos] == sym(p.answer)
        # padding goes after the answer, where causal attention keeps it from every labelled position
        assert traj["input_ids"][i, 0] == 1 and (traj["input_ids"][i, n:] == 0).all()
        others = np.ones(L, dtype=bool)
        others[pos] = False
        assert (traj["loop_labels"][i][:, others] == IGNORE).all() and (traj["labels"][i][others] == IGNORE).all()
    with pytest.raises(ValueError, match="need chains of >= 5 hops"):
        fmt.rows(pointer.problems(2, 3, 3, seed=0, n_symbols=8, stream=0), 5, "trajectory")


def test_mark_fuse_and_unmarked_rows():
    fmt = PointerFormat(8)
    probs = pointer.problems(2, 3, 5, seed=1, n_symbols=8, stream=0)
    rows = fmt.rows(probs, 5, "hold", mark_labels=True, marked=[True, False], unmarked_depth=2)
    marks = rows["loop_labels"][0, :, 1:4]  # marks 1..3 sit at positions 1..3, after <eos>
    assert (rows["input_ids"][0, 1:4] == 3).all()
    # mark m reads ">" (pending) before loop m and <pad> (consumed) from loop m on: a fuse from the left
    assert marks.tolist() == [[0, 3, 3], [0, 0, 3], [0, 0, 0], [0, 0, 0], [0, 0, 0]]
    chain = [probs[1].start, *probs[1].steps]
    pos = len(fmt.ids(probs[1], marked=False)) - 2
    assert 3 not in rows["input_ids"][1].tolist()  # the unmarked row has no marks ...
    got = rows["loop_labels"][1, :, pos].tolist()  # ... and hops on for unmarked_depth loops, unlabelled after
    assert got == [fmt.symbol_offset + fmt.symbols.index(chain[t]) for t in (1, 2)] + [IGNORE] * 3


def test_ray_data_batch_function_is_deterministic_per_chunk():
    kw = dict(n_docs=10, docs_per_chunk=4, hops=[4], chain=4, labels="trajectory", seed=0, n_symbols=16,
              hop_marks=True, stream=0)
    a = pointer_rows({"chunk": np.array([0, 2])}, **kw)
    b = pointer_rows({"chunk": np.array([2])}, **kw)
    assert a["input_ids"].shape == (6, 23)  # chunk 0: 4 problems, chunk 2: the last 2; 22 inputs + answer
    assert np.array_equal(a["input_ids"][4:], b["input_ids"]) and np.array_equal(a["loop_labels"][4:], b["loop_labels"])
    val = pointer_rows({"chunk": np.array([0])}, **{**kw, "stream": 1})
    assert not np.array_equal(val["input_ids"], a["input_ids"][:4])  # another seed stream


def tiny_model(**over) -> Mythos:
    cfg = load_config(REASONING).model.build().replace(**over)
    return Mythos(cfg)


def test_per_loop_label_loss_and_step_loops():
    model = tiny_model()
    fmt = PointerFormat(16)
    rows = fmt.rows(pointer.problems(4, 4, 4, seed=0, n_symbols=16, stream=0), 4)
    x = torch.from_numpy(rows["input_ids"]).long()
    labels = torch.from_numpy(rows["loop_labels"]).long()
    out = model(x[:, :-1], n_loops=4, bptt_depth=4, return_loop_logits=True)
    loss = per_loop_label_loss(out.loop_logits, labels)
    by_hand = sum(torch.nn.functional.cross_entropy(out.loop_logits[t][:, -1], labels[:, t, -1]) for t in range(4)) / 4
    assert torch.allclose(loss, by_hand, atol=1e-5)
    linear = per_loop_label_loss(out.loop_logits, labels, "linear")
    each = [torch.nn.functional.cross_entropy(out.loop_logits[t][:, -1], labels[:, t, -1]) for t in range(4)]
    assert torch.allclose(linear, sum((t + 1) * e for t, e in enumerate(each)) / 10, atol=1e-5)
    loss.backward()
    assert model.core.layers[0].attn.wqkv.weight.grad.abs().sum() > 0  # the loop is under autograd
    with pytest.raises(ValueError, match="4 loop outputs but labels for 3 loops"):
        per_loop_label_loss(out.loop_logits, labels[:, :3])
    tcfg = load_config(REASONING).train
    assert step_loops(model.cfg, tcfg, 7, labels).n_loops == 4 == step_loops(model.cfg, tcfg, 7, labels).bptt_depth
    correct, counted = answer_accuracy(out.logits, torch.from_numpy(rows["labels"]).long())
    assert counted == 4 and 0 <= correct <= 4


def test_factored_pair_embedding_merges_exactly():
    model = tiny_model().eval()
    fmt = PointerFormat(16)
    param = factor_pair_embedding(model, 16, fmt.symbol_offset, fmt.pair_offset)
    with torch.no_grad():
        param.target.normal_()  # make the factored part matter
    w = model.tok_emb.weight
    x, y = 3, 11
    assert torch.allclose(w[fmt.pair_offset + x * 16 + y], w[fmt.symbol_offset + x] + param.target[y])
    ids = torch.from_numpy(fmt.rows(pointer.problems(3, 4, 4, seed=0, n_symbols=16, stream=0), 4)["input_ids"]).long()
    before = model(ids[:, :-1], n_loops=4).logits
    merge(model)
    assert "parametrizations" not in dict(model.named_modules())["tok_emb"].__dict__.get("_modules", {})
    after = model(ids[:, :-1], n_loops=4).logits
    assert torch.allclose(before, after, atol=1e-6)
    assert set(model.state_dict()) == set(tiny_model().state_dict())  # a plain Mythos again
    with pytest.raises(ValueError, match="untied LM head"):
        factor_pair_embedding(tiny_model(tie_embeddings=True), 16, 4, 20)


def test_prepare_initialises_pair_rows_and_init_from_loads_weights(tmp_path):
    cfg = load_config(REASONING)
    model = tiny_model()
    prepare_model(model, cfg)  # token: free rows that start as E[x] + T[y]
    w = model.tok_emb.weight
    fmt = cfg.data.pointer_format()
    diff = w[fmt.pair_offset + 2 * 16 + 5] - w[fmt.pair_offset + 2 * 16 + 7]
    diff2 = w[fmt.pair_offset + 9 * 16 + 5] - w[fmt.pair_offset + 9 * 16 + 7]
    assert torch.allclose(diff, diff2, atol=1e-6)  # rows share their target part
    save_pretrained(model, tmp_path / "m")
    lora = tiny_model(lora_rank=4)
    missing = init_from_folder(lora, str(tmp_path / "m"))
    assert missing and all(k.startswith("core.lora.") for k in missing)
    assert torch.equal(lora.tok_emb.weight, model.tok_emb.weight)
    x = torch.randint(0, 276, (2, 10))
    assert torch.allclose(lora(x, n_loops=3).logits, model(x, n_loops=3).logits, atol=1e-5)  # LoRA starts at zero
    with pytest.raises(ValueError, match="does not fit this model"):
        init_from_folder(tiny_model(dim=64), str(tmp_path / "m"))
    folder_cfg = load_config(REASONING, [f"train.init_from={tmp_path / 'm'}"])
    fresh = tiny_model(lora_rank=4)
    prepare_model(fresh, folder_cfg)  # from a folder: its rows, not a new initialisation
    assert torch.equal(fresh.tok_emb.weight, model.tok_emb.weight)


@pytest.mark.parametrize("sets, key", [
    (["data.max_hops=50", "data.min_hops=50", "data.label_loops=50", "model.overrides.train_loops_max=50"],
     "data.max_hops"),                                    # the training chain is longer than the sequence allows
    (["data.val_hops=60"], "data.val_hops"),
    (["data.min_hops=5"], "data.max_hops"),               # an empty (reversed) hop range
    (["data.val_hops=0"], "data.val_hops"),
    (["data.label_loops=2"], "data.label_loops"),         # a trajectory shorter than the chain
    (["model.overrides.train_loops_max=3", "model.overrides.train_loops_mean=2"], "model.overrides.train_loops_max"),
    (["data.source=generated"], "data.tokenizer"),
    (["data.tokenizer=byte"], "data.tokenizer"),
    (["data.source=generated", "data.tokenizer=byte", "data.seq_len=64"], "train.loop_schedule"),  # trajectory needs per-loop labels
    (["model.overrides.tie_embeddings=true"], "model.overrides.tie_embeddings"),
    (["model.overrides.vocab_size=200"], "model.overrides.vocab_size"),
    (["train.init_from=/no/such/folder"], "train.init_from"),
    (["train.parallelism=fsdp", "data.pair_embedding=factored"], "data.pair_embedding"),
    (["train.loop_schedule=trajectories"], "train.loop_schedule"),
])
def test_bad_reasoning_configs_fail_naming_the_key(sets, key):
    with pytest.raises(ConfigError) as err:
        load_config(REASONING, sets)
    assert err.value.path == key, str(err.value)
