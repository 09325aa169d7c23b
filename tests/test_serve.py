"""Serving: unit tests of the schemas, chat templates, logprobs and batching engine, then the live Serve
app on a local Ray (the openai client's completions and chat completions, plain HTTP, the loop-count
field, echo and logprobs, stock lm-eval `local-completions` against the endpoint, bad requests, a
bounded load). The stop-string logic itself is tested in tests/test_stop.py."""

import asyncio
import json
import os
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
from mythos_platform.serve.chat_template import CHAT_TEMPLATE_FILE, ChatTemplate, ChatTemplateError
from mythos_platform.serve.config import ServeConfig
from mythos_platform.serve.engine import Engine
from mythos_platform.serve.logprobs import LogprobText, TokenLogprob
from mythos_platform.serve.schemas import APIError, ChatCompletionRequest, parse_request

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
    (b'{"model": "m", "prompt": "hi", "logprobs": -1}', "logprobs", "greater_than_equal"),
    (b'{"model": "m", "prompt": "hi", "logprob": 2}', "logprob", "extra_forbidden"),
    (b'{"model": "m", "prompt": "hi", "temperature": NaN}', "temperature", "finite_number"),
    (b'{"model": "m", "prompt": "hi", "top_p": Infinity}', "top_p", "finite_number"),
    (b'{"model": "m", "prompt": "hi", "n": 2}', "n", "unsupported_value"),
    (b'{"model": "m", "prompt": "hi", "best_of": 3}', "best_of", "unsupported_value"),
    (b'{"model": "m", "prompt": "hi", "frequency_penalty": 0.5}', "frequency_penalty", "unsupported_value"),
    (b'{"model": "m", "prompt": "hi", "presence_penalty": -1}', "presence_penalty", "unsupported_value"),
    (b'{"model": "m", "prompt": "hi", "suffix": "end"}', "suffix", "unsupported_value"),
    (b'{"model": "m", "prompt": "hi", "logit_bias": {"50": 5}}', "logit_bias", "unsupported_value"),
    (b'{"model": "m", "prompt": [1, "a"]}', "prompt", None),
    (b'{"model": "m", "prompt": 5}', "prompt", None),
    (b'{"model": "m", "prompt": "hi", "stop": ["a", 3]}', "stop[1]", "string_type"),
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
    if code == "finite_number":
        assert err.message == f"{param}: Input should be a finite number"


def test_neutral_values_that_clients_send_by_default_are_accepted():
    """What the openai client, LangChain or lm-eval send when the user sets nothing: nulls and the neutral
    values of features this server does not have. Each parses to the defaults."""
    neutral = {"model": "m", "prompt": "hi", "logprobs": None, "frequency_penalty": 0, "presence_penalty": 0.0,
               "best_of": 1, "suffix": None, "n": 1, "user": "someone", "logit_bias": {}, "temperature": None,
               "top_p": None, "stop": None, "stream": None, "seed": None, "max_tokens": None, "echo": False}
    req = parse_request(json.dumps(neutral).encode())
    default = parse_request(b'{"model": "m", "prompt": "hi"}')
    assert req.model_dump(exclude={"user", "echo"}) == default.model_dump(exclude={"user", "echo"})
    assert (req.temperature, req.top_p, req.n, req.logprobs, req.user) == (1.0, 1.0, 1, None, "someone")
    assert parse_request(b'{"model": "m", "prompt": [[1, 2], [3]]}').prompts() == [[1, 2], [3]]
    assert parse_request(b'{"model": "m", "prompt": [1, 2]}').prompts() == [[1, 2]]
    chat = parse_request(json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 1,
                                     "logprobs": None, "response_format": {"type": "text"}}).encode(),
                         ChatCompletionRequest)
    assert chat.logprobs is False and chat.messages[0].for_template() == {"role": "user", "content": "hi"}


