"""Data: the multi-hop generator, packing, and the Ray Data pipeline on local files.

Pure-function tests run without Ray; the pipeline tests (marked `ray`) share one local
cluster per module.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mythos.tokenizer import ByteTokenizer
from mythos_platform.config import DataConfig
from mythos_platform.data import (
    DataSourceError,
    Problem,
    build_datasets,
    corpus_documents,
    generate_problems,
    pack_documents,
    render,
    tokenize_and_pack,
)
from mythos_platform.data.sources import in_split, prepare_text, split_text_files

TOK = ByteTokenizer()
EOS = TOK.eos_id


# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------
def rows(ds) -> np.ndarray:
    """All blocks of a dataset as one (n, L) array."""
    return np.stack([r["input_ids"] for r in ds.take_all()])


def whole_docs(blocks: np.ndarray) -> list[str]:
    """Documents that lie entirely inside one block (between two EOS of the same block)."""
    docs = []
    for block in blocks:
        eos_at = np.flatnonzero(block == EOS)
        for a, b in zip(eos_at[:-1], eos_at[1:]):
            docs.append(TOK.decode(block[a + 1: b].tolist()))
    return docs


def parse(doc: str) -> tuple[dict[str, str], str, int, str]:
    """(mapping, start, hops, answer) back from a rendered training document."""
    m = re.fullmatch(r"((?:[a-zA-Z]{2} )+)([a-zA-Z])(>+)=([a-zA-Z])", doc)
    assert m, f"not a multi-hop document: {doc!r}"
    pairs = m.group(1).split()
    return {p[0]: p[1] for p in pairs}, m.group(2), len(m.group(3)), m.group(4)


def chase(mapping: dict[str, str], start: str, hops: int) -> list[str]:
    out, x = [], start
    for _ in range(hops):
        x = mapping[x]
        out.append(x)
    return out


# ---------------------------------------------------------------------------------------
# Multi-hop generator (no Ray)
# ---------------------------------------------------------------------------------------
def test_generator_is_deterministic_by_seed():
    a = generate_problems(50, range(1, 5), seed=3)
    b = generate_problems(50, range(1, 5), seed=3)
    c = generate_problems(50, range(1, 5), seed=4)
    assert a == b
    assert sum(x != y for x, y in zip(a, c)) >= 45
    # any slice comes out the same on its own (what lets Ray workers generate chunks)
    assert generate_problems(10, range(1, 5), seed=3, start_index=20) == a[20:30]
    assert list(corpus_documents(5, range(1, 5), seed=3)) == ["".join(render(p)) for p in a[:5]]


def test_answers_and_steps_are_f_iterated():
    problems = generate_problems(300, [1, 2, 3, 4, 5, 6], seed=0, n_symbols=16)
    for p in problems:
        assert isinstance(p, Problem)
        f = p.mapping
        assert sorted(f) == sorted(set(f)) and len(f) == 16  # one pair per symbol
        assert list(p.steps) == chase(f, p.start, p.hops)
        assert p.answer == p.steps[-1] and len(p.steps) == p.hops
        # the text form carries the same problem
        prompt, answer = render(p)
        assert parse(prompt + answer) == (f, p.start, p.hops, p.answer)
    assert {p.hops for p in problems} == {1, 2, 3, 4, 5, 6}


def test_hop_counts_beyond_training_are_possible():
    deep = generate_problems(20, [12, 16], seed=99)
    assert {p.hops for p in deep} == {12, 16}
    for p in deep:
        prompt, _ = render(p)
        assert prompt.endswith(">" * p.hops + "=")
        assert p.steps == tuple(chase(p.mapping, p.start, p.hops))


def test_functions_are_random_functions_not_permutations():
    problems = generate_problems(200, 3, seed=1, n_symbols=16)
    non_injective = sum(len(set(p.mapping.values())) < 16 for p in problems)
    assert non_injective == len(problems)  # a permutation would hit every symbol exactly once
    # so "answer = start" is no free lunch: near chance (1/16), far below a permutation's cycle floor
    same = np.mean([p.answer == p.start for p in generate_problems(2000, [2, 3, 4], seed=2)])
    assert same < 0.15


def test_prompt_is_compact():
    p = generate_problems(1, 4, seed=0, n_symbols=16)[0]
    prompt, answer = render(p)
    assert len(prompt) == 3 * 16 + 2 + 4 and len(answer) == 1
    assert len(TOK.encode(prompt)) < 64


# ---------------------------------------------------------------------------------------
# Packing (no Ray)
# ---------------------------------------------------------------------------------------
def test_pack_documents_stream_and_blocks():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    blocks = pack_documents(docs, eos_id=0, block_len=4)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 0]
    assert blocks.dtype == np.int32 and blocks.shape == (3, 4)  # 15 tokens -> 3 blocks, 3 dropped
    assert blocks.reshape(-1).tolist() == stream[:12]  # blocks concatenate to the stream's prefix
    assert pack_documents([[1]], eos_id=0, block_len=4).shape == (0, 4)  # too short: nothing


def test_tokenize_and_pack_puts_eos_between_documents():
    texts = [f"document number {i}" for i in range(40)]
    out = tokenize_and_pack({"text": np.array(texts, dtype=object)}, TOK, seq_len=31)["input_ids"]
    assert out.shape[1] == 32 and out.dtype == np.int32
    flat = out.reshape(-1).tolist()
    expected = []
    for t in texts:
        expected += TOK.encode(t) + [EOS]
    assert flat == expected[: len(flat)]
    assert len(expected) - len(flat) < 32  # only the tail is dropped


# ---------------------------------------------------------------------------------------
# Sources' batch functions (no Ray)
# ---------------------------------------------------------------------------------------
def fineweb_table(n: int) -> pa.Table:
    """n documents with FineWeb-Edu's columns; even ones score high, odd ones low."""
    scores = [3.4 if i % 2 == 0 else 1.2 for i in range(n)]
    return pa.table({
        "text": [f"<{'good' if i % 2 == 0 else 'bad'}-{i}> some educational text number {i}." for i in range(n)],
        "id": [f"<urn:uuid:{i}>" for i in range(n)],
        "dump": ["CC-MAIN-2024-10"] * n,
        "url": [f"https://example.org/{i}" for i in range(n)],
        "file_path": ["s3://commoncrawl/x.warc.gz"] * n,
        "language": ["en"] * n,
        "language_score": [0.95] * n,
        "token_count": [12] * n,
        "score": scores,
        "int_score": [int(round(s)) for s in scores],
    })


