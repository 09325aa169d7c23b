import pytest
import torch

from mythos import CacheError, KVCache, Mythos, get_variant
from mythos.generation import SamplingParams, generate, stream
from mythos.slot_cache import SlotCache
from mythos.sizing import kv_cache_numbers_per_token

CONFIGS = {
    "gqa": get_variant("debug", max_seq_len=64),
    "mla": get_variant("debug", attn_type="mla", q_lora_rank=32, max_seq_len=64),
    # MoDA: depth entries are rebuilt in every pass, the cache holds what it holds for plain GQA
    "moda": get_variant("debug", moda=True, core_layers=2, max_seq_len=64),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    torch.manual_seed(0)
    return Mythos(CONFIGS[request.param]).eval()


@pytest.mark.parametrize("n_loops", [1, 4, 8])
def test_cached_decoding_equals_full_recomputation(model, n_loops):
    prompt = torch.randint(0, 256, (2, 9))
    cache = KVCache(batch=2, capacity=20)
    with torch.no_grad():
        out = model(prompt, n_loops=n_loops, cache=cache)
        seq = prompt
        steps = [out.logits[:, -1]]
        for _ in range(4):  # one-token appends
            nxt = steps[-1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            steps.append(model(nxt, n_loops=n_loops, cache=cache).logits[:, -1])
        chunk = torch.randint(0, 256, (2, 3))  # a multi-token append
        seq = torch.cat([seq, chunk], 1)
        chunk_logits = model(chunk, n_loops=n_loops, cache=cache).logits
        full = model(seq, n_loops=n_loops).logits
    for i, logits in enumerate(steps):
        torch.testing.assert_close(logits, full[:, 8 + i], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(chunk_logits, full[:, -3:], rtol=1e-4, atol=1e-4)
    assert cache.length == seq.shape[1]


def test_cache_bytes_match_the_accounting(model):
    cache = KVCache(batch=1, capacity=16)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 10)), n_loops=4, cache=cache)
    assert cache.bytes_per_token() == 4 * kv_cache_numbers_per_token(model.cfg, n_loops=4)


def test_more_loops_than_prefilled_is_an_error_not_garbage(model):
    cache = KVCache(batch=1, capacity=16)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)), n_loops=2, cache=cache)
        with pytest.raises(CacheError, match="n_loops=4 but the cache was filled with 2 loops"):
            model(torch.randint(0, 256, (1, 1)), n_loops=4, cache=cache)
        # fewer loops than prefilled is exact: iteration t's keys do not depend on later iterations
        model(torch.randint(0, 256, (1, 1)), n_loops=1, cache=cache)
    assert cache.n_loops == 1


def test_shared_loop_cache_size_independent_of_loops(model):
    sizes = []
    for n in (2, 8):
        cache = KVCache(batch=1, capacity=16, share_loops=True)
        with torch.no_grad():
            model(torch.randint(0, 256, (1, 6)), n_loops=n, cache=cache)
            out = model(torch.randint(0, 256, (1, 1)), n_loops=n + 3, cache=cache)  # more loops: allowed
        assert torch.isfinite(out.logits).all()
        sizes.append(cache.nbytes())
    assert sizes[0] == sizes[1]


def test_greedy_generate_matches_argmax_of_full_forward(model):
    prompt = [5, 17, 99, 3, 42]
    res = generate(model, [prompt], max_new_tokens=6, temperature=0.0, n_loops=3)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(model(torch.tensor([seq]), n_loops=3).logits[0, -1].argmax()))
    assert res.tokens[0] == seq[len(prompt):]
    assert res.finish_reasons == ["length"] and res.loops_used == [3] * 6


def test_left_padded_batch_rows_match_single_generation(model):
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
    batched = generate(model, prompts, max_new_tokens=5, temperature=0.0, n_loops=2)
    for i, p in enumerate(prompts):
        alone = generate(model, [p], max_new_tokens=5, temperature=0.0, n_loops=2)
        assert batched.tokens[i] == alone.tokens[0]