@pytest.mark.parametrize("body, param, code", [
    ({"messages": []}, "messages", "too_short"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role", "literal_error"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]},
     "messages[0].content[0].type", "literal_error"),
    ({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}},
     "response_format", "unsupported_value"),
])
def test_chat_request_validation_names_the_nested_field(body, param, code):
    with pytest.raises(APIError) as info:
        parse_request(json.dumps({"model": "m", **body}).encode(), ChatCompletionRequest)
    assert (info.value.status, info.value.param, info.value.code) == (400, param, code)
    assert info.value.message.startswith(f"{param}: ")


def test_chat_template_from_the_model_folder_or_the_plain_default(tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    default = ChatTemplate.load(tmp_path)
    assert default.origin == "default"
    assert default.render(msgs) == "System: Be brief.\nUser: Hi\nAssistant:"
    assert default.render(msgs, add_generation_prompt=False) == "System: Be brief.\nUser: Hi\n"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"type": "byte", "chat_template": "{{ messages[-1].content }}"}))
    assert ChatTemplate.load(tmp_path).render(msgs) == "Hi"
    # the file wins over tokenizer_config.json; Hugging Face's variables and raise_exception work
    (tmp_path / CHAT_TEMPLATE_FILE).write_text(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}")
    hf = ChatTemplate.load(tmp_path, eos_token="</s>")
    assert hf.render(msgs[1:]) == "<|user|>Hi</s>"
    with pytest.raises(ChatTemplateError, match="no system role"):
        hf.render(msgs)
    # a template is data: the sandbox refuses to reach Python internals
    sneaky = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError, match="SecurityError|unsafe"):
        sneaky.render(msgs)


ENGINE_MODELS = {"gqa": get_variant("debug"), "mla": get_variant("debug", attn_type="mla", q_lora_rank=32)}