def test_prepare_text_filters_scores_and_splits_by_hash():
    table = fineweb_table(200)
    kept = prepare_text(table, min_score=3.0)
    assert kept.column_names == ["text"]
    assert all("<good-" in t for t in kept["text"].to_pylist()) and kept.num_rows == 100
    train = prepare_text(table, min_score=3.0, split="train", val_fraction=0.3).column("text").to_pylist()
    val = prepare_text(table, min_score=3.0, split="val", val_fraction=0.3).column("text").to_pylist()
    assert not set(train) & set(val) and len(train) + len(val) == 100
    assert 10 <= len(val) <= 50
    assert in_split(val, "val", 0.3) == [True] * len(val)
    with pytest.raises(KeyError, match="data.text_column"):
        prepare_text(table, text_column="content")


def test_split_text_files_paragraph_and_file_units():
    table = pa.table({"bytes": [b"first para\nstill first\n\n\nsecond\r\n\r\nthird\n", b"only one"]})
    assert split_text_files(table, "paragraph")["text"].to_pylist() == [
        "first para\nstill first", "second", "third", "only one"]
    assert split_text_files(table, "file")["text"].to_pylist() == [
        "first para\nstill first\n\n\nsecond\n\nthird", "only one"]


def test_fineweb_offline_fails_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = DataConfig(source="fineweb", min_score=3.0)
    with pytest.raises(DataSourceError) as err:
        build_datasets(cfg, TOK)  # fails while listing files, before any Ray work
    msg = str(err.value)
    assert "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet" in msg
    assert "data.paths" in msg and "\n" not in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__


# ---------------------------------------------------------------------------------------
# Ray Data pipeline
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             object_store_memory=300 * 1024**2, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.mark.ray
def test_fixed_order_gives_every_rank_the_same_rows_on_every_build(ray_cluster):
    """data.order fixed: two builds of one config (two launches) cut into the same two parts, row for
    row, in equal contiguous halves of the shuffled training set."""
    from mythos_platform.data.sharding import fixed_parts

    cfg = DataConfig(source="generated", n_docs=1200, val_docs=0, seq_len=31, docs_per_batch=200, shuffle_seed=0)
    builds = []
    for _ in range(2):
        train, _ = build_datasets(cfg, TOK)
        builds.append([rows(part) for part in fixed_parts(train, 2)])
    (a0, a1), (b0, b1) = builds
    assert len(a0) == len(a1) > 30 and a0.shape[1] == 32
    assert np.array_equal(a0, b0) and np.array_equal(a1, b1)
    assert not np.array_equal(a0[:20], a1[:20])  # two different parts, not one copied


