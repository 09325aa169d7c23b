"""Serving: unit tests of the schemas and batching engine, then the live Serve app on a local Ray
(the openai client, plain HTTP, the loop-count field, bad requests, a bounded load). The stop-string
logic itself is tested in tests/test_stop.py."""

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from mythos import Mythos, get_variant
from mythos.checkpoint import save_pretrained
from mythos.generation import generate
from mythos.tokenizer import ByteTokenizer
from mythos_platform.config import ConfigError, load_config
from mythos_platform.serve.config import ServeConfig
from mythos_platform.serve.engine import Engine
from mythos_platform.serve.schemas import APIError, parse_request

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key-123"


# ---------------------------------------------------------------------------------------
# Unit tests (no Ray)
# ---------------------------------------------------------------------------------------
def test_config_files_validate_and_unknown_keys_are_named():
    cfg = load_config(ROOT / "jobs/configs/serve-debug.yaml", ["model.source=/tmp/m"], cls=ServeConfig)
    assert cfg.http.host == "127.0.0.1" and cfg.model.model_id() == "m"
    assert cfg.deployment.options()["num_replicas"] == 1
    auto = cfg.replace(deployment={**cfg.deployment.to_dict(), "autoscaling": {"enabled": True, "max_replicas": 3}})
    assert auto.deployment.options()["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ConfigError, match=r"limits\.max_tokns.*did you mean 'max_tokens'"):
        ServeConfig.from_dict({"limits": {"max_tokns": 3}})
    with pytest.raises(ConfigError, match=r"deployment\.max_ongoing_requests"):
        ServeConfig.from_dict({"batching": {"max_batch_size": 32}, "deployment": {"max_ongoing_requests": 8}})
    # the `serve deploy` file follows Serve's schema and its args are a valid ServeConfig
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load((ROOT / "jobs/configs/serve-deploy.yaml").read_text())
    app = ServeDeploySchema.model_validate(doc).applications[0]
    assert app.import_path == "mythos_platform.serve.app:app_builder"
    assert ServeConfig.from_dict(app.args).model.model_id() == "mythos-rdt"
    assert doc["http_options"]["host"] == "127.0.0.1"


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "json_invalid"),
    (b"[1, 2]", None, "model_type"),
    (b'{"model": "m", "prompt": "hi", "max_tokens": "5"}', "max_tokens", "int_type"),
    (b'{"model": "m", "prompt": "hi", "temperature": 3}', "temperature", "less_than_equal"),
    (b'{"model": "m", "prompt": "hi", "top_p": 0}', "top_p", "greater_than"),
    (b'{"model": "m", "prompt": "hi", "logprobs": 2}', "logprobs", "extra_forbidden"),
    (b'{"model": "m", "prompt": 5}', "prompt", None),
    (b'{"model": "m", "prompt": "hi", "stop": ["a", 3]}', "stop", None),
    (b'{"model": "m", "prompt": "hi", "n_loops": 0}', "n_loops", "greater_than_equal"),
    (b'{"model": "m", "prompt": "hi", "stream": "yes"}', "stream", "bool_type"),
    (b'{"prompt": "hi"}', "model", "missing"),
])
def test_request_validation_names_the_field(body, param, code):
    with pytest.raises(APIError) as info:
        parse_request(body)
    err = info.value
    assert err.status == 400 and err.param == param
    if code:
        assert err.code == code
    if param:  # the message starts with the field it is about
        assert err.message.startswith(f"{param}: "), err.message
    else:  # no field to name: the message says what is wrong with the body
        assert {"json_invalid": "not valid JSON", "model_type": "should be an object"}[code] in err.message


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return Engine(Mythos(get_variant("debug")), ByteTokenizer(), "m")


def test_batched_greedy_matches_solo_and_groups_split_by_loops(engine):
    prompts = ["Hello there", "A", "The quick brown fox"]
    solo = []
    for p in prompts:
        j = engine.job(engine.tokenizer.encode(p), 4, temperature=0.0, n_loops=2)
        engine.run_batch([j])
        solo.append(j.result()[0])
    jobs = [engine.job(engine.tokenizer.encode(p), 4, temperature=0.0, n_loops=2) for p in prompts]
    jobs.append(engine.job(engine.tokenizer.encode("x"), 3, temperature=0.0, n_loops=5))
    assert [len(g) for g in engine.groups(jobs, 8)] == [3, 1]
    engine.run_batch(jobs)
    assert [j.result()[0] for j in jobs[:3]] == solo
    assert [j.result()[1].loops_used for j in jobs] == [2, 2, 2, 5]
    assert jobs[3].result()[1].completion_tokens == 3
    # seeded sampling runs alone, so the seed alone decides its text
    seeded = [engine.job([65, 66], 4, temperature=1.0, seed=7) for _ in range(2)]
    assert len(engine.groups(seeded, 8)) == 2
    engine.run_batch(seeded)
    assert seeded[0].result()[0] == seeded[1].result()[0]