@pytest.mark.parametrize("attn", sorted(ENGINE_MODELS))
def test_mixed_depths_share_a_pass_and_each_row_gets_what_it_gets_alone(attn):
    """Rows of 1..16 loops, with and without the adaptive exit, greedy and seeded sampling, prompts of
    different lengths arriving at different steps, share the decode passes; each row's text equals
    the same request run alone (and greedy text equals `mythos.generation.generate`). A pass runs each
    row only for its own iterations: the core layer sees sum(loops) rows per pass, not max * rows."""
    torch.manual_seed(0)
    model = Mythos(ENGINE_MODELS[attn]).eval()
    tok = ByteTokenizer()
    specs = [("Hello there", dict(n_loops=1)), ("A", dict(n_loops=16)), ("The quick brown fox", dict(n_loops=4)),
             ("xy", dict(n_loops=8, exit_threshold=0.05)), ("Mixed depth", dict(n_loops=2)),
             ("seeded", dict(n_loops=4, temperature=0.9, top_k=20, seed=7)), ("jump", dict(n_loops=16))]

    def job(engine, i):
        text, kw = specs[i]
        kw = {"temperature": 0.0, **kw}
        return engine.job(tok.encode(text), 6 + i % 3, ignore_eos=True, **kw)

    solo = []
    for i in range(len(specs)):
        alone = Engine(model, tok, "m", max_rows=1)
        j = job(alone, i)
        alone.run([j])
        solo.append(j.result())
    engine = Engine(model, tok, "m", max_rows=4)  # fewer rows than requests: some wait for a free one
    seen: list[int] = []
    hook = model.core.layers[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    try:
        jobs = [job(engine, i) for i in range(len(specs))]
        engine.add(jobs[:2])
        engine.step()
        assert len(engine.rows) == 2
        seen.clear()
        engine.step()  # one decode pass: a 1-loop row and a 16-loop row
        assert len(seen) == 16 and sum(seen) == 1 + 16  # the shallow row ran one iteration, not 16
        engine.add(jobs[2:4])
        engine.step()
        engine.add(jobs[4:])
        occupancy = []
        while not all(j.done for j in jobs):
            engine.step()
            occupancy.append(len(engine.rows))
    finally:
        hook.remove()
    assert max(occupancy) == 4 and engine.queue_depth == 0 and engine.rows == []
    assert engine.cache.lengths.tolist() == [0, 0, 0, 0]  # every row released
    for i, j in enumerate(jobs):
        text, done = j.result()
        assert (text, done.completion_tokens, done.loops_used) == (solo[i][0], solo[i][1].completion_tokens,
                                                                  solo[i][1].loops_used), specs[i]
    assert jobs[3].result()[1].loops_used < 8  # the exit row stopped early, on its own
    assert [jobs[i].result()[1].loops_used for i in (0, 1, 2, 4)] == [1, 16, 4, 2]
    for i in (0, 2, 4):  # greedy rows: the library's own generation, one prompt alone
        text, kw = specs[i]
        ref = generate(model, [tok.encode(text)], max_new_tokens=6 + i % 3, temperature=0.0, n_loops=kw["n_loops"])
        assert tok.decode(ref.tokens[0]) == jobs[i].result()[0]


def test_a_cancelled_row_leaves_at_the_next_step_and_its_row_is_reused():
    torch.manual_seed(0)
    engine = Engine(Mythos(get_variant("debug")), ByteTokenizer(), "m", max_rows=2)
    a, b, c = (engine.job([65, 66, 67], 20, temperature=0.0, ignore_eos=True, n_loops=n) for n in (2, 3, 4))
    engine.add([a, b, c])
    engine.step()  # prefills a and b (a token each) and one decode pass (a second token)
    engine.step()  # a third
    assert [r.job for r in engine.rows] == [b, a] and engine.queue_depth == 1  # deepest first; c waits
    b.cancelled = True  # the client went away
    engine.step()
    assert b.result()[1].reason == "cancelled" and b.result()[1].completion_tokens == 3
    assert [r.job for r in engine.rows] == [c, a]  # c took the freed row, and runs deepest first
    assert engine.cache.lengths.tolist() == [3 + 1, 3 + 3]  # c: prompt + its first token; a: 3 more
    engine.run([a, c])
    assert a.result()[1].completion_tokens == c.result()[1].completion_tokens == 20


def test_rows_stay_deepest_first_in_contiguous_cache_rows_as_requests_come_and_go():
    """Arrivals and departures move at most a row per loop count; every row keeps its own entries."""
    torch.manual_seed(0)
    model = Mythos(get_variant("debug")).eval()
    tok = ByteTokenizer()
    depths = [2, 8, 1, 4, 8, 2, 16, 1]
    alone = []
    for i, n in enumerate(depths):
        e = Engine(model, tok, "m", max_rows=1)
        j = e.job([65 + i, 66, 67], 3 + i, temperature=0.0, ignore_eos=True, n_loops=n)
        e.run([j])
        alone.append(j.result()[0])
    engine = Engine(model, tok, "m", max_rows=5)
    jobs = [engine.job([65 + i, 66, 67], 3 + i, temperature=0.0, ignore_eos=True, n_loops=n)
            for i, n in enumerate(depths)]
    for j in jobs:  # one arrival per step: rows come and go in every order
        engine.add([j])
        engine.step()
        loops = [r.job.n_loops for r in engine.rows]
        assert loops == sorted(loops, reverse=True) and [r.slot for r in engine.rows] == list(range(len(loops)))
    engine.run(jobs)
    assert [j.result()[0] for j in jobs] == alone


def test_engine_cuts_at_stop_strings_and_streams_the_rest():
    engine = Engine(served_model(), ByteTokenizer(), "m")
    prompt = [engine.eos_id, *b"Stop"]

    def run(**kw):
        job = engine.job(prompt, 10, temperature=0.0, **kw)
        engine.run([job])
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


def direct_logprobs(model: Mythos, ids: list[int], n_loops: int | None = None) -> torch.Tensor:
    """(len(ids), V) log-softmax of one forward pass without cache or padding: row j scores ids[j + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids]), n_loops=n_loops).logits[0].float().log_softmax(-1)


def test_engine_logprobs_score_the_prompt_and_the_generated_tokens():
    """Echo scoring (the prefill's logits) and per-step logprobs equal one plain forward pass of the
    same tokens, whatever the batch neighbours, to float32 rounding (1e-5: the batched, cached pass
    adds the same numbers in another order)."""
    model = served_model()
    engine = Engine(model, ByteTokenizer(), "m")
    eos = engine.eos_id
    short, long = [eos, *b"Hi"], [eos, *b"The quick brown fox"]
    jobs = [engine.job(short, 3, temperature=0.0, logprobs=2, score_prompt_from=1, stream=False),
            engine.job(long, 0, temperature=0.0, logprobs=0, score_prompt_from=1),
            engine.job(long, 1, temperature=0.0, logprobs=1)]
    engine.run(jobs)
    text, done = jobs[0].result()
    entries = done.logprobs
    generated = [e.token for e in entries[len(short) - 1:]]
    assert len(entries) == len(short) - 1 + done.completion_tokens and ByteTokenizer().decode(generated) == text
    lp = direct_logprobs(model, short + generated)
    want = lp[:-1].gather(-1, torch.tensor(short[1:] + generated)[:, None])[:, 0]
    assert [e.logprob for e in entries] == pytest.approx(want.tolist(), abs=1e-5)
    for e, row in zip(entries, lp):
        top = row.topk(2)
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [v for _, v in e.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    # greedy: every generated token is the most likely one
    assert all(e.top[0][0] == e.token for e in entries[len(short) - 1:])
    # max_tokens=0: only the prompt is scored; no top tokens asked
    (_, only_prompt) = jobs[1].result()
    assert only_prompt.completion_tokens == 0 and only_prompt.loops_used == model.cfg.n_loops
    want = direct_logprobs(model, long)[:-1].gather(-1, torch.tensor(long[1:])[:, None])[:, 0]
    assert [e.logprob for e in only_prompt.logprobs] == pytest.approx(want.tolist(), abs=1e-5)
    assert all(e.top == [] for e in only_prompt.logprobs)
    # no echo: the generated token only
    assert [e.token for e in jobs[2].result()[1].logprobs] == [int(direct_logprobs(model, long)[-1].argmax())]


def test_logprob_token_strings_and_text_offsets():
    """Byte tokens of one UTF-8 character are written bytes:\\xNN and start where the character does;
    special tokens by name, so top_logprobs keys never collide."""
    tok = ByteTokenizer()
    ids = [*"aé b".encode(), tok.eos_id]
    out = LogprobText(tok).completions([TokenLogprob(t, -1.0, [(t, -1.0), (tok.pad_id, -2.0)]) for t in ids])
    assert out["tokens"] == ["a", "bytes:\\xc3", "bytes:\\xa9", " ", "b", "<|endoftext|>"]
    assert out["text_offset"] == [0, 1, 1, 2, 3, 4]
    assert out["top_logprobs"][1] == {"bytes:\\xc3": -1.0, "<|pad|>": -2.0}


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
def served_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("served") / "tiny"
    save_pretrained(served_model(), folder, tokenizer=ByteTokenizer())
    return folder


@pytest.fixture(scope="module")
def server(served_folder, free_port):
    import ray
    from ray import serve

    from mythos_platform.serve.deploy import deploy

    folder = served_folder
    ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False, object_store_memory=300 * 1024**2, configure_logging=False)
    cfg = ServeConfig.from_dict({
        "model": {"source": str(folder)},
        "http": {"port": free_port()},
        "limits": {"max_tokens": 64, "max_loops": 12, "max_prompt_tokens": 480},
        "batching": {"max_batch_size": 16},
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
def test_openai_client_chat_completions_streaming_and_not(server):
    """The openai client's chat.completions.create against the live app: the messages rendered by the
    default template (the served folder has none) and continued greedily as the local model does; the
    stream's deltas add up to the same text; the loop-count and exit extensions and logprobs apply."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    prompt = "System: Be brief.\nUser: Hello\nAssistant:"
    local = served_model()
    want = served_greedy(local, prompt, 8, n_loops=3)[0]
    resp = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"n_loops": 3})
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == want and resp.choices[0].logprobs is None
    assert resp.usage.prompt_tokens == len(prompt) and 1 <= resp.usage.completion_tokens <= 8
    assert resp.model_extra["mythos"] == {"n_loops": 3, "loops_used": 3, "exit_threshold": None}
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"n_loops": 3}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [resp.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == resp.usage.completion_tokens
    # the adaptive exit and logprobs (max_completion_tokens: the openai client's newer name)
    early_text, early_loops = served_greedy(local, prompt, 4, n_loops=8, exit_threshold=1e9)
    lp = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=4, temperature=0,
                                        logprobs=True, top_logprobs=2, extra_body={"n_loops": 8, "exit_threshold": 1e9})
    assert lp.choices[0].message.content == early_text
    assert lp.model_extra["mythos"]["loops_used"] == pytest.approx(early_loops, abs=1e-3) and early_loops < 8
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token for c in content)  # greedy