def test_sampling_controls(model):
    prompt = [[10, 20, 30]]
    a = generate(model, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    b = generate(model, prompt, max_new_tokens=8, temperature=1.0, seed=3)
    assert a.tokens == b.tokens
    greedy = generate(model, prompt, max_new_tokens=8, temperature=0.0)
    top1 = generate(model, prompt, max_new_tokens=8, temperature=0.7, top_k=1, seed=1)
    nucleus = generate(model, prompt, max_new_tokens=8, temperature=0.7, top_p=1e-6, seed=2)
    assert top1.tokens == greedy.tokens == nucleus.tokens


def test_stop_tokens_and_streaming(model):
    prompt = [[10, 20, 30]]
    first = generate(model, prompt, max_new_tokens=6, temperature=0.0).tokens[0]
    stopped = generate(model, prompt, max_new_tokens=6, temperature=0.0, stop_tokens=[first[2]])
    assert stopped.tokens[0] == first[: first.index(first[2])]
    assert stopped.finish_reasons == ["stop"]
    steps = list(stream(model, prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
    assert [int(s.tokens[0]) for s in steps] == first[:4]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"temperature": 0.0, "top_k": 5}, "temperature=0 means greedy"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"max_new_tokens": 0}, "max_new_tokens must be"),
        ({"max_new_tokens": 60}, "exceeds max_seq_len=64"),
        ({"n_loops": 0}, "n_loops must be"),
    ],
)
def test_bad_sampling_requests_raise_clear_errors(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [[1, 2, 3, 4, 5, 6, 7, 8]], **kwargs)


def test_prompt_too_long_or_empty(model):
    with pytest.raises(ValueError, match="more than max_seq_len=64"):
        generate(model, [list(range(70))], max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], max_new_tokens=1)


def test_adaptive_exit_uses_fewer_loops(model):
    res = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0.0, n_loops=32, exit_threshold=0.5)
    assert max(res.loops_used) < 32
    exact = generate(model, [[1, 2, 3]], max_new_tokens=3, temperature=0.0, n_loops=32)
    assert exact.loops_used == [32, 32, 32]


def test_slot_cache_rows_of_mixed_depth_equal_each_row_alone(model):
    """Rows with their own loop counts and exit thresholds, prompts of different lengths prefilled
    into scattered slots, decoded together: every row's logits and loop counts equal the same row
    decoded alone with a KVCache (to float32 rounding)."""
    torch.manual_seed(1)
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 9, 3, 7)]
    loops, exits, slots = [4, 1, 8, 2], [None, None, 0.05, None], [4, 1, 0, 3]

    def alone(prompt, n, exit_threshold):
        cache, logits, used = KVCache(1, 40), [], []
        ids = torch.tensor([prompt])
        for _ in range(6):
            out = model(ids, n_loops=n, cache=cache, exit_threshold=exit_threshold)
            logits.append(out.logits[0, -1])
            used.append(out.loops_used)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
        return logits, used

    with torch.no_grad():
        want = [alone(p, n, x) for p, n, x in zip(prompts, loops, exits)]
        cache = SlotCache(rows=6, capacity=40)
        thresholds = torch.tensor([-1.0 if x is None else x for x in exits])
        got = [([], []) for _ in prompts]
        for i, (p, n, slot) in enumerate(zip(prompts, loops, slots)):
            out = model(torch.tensor([p]), n_loops=torch.tensor([n]), cache=cache.batch([slot]),
                        exit_threshold=thresholds[i:i + 1])
            got[i][0].append(out.logits[0, -1])
            got[i][1].append(int(out.loops_used[0]))
        for _ in range(5):
            ids = torch.stack([g[0][-1].argmax() for g in got])[:, None]
            out = model(ids, n_loops=torch.tensor(loops), cache=cache.batch(slots), exit_threshold=thresholds)
            for i, g in enumerate(got):
                g[0].append(out.logits[i, -1])
                g[1].append(int(out.loops_used[i]))
    for (w_logits, w_used), (g_logits, g_used) in zip(want, got):
        assert g_used == w_used
        torch.testing.assert_close(torch.stack(g_logits), torch.stack(w_logits), rtol=1e-4, atol=1e-4)
    assert max(got[2][1]) < 8  # the exit row stopped early on its own; its neighbours did not
    assert cache.lengths[slots].tolist() == [len(p) + 5 for p in prompts]