def test_engine_cuts_at_stop_strings_and_streams_the_rest():
    engine = Engine(served_model(), ByteTokenizer(), "m")
    prompt = [engine.eos_id, *b"Stop"]

    def run(**kw):
        job = engine.job(prompt, 10, temperature=0.0, **kw)
        engine.run_batch([job])
        return job

    full, done = run().result()
    assert done.reason == "length" and len(full) == 10
    stop = full[3:5]  # two byte tokens: the stop string spans tokens
    job = run(stop=["no such text", stop])
    text, done = job.result()
    assert text == full[:full.find(stop)] and done.reason == "stop" and done.completion_tokens == full.find(stop) + 2
    assert any(e.text for e in job.events[:-1])  # streamed as Delta events before Finished
    text, done = run(stop=[stop], stream=False).result()
    assert text == full[:full.find(stop)] and len(run(stream=False).events) == 1  # all text with Finished


# ---------------------------------------------------------------------------------------
# The live app on a local Ray
# ---------------------------------------------------------------------------------------
def served_model() -> Mythos:
    """The model the live app serves, rebuilt here to compare its answers with. At the debug
    variant's initialisation (std 0.02) the recurrent core barely moves the logits (by ~0.02, the
    greedy text is the last prompt byte repeated at any loop count), so it is initialised larger
    (std 0.1), where the loop count changes the greedy text. The embedding rows of all but the
    printable ASCII bytes are scaled down (tied embeddings: those tokens then never win the
    argmax), so answers are plain text and stop strings cut from them are whole characters."""
    torch.manual_seed(0)
    model = Mythos(get_variant("debug", init_std=0.1)).eval()
    with torch.no_grad():
        other = torch.ones(model.cfg.vocab_size, dtype=torch.bool)
        other[32:127] = False
        model.tok_emb.weight[other] *= 0.3
    return model


def served_greedy(model: Mythos, prompt: str, max_tokens: int, **kw):
    """(text, mean loops per step) of a greedy completion as the server computes it: the
    end-of-text token is put before the prompt, and ends the completion."""
    tok = ByteTokenizer()
    with torch.no_grad():
        out = generate(model, [[tok.eos_id, *tok.encode(prompt)]], max_new_tokens=max_tokens, temperature=0.0,
                       stop_tokens=(tok.eos_id,), **kw)
    return tok.decode(out.tokens[0]), sum(out.loops_used) / len(out.loops_used)


@pytest.fixture(scope="module")
def server(tmp_path_factory, free_port):
    import ray
    from ray import serve

    from mythos_platform.serve.deploy import deploy

    folder = tmp_path_factory.mktemp("served") / "tiny"
    save_pretrained(served_model(), folder, tokenizer=ByteTokenizer())
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, object_store_memory=300 * 1024**2, configure_logging=False)
    cfg = ServeConfig.from_dict({
        "model": {"source": str(folder)},
        "http": {"port": free_port()},
        "limits": {"max_tokens": 64, "max_loops": 12, "max_prompt_tokens": 480},
        "batching": {"max_batch_size": 16, "max_wait_ms": 30},
        "log_level": "WARNING",
    })
    try:
        url = deploy(cfg, api_key=API_KEY, timeout_s=240)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def _headers(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}



@pytest.mark.ray
def test_openai_client_completion_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    resp = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                      extra_body={"n_loops": 3})
    assert resp.object == "text_completion" and len(resp.choices) == 1
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens == 5 and 1 <= resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == 5 + resp.usage.completion_tokens
    assert resp.model_extra["mythos"]["n_loops"] == 3 and resp.model_extra["mythos"]["loops_used"] == 3
    # the server puts the end-of-text token before the prompt (the start-of-document signal, as
    # the lm-eval adapter does), and does not count it in usage
    assert resp.choices[0].text == served_greedy(served_model(), "Hello", 8, n_loops=3)[0]
    chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"n_loops": 3}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == resp.choices[0].text  # greedy: streaming gives the same text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == resp.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