@pytest.mark.ray
def test_completions_logprobs_echo_and_token_prompts(server):
    """echo + logprobs score the prompt as one plain forward pass of the local model does (1e-4: the
    server's batched, cached prefill adds the same float32 numbers in another order)."""
    import httpx

    def ask(**body):
        r = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=60,
                       json={"model": "tiny", "temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()

    eos = ByteTokenizer().eos_id
    prompt = "Score me"
    ids = [eos, *prompt.encode()]
    want = direct_logprobs(served_model(), ids)[:-1].gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    body = ask(prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    c, lp = body["choices"][0], body["choices"][0]["logprobs"]
    assert (c["text"], c["finish_reason"]) == (prompt, "length")
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 0, "total_tokens": 8}
    assert body["mythos"]["loops_used"] == get_variant("debug").n_loops  # the prefill ran
    assert lp["tokens"] == list(prompt) and lp["text_offset"] == list(range(len(prompt)))
    assert lp["token_logprobs"] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 2 and max(top.values()) >= v for top, v in zip(lp["top_logprobs"], want))
    # what lm-eval's local-completions sends: token ids, echo, max_tokens=1, logprobs=1 -> the prompt's
    # entries, then the generated token's
    body = ask(prompt=list(prompt.encode()), echo=True, logprobs=1, max_tokens=1, seed=1234)
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"].startswith(prompt) and len(lp["token_logprobs"]) == len(prompt) + 1
    assert lp["token_logprobs"][:-1] == pytest.approx(want, abs=1e-4)
    assert lp["token_logprobs"][-1] == max(lp["top_logprobs"][-1].values())  # greedy
    # a prompt that starts with the prefix token itself gets no second one; nothing comes before it
    lp = ask(prompt=ids, echo=True, logprobs=0, max_tokens=0)["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert lp["tokens"][0] == "<|endoftext|>"
    # generated tokens only, without echo
    body = ask(prompt=prompt, logprobs=3, max_tokens=4)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == body["usage"]["completion_tokens"] and lp["text_offset"][0] == 0
    assert all(len(top) == 3 and v == max(top.values()) for top, v in zip(lp["top_logprobs"], lp["token_logprobs"]))
    # streamed: the echoed prompt first, then chunks whose logprobs continue (offsets included)
    whole = ask(prompt=prompt, echo=True, logprobs=1, max_tokens=4)["choices"][0]
    with httpx.stream("POST", f"{server}/v1/completions", headers=_headers(), timeout=60, json={
            "model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 4, "temperature": 0,
            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["text"] == prompt
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]
    streamed = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks if c["choices"][0]["logprobs"]), [])
                for k in ("tokens", "token_logprobs", "text_offset")}
    assert streamed == {k: whole["logprobs"][k] for k in streamed}
    # the tokenizer routes count as the completion route does (the prefix token first by default)
    r = httpx.post(f"{server}/tokenize", headers=_headers(), json={"prompt": prompt})
    assert r.status_code == 200 and r.json()["tokens"] == ids
    r = httpx.post(f"{server}/detokenize", headers=_headers(), json={"tokens": ids})
    assert r.json() == {"prompt": prompt}
    info = httpx.get(f"{server}/tokenizer_info", headers=_headers()).json()
    assert (info["eos_token_id"], info["prefix_token_id"], info["eos_token"]) == (eos, eos, None)