def test_slot_cache_refuses_what_it_cannot_serve(model):
    cache = SlotCache(rows=2, capacity=8)
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 5)), n_loops=torch.tensor([2]), cache=cache.batch([0]))
        with pytest.raises(CacheError, match="n_loops=4 but row 0 of the cache was filled with 2 loops"):
            model(torch.randint(0, 256, (1, 1)), n_loops=torch.tensor([4]), cache=cache.batch([0]))
        with pytest.raises(CacheError, match="capacity 8 exceeded"):
            model(torch.randint(0, 256, (1, 4)), n_loops=torch.tensor([2]), cache=cache.batch([0]))
        cache.release(0)  # a freed row takes a new request of any depth
        model(torch.randint(0, 256, (1, 6)), n_loops=torch.tensor([4]), cache=cache.batch([0]))
    with pytest.raises(ValueError, match="rows must be distinct slots in 0..1"):
        cache.batch([0, 0])
    with pytest.raises(ValueError, match="n_loops per row must be 1 ints >= 1"):
        model(torch.randint(0, 256, (1, 2)), n_loops=torch.tensor([0]))


def test_rows_deepest_first_without_exits_take_the_slice_path_with_the_general_paths_numbers(model, monkeypatch):
    """Rows ordered deepest first with no exit threshold (the serving engine's usual pass) run a loop
    that reads nothing back and slices every row subset; it gives the general loop's logits, loop
    counts and cache entries bit for bit (the general loop is what a never-exiting threshold, -1,
    takes; MoDA keeps the general loop)."""
    from mythos.slot_cache import SlotBatch

    heads, selects = [], []
    head, select = SlotBatch.head, SlotBatch.select
    monkeypatch.setattr(SlotBatch, "head", lambda self, k: heads.append(k) or head(self, k))
    monkeypatch.setattr(SlotBatch, "select", lambda self, i: selects.append(len(i)) or select(self, i))
    torch.manual_seed(2)
    loops = [8, 8, 4, 2, 1]
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (6, 3, 8, 4, 5)]
    caches = [SlotCache(rows=5, capacity=40) for _ in range(2)]
    with torch.inference_mode():
        for cache in caches:
            for slot, (p, n) in enumerate(zip(prompts, loops)):
                model(torch.tensor([p]), n_loops=torch.tensor([n]), cache=cache.batch([slot]))
        ids = torch.randint(0, 256, (5, 1))
        for step in range(3):
            heads.clear(), selects.clear()
            fast = model(ids, n_loops=torch.tensor(loops), cache=caches[0].batch(range(5)))
            if model.cfg.moda:  # MoDA's depth memory keeps the general loop
                assert not heads and selects
            else:
                assert heads and not selects  # the slice path
            general = model(ids, n_loops=torch.tensor(loops), cache=caches[1].batch(range(5)),
                            exit_threshold=torch.full((5,), -1.0))
            assert selects
            assert torch.equal(fast.logits, general.logits) and fast.loops_used.tolist() == loops
            assert torch.equal(fast.loops_used, general.loops_used)
            ids = fast.logits[:, -1].argmax(-1, keepdim=True)
    for key, bufs in caches[0].buffers.items():
        assert all(torch.equal(a, b) for a, b in zip(bufs, caches[1].buffers[key])), key
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist()