@pytest.mark.ray
def test_fineweb_reader_on_local_parquet_filters_and_splits(ray_cluster, tmp_path):
    n = 400
    pq.write_table(fineweb_table(n), tmp_path / "000_00000.parquet")
    cfg = DataConfig(source="fineweb", paths=[str(tmp_path / "*.parquet")], min_score=3.0, seq_len=47,
                     val_fraction=0.2, val_blocks=None, docs_per_batch=512)
    train, val = build_datasets(cfg, TOK)
    train = train.materialize()  # one execution for both checks below
    t_blocks, v_blocks = rows(train), rows(val)
    assert t_blocks.shape[1] == v_blocks.shape[1] == 48 and t_blocks.dtype == np.int32

    def ids(blocks, kind):
        return {int(i) for i in re.findall(rf"<{kind}-(\d+)>", TOK.decode(blocks.reshape(-1).tolist()))}

    assert not ids(t_blocks, "bad") and not ids(v_blocks, "bad")  # low-score documents are gone
    train_ids, val_ids = ids(t_blocks, "good"), ids(v_blocks, "good")
    assert not train_ids & val_ids  # disjoint
    assert len(train_ids) + len(val_ids) >= 0.9 * (n // 2)  # only packing tails are lost
    texts = fineweb_table(n)["text"].to_pylist()
    assert all(in_split([texts[i]], "val", 0.2)[0] for i in val_ids)  # the documented hash rule
    # what a Ray Train worker sees
    batch = next(iter(train.iter_torch_batches(batch_size=4)))
    assert tuple(batch["input_ids"].shape) == (4, 48)


@pytest.mark.ray
def test_local_jsonl_and_txt_sources(ray_cluster, tmp_path):
    docs_json = [f"json doc {i} with some words" for i in range(60)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for i, t in enumerate(docs_json):
            f.write(json.dumps({"body": t, "n": i}) + "\n")
    # txt: one document per blank-line-separated paragraph (the body column is for jsonl)
    paras = [f"text paragraph {i}\nsecond line {i}" for i in range(40)]
    (tmp_path / "b.txt").write_text("\n\n".join(paras[:20]) + "\n")
    (tmp_path / "c.txt").write_text("\n\n".join(paras[20:]) + "\n")
    cfg = DataConfig(source="local", paths=[str(tmp_path / "*.jsonl"), str(tmp_path / "*.txt")],
                     text_column="body", seq_len=63, val_fraction=0.0, shuffle_seed=None)
    train, val = build_datasets(cfg, TOK)
    assert val is None
    blocks = rows(train)
    assert blocks.shape[1] == 64
    found = whole_docs(blocks)
    assert found and set(found) <= set(docs_json) | set(paras)  # every EOS-delimited span is one document
    assert any(d in paras for d in found) and any(d in docs_json for d in found)
    text = TOK.decode(blocks.reshape(-1).tolist())
    assert sum(t in text for t in docs_json + paras) >= 0.9 * 100


@pytest.mark.ray
def test_generated_corpus_is_deterministic_correct_and_split(ray_cluster):
    cfg = DataConfig(source="generated", n_docs=1500, val_docs=300, min_hops=1, max_hops=4, seq_len=127,
                     docs_per_batch=256, val_blocks=None, seed=7)
    train, val = build_datasets(cfg, TOK)
    t_blocks, v_blocks = rows(train), rows(val)
    assert t_blocks.shape[1] == 128
    # deterministic: the same blocks again (shuffled order aside), independent of Ray's partitioning
    again, _ = build_datasets(cfg.replace(num_blocks=None), TOK)
    a = sorted(map(bytes, t_blocks)), sorted(map(bytes, rows(again)))
    assert a[0] == a[1]
    t_docs, v_docs = whole_docs(t_blocks), whole_docs(v_blocks)
    assert len(t_docs) > 600 and len(v_docs) > 100
    for d in t_docs + v_docs:  # every packed problem is well formed and its answer is right
        mapping, start, hops, answer = parse(d)
        assert 1 <= hops <= 4 and chase(mapping, start, hops)[-1] == answer
    assert not set(t_docs) & set(v_docs)  # validation problems come from another seed stream
    # block counts match the chunked packing: no block is lost or duplicated
    chunk_tokens = [sum(len(d) + 1 for d in corpus_documents(min(256, 1500 - s), range(1, 5), seed=7,
                                                                  start_index=s)) for s in range(0, 1500, 256)]
    assert len(t_blocks) == sum(t // 128 for t in chunk_tokens)