@pytest.mark.ray
def test_stock_lm_eval_local_completions_scores_as_the_in_process_adapter(server, served_folder, tmp_path):
    """The real `lm_eval` CLI with its stock `local-completions` model against the live app, on a local
    multiple-choice task: lm-eval tokenizes through the server's /tokenize (`tokenizer_backend=remote`),
    sends token ids with echo and logprobs, and reads the continuation's logprobs. Every choice's
    loglikelihood equals the in-process `mythos` adapter's on the same model folder to 1e-4 (the same
    float32 function of the same tokens; the server's cached prefill sums in another
    order, ~1e-6), and so the accuracy is identical."""
    import subprocess
    import sys

    from lm_eval import simple_evaluate

    from evals import MythosLM
    from evals.catalog import TASKS_DIR, task_manager

    limit, task = 8, "multihop_choice"
    cli = Path(sys.executable).with_name("lm_eval")
    model_args = (f"model=tiny,base_url={server}/v1/completions,tokenizer_backend=remote,auth_token={API_KEY},"
                  "max_retries=1")
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "DISABLE_MULTIPROC": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([str(cli), "run", "--model", "local-completions", "--model_args", model_args,
                           "--tasks", task, "--include_path", str(TASKS_DIR), "--limit", str(limit), "--batch_size", "4",
                           "--output_path", str(tmp_path), "--log_samples"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads(next(tmp_path.rglob("results_*.json")).read_text())["results"][task]
    lines = next(tmp_path.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
    served_ll = {(s["doc_id"], k): r[0][0] for s in map(json.loads, lines) for k, r in enumerate(s["resps"])}

    local = simple_evaluate(model=MythosLM(pretrained=str(served_folder), progress=False), tasks=[task],
                            task_manager=task_manager(), limit=limit, log_samples=True, bootstrap_iters=0)
    local_ll = {(s["doc_id"], k): r[0][0] for s in local["samples"][task] for k, r in enumerate(s["resps"])}
    assert len(served_ll) == 4 * limit and served_ll.keys() == local_ll.keys()
    assert [float(served_ll[key]) for key in local_ll] == pytest.approx(list(local_ll.values()), abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert served[metric] == local["results"][task][metric]


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
def test_a_client_that_disconnects_frees_its_row_and_the_others_go_on(server):
    """A streaming client goes away after its first chunk: its row leaves the engine at a following
    step (it does not generate its 60 tokens), while a request running beside it completes."""
    import threading

    import httpx

    long = {"model": "tiny", "prompt": "far away", "max_tokens": 60, "temperature": 0, "n_loops": 12,
            "ignore_eos": True, "stream": True}
    before = httpx.get(f"{server}/health").json()["stats"]
    other: dict = {}

    def neighbour() -> None:
        other["resp"] = httpx.post(f"{server}/v1/completions", headers=_headers(), timeout=120, json={
            **long, "stream": False, "max_tokens": 40, "n_loops": 2})

    thread = threading.Thread(target=neighbour)
    thread.start()
    with httpx.stream("POST", f"{server}/v1/completions", headers=_headers(), timeout=60, json=long) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first chunk, then the client hangs up
    deadline = time.monotonic() + 30
    while httpx.get(f"{server}/health").json()["stats"]["running_rows"] and time.monotonic() < deadline:
        time.sleep(0.2)
    thread.join(120)
    after = httpx.get(f"{server}/health").json()["stats"]
    assert after["running_rows"] == 0 and after["requests"] - before["requests"] == 2
    assert other["resp"].status_code == 200 and other["resp"].json()["usage"]["completion_tokens"] == 40
    assert after["tokens"] - before["tokens"] < 40 + 60  # the cancelled row stopped early


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
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "ok"}], "max_tokens": 2}
    plain = {"Content-Type": "text/plain"}
    cases = [  # (route, body, headers, status, param)
        ("completions", b"{not json", _headers(), 400, None),
        ("completions", json.dumps({**good, "max_tokens": "2"}), _headers(), 400, "max_tokens"),
        ("completions", json.dumps({**good, "max_tokens": 65}), _headers(), 400, "max_tokens"),
        ("completions", json.dumps({**good, "max_tokens": 0}), _headers(), 400, "max_tokens"),  # 0 needs echo
        ("completions", json.dumps({**good, "prompt": "x" * 481}), _headers(), 400, "prompt"),
        ("completions", json.dumps({**good, "prompt": "x" * 460, "max_tokens": 64}), _headers(), 400, "max_tokens"),
        ("completions", json.dumps({**good, "prompt": ""}), _headers(), 400, "prompt"),
        ("completions", json.dumps({**good, "prompt": [72, 999]}), _headers(), 400, "prompt[1]"),
        ("completions", json.dumps({**good, "n_loops": 13}), _headers(), 400, "n_loops"),
        ("completions", json.dumps({**good, "n_loops": 2.5}), _headers(), 400, "n_loops"),
        ("completions", json.dumps({**good, "exit_threshold": -1}), _headers(), 400, "exit_threshold"),
        ("completions", json.dumps({**good, "temperature": -0.5}), _headers(), 400, "temperature"),
        ("completions", json.dumps(good)[:-1] + ', "temperature": NaN}', _headers(), 400, "temperature"),
        ("completions", json.dumps({**good, "frequency_penalty": 1}), _headers(), 400, "frequency_penalty"),
        ("completions", json.dumps({**good, "n": 2}), _headers(), 400, "n"),
        ("completions", json.dumps({**good, "best_of": 2}), _headers(), 400, "best_of"),
        ("completions", json.dumps({**good, "suffix": "x"}), _headers(), 400, "suffix"),
        ("completions", json.dumps({**good, "logprobs": 21}), _headers(), 400, "logprobs"),
        ("completions", json.dumps({**good, "stop": ["a", "b", "c", "d", "e"]}), _headers(), 400, "stop"),
        ("completions", json.dumps({**good, "model": "gpt-4"}), _headers(), 404, "model"),
        ("completions", json.dumps(good), {**_headers(), **plain}, 415, None),
        ("completions", json.dumps(good), {}, 401, None),
        ("completions", json.dumps(good), _headers("wrong"), 401, None),
        ("chat/completions", json.dumps({**chat, "messages": [{"role": "bot", "content": "x"}]}), _headers(), 400,
         "messages[0].role"),
        ("chat/completions", json.dumps({**chat, "top_logprobs": 2}), _headers(), 400, "top_logprobs"),
        ("chat/completions", json.dumps({**chat, "presence_penalty": 0.3}), _headers(), 400, "presence_penalty"),
        ("chat/completions", json.dumps({**chat, "max_completion_tokens": 65}), _headers(), 400,
         "max_completion_tokens"),
        ("chat/completions", json.dumps(chat), {**_headers(), **plain}, 415, None),
    ]
    with httpx.Client(timeout=60) as http:
        for route, body, headers, status, param in cases:
            r = http.post(f"{server}/v1/{route}", content=body,
                          headers={"Content-Type": "application/json", **headers})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["message"], (body, err)
            if param:
                assert err["message"].startswith(f"{param}: "), (body, err)
            if "NaN" in str(body):
                assert err["message"] == "temperature: Input should be a finite number"
            if status == 415:
                assert "text/plain" in err["message"] and "application/json" in err["message"]
        assert http.get(f"{server}/v1/models").status_code == 401
        assert http.get(f"{server}/v1/nothing-here", headers=_headers()).status_code == 404
        # the neutral values clients send by default are accepted
        neutral = {"logprobs": None, "frequency_penalty": 0, "presence_penalty": 0, "best_of": 1, "suffix": None,
                   "n": 1, "user": "someone"}
        r = http.post(f"{server}/v1/completions", json={**good, **neutral}, headers=_headers())
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        neutral = {"logprobs": None, "top_logprobs": None, "frequency_penalty": 0, "presence_penalty": 0, "n": 1,
                   "user": "someone", "logit_bias": {}, "response_format": {"type": "text"}}
        r = http.post(f"{server}/v1/chat/completions", json={**chat, **neutral}, headers=_headers())
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
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
    requests, steps = after["requests"] - before["requests"], after["steps"] - before["steps"]
    decoded = after["decoded"] - before["decoded"]  # (the first token of each comes from its prefill)
    assert requests == n and decoded == n * 2 and decoded / steps >= 2  # concurrent requests shared the passes
    assert after["running_rows"] == after["queue_depth"] == 0
    # the Prometheus route counts the same
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(httpx.get(f"{server}/metrics").text) for s in fam.samples}
    assert samples.get(("mythos_requests_total", (("outcome", "ok"), ("route", "/v1/completions"))), 0) >= n, samples
    assert samples[("mythos_batch_rows_count", ())] == after["steps"]
    assert samples[("mythos_batch_rows_sum", ())] == after["decoded"]
    assert samples[("mythos_generated_tokens_total", ())] == after["tokens"]
    # every request that generated has its loops observed (echo-only requests of earlier tests have none)
    assert n <= samples[("mythos_loops_per_request_count", ())] <= after["requests"]
    assert samples[("mythos_queue_depth", ())] == 0 and samples[("mythos_step_seconds_count", ())] == after["steps"]