@pytest.mark.ray
def test_loop_count_and_adaptive_exit_change_the_computation(server):
    """The served text at each loop count is the local model's at that count, and those differ: the
    server really runs the requested loops (a server that ignored n_loops, or exit_threshold, would
    return the same text for both and fail)."""
    import httpx

    def ask(**extra):
        r = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=60,
                       json={"model": "tiny", "prompt": "Loop", "max_tokens": 4, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        body = r.json()
        return body["choices"][0]["text"], body["mythos"]

    local = served_model()
    want = {n: served_greedy(local, "Loop", 4, n_loops=n) for n in (1, 8)}
    assert want[1][0] != want[8][0]  # the premise: with this model the loop count changes the text
    for n in (1, 8):
        text, info = ask(n_loops=n)
        assert (text, info["loops_used"]) == (want[n][0], n)
    # the model's default loop count when the field is left out
    default = get_variant("debug").n_loops
    text, info = ask()
    assert info["n_loops"] == default and text == served_greedy(local, "Loop", 4, n_loops=default)[0]
    # the adaptive exit: every state change is "small", so it exits after the first iteration
    early_text, early_loops = served_greedy(local, "Loop", 4, n_loops=8, exit_threshold=1e9)
    assert early_loops < 8 and early_text != want[8][0]
    text, info = ask(n_loops=8, exit_threshold=1e9)
    assert info["exit_threshold"] == 1e9 and (text, info["loops_used"]) == (early_text, early_loops)


@pytest.mark.ray
def test_stop_strings_seed_and_prompt_lists(server):
    import httpx

    def ask(**body):
        r = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=60,
                       json={"model": "tiny", "prompt": "Stop", "max_tokens": 10, "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()

    full = ask()["choices"][0]["text"]
    stop = full[3:5]  # two byte tokens: the stop string spans tokens
    cut = ask(stop=[stop])["choices"][0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full[:full.find(stop)]
    a, b = (ask(temperature=1.0, seed=11)["choices"][0]["text"] for _ in range(2))
    assert a == b
    many = ask(prompt=["Stop", "Other prompt"])
    assert [c["index"] for c in many["choices"]] == [0, 1] and many["choices"][0]["text"] == full
    assert many["usage"]["prompt_tokens"] == 4 + 12


@pytest.mark.ray
def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(server):
    import httpx

    good = {"model": "tiny", "prompt": "ok", "max_tokens": 2}
    cases = [
        (b"{not json", _headers(), 400, None),
        (json.dumps({**good, "max_tokens": "2"}), _headers(), 400, "max_tokens"),
        (json.dumps({**good, "max_tokens": 65}), _headers(), 400, "max_tokens"),
        (json.dumps({**good, "prompt": "x" * 481}), _headers(), 400, "prompt"),
        (json.dumps({**good, "prompt": "x" * 460, "max_tokens": 64}), _headers(), 400, "max_tokens"),
        (json.dumps({**good, "prompt": ""}), _headers(), 400, "prompt"),
        (json.dumps({**good, "n_loops": 13}), _headers(), 400, "n_loops"),
        (json.dumps({**good, "n_loops": 2.5}), _headers(), 400, "n_loops"),
        (json.dumps({**good, "exit_threshold": -1}), _headers(), 400, "exit_threshold"),
        (json.dumps({**good, "temperature": -0.5}), _headers(), 400, "temperature"),
        (json.dumps({**good, "frequency_penalty": 1}), _headers(), 400, "frequency_penalty"),
        (json.dumps({**good, "stop": ["a", "b", "c", "d", "e"]}), _headers(), 400, "stop"),
        (json.dumps({**good, "echo": True}), _headers(), 400, "echo"),
        (json.dumps({**good, "model": "gpt-4"}), _headers(), 404, "model"),
        (json.dumps(good), {}, 401, None),
        (json.dumps(good), _headers("wrong"), 401, None),
    ]
    with httpx.Client(timeout=60) as http:
        for body, headers, status, param in cases:
            r = http.post(f"{server}/v1/completions", content=body,
                          headers={**headers, "Content-Type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["message"], (body, err)
            if param:
                assert param in err["message"]
        assert http.get(f"{server}/v1/models").status_code == 401
        assert http.get(f"{server}/v1/nothing-here", headers=_headers()).status_code == 404
        r = http.post(f"{server}/v1/completions", json=good, headers=_headers())
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        health = http.get(f"{server}/health")  # no key needed: probes and load balancers
        assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.ray
def test_concurrent_load_has_no_errors_and_is_batched(server):
    import httpx

    n, concurrency = 200, 16
    before = httpx.get(f"{server}/health").json()["stats"]

    async def run() -> list[int]:
        sem = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=120, limits=limits, headers=_headers()) as http:
            async def one(i: int) -> int:
                async with sem:
                    r = await http.post(f"{server}/v1/completions", json={
                        "model": "tiny", "prompt": f"request {i}", "max_tokens": 3, "temperature": 0})
                    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
                    return 200 if ok else r.status_code
            return await asyncio.gather(*(one(i) for i in range(n)))

    t0 = time.perf_counter()
    codes = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert codes.count(200) == n, {c: codes.count(c) for c in set(codes)}
    assert elapsed < 90
    after = httpx.get(f"{server}/health").json()["stats"]
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    assert requests == n and requests / batches >= 2  # concurrent requests were batched together