@pytest.mark.ray
def test_killed_replica_is_restarted_and_serves_again_under_load(server):
    """SIGKILL the model replica's process while 4 clients send requests (bounded: 6 s of load
    before the kill, at most 90 s in all; the last test of the module, as it restarts the app's
    replica): the Serve controller starts a new replica and every request after the recovery
    succeeds. Requests in flight at the kill or sent before the recovery fail with a 5xx or a broken
    connection (their count is printed), never with a hang past the client timeout."""
    import signal
    import threading

    import httpx
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address

    def replica_pid() -> int | None:
        alive = list_actors(address=address, detail=True, filters=[
            ("class_name", "=", "ServeReplica:mythos:MythosServer"), ("state", "=", "ALIVE")])
        return alive[0].pid if alive else None

    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0}
    results: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    code: int | str = http.post(f"{server}/v1/completions", json=body, headers=_headers()).status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                results.append((t, code))

    old = replica_pid()
    assert old is not None
    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(6)
    before = len(results)
    killed_at = time.monotonic()
    os.kill(old, signal.SIGKILL)
    deadline = killed_at + 90
    while time.monotonic() < deadline and (replica_pid() in (None, old)):
        time.sleep(0.5)
    new = replica_pid()
    assert new not in (None, old), "the controller did not start a new replica within 90 s"
    # recovered: a request succeeds, then 5 s more of load
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{server}/v1/completions", json=body, headers=_headers(), timeout=30).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    recovered_at = time.monotonic()
    time.sleep(5)
    stop.set()
    for th in threads:
        th.join(timeout=40)
    assert before >= 8 and all(code == 200 for t, code in results[:before])  # the load ran before the kill
    in_flight = [code for t, code in results[before:] if t < killed_at]  # sent before the kill, answered after
    during = in_flight + [code for t, code in results if killed_at <= t < recovered_at]
    after = [code for t, code in results if t >= recovered_at + 1.0]
    assert after and all(code == 200 for code in after), after
    failed = [c for c in during if c != 200]
    assert all(c in ("RemoteProtocolError", "ReadError", "ConnectError") or (isinstance(c, int) and c >= 500)
               for c in failed), failed
    print(f"replica {old} killed; {new} serving after {recovered_at - killed_at:.1f} s; "
          f"{len(failed)} of {len(during)} requests sent meanwhile failed; {len(after)} after, all 200")
