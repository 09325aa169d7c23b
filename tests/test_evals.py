"""lm-eval integration: request types against direct computation, local tasks, CLI, the evaluation job,
the Ray fan-out over loop counts (mythos_platform.evaluation)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals import catalog
from evals.lm_model import MythosLM
from evals.task_data import floor_start_symbol
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from mythos import Mythos, get_variant
from mythos.generation import generate
from mythos.tokenizer import ByteTokenizer
from mythos_platform.config import load_config
from mythos_platform.data import eval_tasks
from mythos_platform.data.multihop import generate_problems, render
from mythos_platform.evaluation import LoopEvalConfig, run_loop_eval
from mythos_platform.evaluation.runner import finished_earlier, model_digest
from mythos_platform.registry import ModelNotFoundError

ROOT = Path(__file__).resolve().parents[1]
EOS = ByteTokenizer().eos_id


def req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A debug-size model folder (random weights) in the serving format, as an export writes it."""
    from mythos.checkpoint import save_pretrained

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("demo")
    save_pretrained(Mythos(get_variant("debug")), folder, tokenizer=ByteTokenizer())
    return folder


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Mythos(get_variant("debug", max_seq_len=32)).eval()


def direct_logprobs(model, ids: list[int], n_loops: int) -> torch.Tensor:
    """(len(ids) - 1,) log p(ids[i+1] | ids[:i+1]) from one forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]), n_loops=n_loops).logits[0].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_model_is_registered_beside_the_stock_ones():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("mythos") is MythosLM
    assert "hf" in model_registry  # registering ours did not hide lm-eval's own


def test_loglikelihood_equals_summed_log_softmax_of_one_forward(tiny):
    lm = MythosLM(model=tiny, tokenizer=ByteTokenizer(), n_loops=3, batch_size=2, progress=False)
    pairs = [("the cat", " sat"), ("a", "bcdef"), ("hello world", "!"), ("x y", " z"), ("the cat", " ran")]
    out = lm.loglikelihood([req("loglikelihood", c, x) for c, x in pairs])
    for (ctx, cont), (ll, greedy) in zip(pairs, out):
        ids = [EOS, *ctx.encode(), *cont.encode()]
        lp = direct_logprobs(tiny, ids, 3)[-len(cont.encode()):]
        assert ll == pytest.approx(float(lp.sum()), abs=1e-4)
        with torch.no_grad():
            logits = tiny(torch.tensor([ids[:-1]]), n_loops=3).logits[0, -len(cont):]
        assert greedy == bool((logits.argmax(-1) == torch.tensor(list(cont.encode()))).all())
    # continuation tokens are those of the full string: a trailing context space moves over
    (a, _), (b, _) = lm.loglikelihood([req("loglikelihood", "the cat ", "sat"),
                                       req("loglikelihood", "the cat", " sat")])
    assert a == pytest.approx(b, abs=1e-6)
    assert lm.mean_loops_used == 3


def test_loglikelihood_rolling_is_the_full_sequence_sum_and_windows_beyond_context(tiny):
    lm = MythosLM(model=tiny, tokenizer=ByteTokenizer(), n_loops=2, batch_size=4, progress=False)
    short, long = "ab cd ef gh", "the quick brown fox jumps over the lazy dog " * 2  # 11 and 88 bytes; context 32
    got_short, got_long = lm.loglikelihood_rolling([req("loglikelihood_rolling", short),
                                                    req("loglikelihood_rolling", long)])
    assert got_short == pytest.approx(float(direct_logprobs(tiny, [EOS, *short.encode()], 2).sum()), abs=1e-4)
    want = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(list(long.encode()), EOS, 32, 1)):
        assert len(ctx) + len(cont) - 1 <= 32
        want += float(direct_logprobs(tiny, ctx + cont, 2)[-len(cont):].sum())
    assert got_long == pytest.approx(want, abs=1e-3)


def test_generate_until_matches_greedy_decoding_with_stops_and_budget(demo):
    lm = MythosLM(pretrained=str(demo), n_loops=2, batch_size=4, progress=False)
    prompts = ["nb cj ph mc ", "ab cd "]
    refs = []
    for p in prompts:
        toks = generate(lm.model, [[EOS, *p.encode()]], max_new_tokens=9, temperature=0.0, n_loops=2,
                        stop_tokens=[EOS]).tokens[0]
        refs.append(bytes(toks).decode())
    free = lm.generate_until([req("generate_until", p, {"until": [], "max_gen_toks": 9}) for p in prompts])
    assert free == refs and all(len(t) <= 9 for t in free)
    assert any(" " in r for r in refs)  # the model writes more pairs, so a stop sequence has work to do
    stopped = lm.generate_until([req("generate_until", p, {"until": [" "], "max_gen_toks": 9}) for p in prompts])
    assert stopped == [r.split(" ")[0] for r in refs]
    short = lm.generate_until([req("generate_until", prompts[0], {"until": ["\n"], "max_gen_toks": 2})])
    assert short == [refs[0][:2]]


def test_adaptive_exit_reports_the_loops_it_ran(demo):
    problems = generate_problems(6, 4, seed=1004)
    prompts = [render(p) for p in problems]
    lm = MythosLM(pretrained=str(demo), n_loops=16, exit_threshold=0.2, batch_size=8, progress=False)
    lm.loglikelihood([req("loglikelihood", q, a) for q, a in prompts])
    with torch.no_grad():
        ids = torch.tensor([[EOS, *q.encode()] for q, _ in prompts])
        used = lm.model(ids, n_loops=16, exit_threshold=0.2).loops_used
    assert lm.mean_loops_used == used < 16


def test_task_data_is_reproducible_and_held_out():
    assert eval_tasks.stale_files() == []
    rows = [json.loads(line) for line in (catalog.TASKS_DIR / "data/multihop_k6.jsonl").read_text().splitlines()]
    assert len(rows) == eval_tasks.N_PER_TASK and all(r["hops"] == 6 and r["prompt"].endswith(">" * 6 + "=")
                                                      for r in rows)
    train = {render(p)[0] for p in generate_problems(2000, range(1, 5), seed=0)}
    assert not train & {r["prompt"] for r in rows}
    floor = floor_start_symbol("multihop_k6")
    assert floor == sum(r["answer"] == r["start"] for r in rows) / len(rows)
    assert floor_start_symbol("multihop_ppl") is None


def test_local_tasks_resolve_offline_and_bad_names_fail_in_one_line(monkeypatch):
    res = catalog.resolve_tasks("multihop,multihop_choice")
    assert res.leaves == [f"multihop_k{k}" for k in range(1, 9)] + ["multihop_choice"] and not res.needs_stock
    with pytest.raises(catalog.UnknownTaskError, match="no_such_task.*not a local task.*multihop_choice"):
        catalog.resolve_tasks(["multihop_k1", "no_such_task"])
    monkeypatch.setattr(catalog, "hub_reachable", lambda timeout=3.0: False)
    for var in catalog.OFFLINE_ENV:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(catalog.TaskUnavailableError, match="arc_easy .dataset allenai/ai2_arc.*Hugging Face hub"):
        catalog.resolve_tasks(["arc_easy"])


def test_cli_unknown_task_and_model_fail_clearly(demo, capsys):
    from evals import cli

    assert cli.main(["--model", "mythos", "--model_args", f"pretrained={demo}", "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "unknown task(s) no_such_task" in err and "Traceback" not in err
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        MythosLM(pretrained="/nonexistent/model")
    with pytest.raises(TypeError, match="unknown model argument.*n_loop"):
        MythosLM(model=Mythos(get_variant("debug", max_seq_len=32)), tokenizer=ByteTokenizer(), n_loop=3)


def test_cli_runs_a_local_task(demo, tmp_path):
    script = Path(sys.executable).with_name("mythos-lm-eval")  # pyproject [project.scripts]: python -m evals.cli
    assert script.is_file()
    cmd = [str(script), "--model", "mythos", "--model_args", f"pretrained={demo},n_loops=2",
           "--tasks", "multihop_k1", "--limit", "8", "--output_path", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "multihop_k1" in proc.stdout and "acc" in proc.stdout
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    assert results["results"]["multihop_k1"]["acc,none"] in [i / 8 for i in range(9)]
    assert results["config"]["model"] == "mythos"


def evaluate_job(argv: list[str]) -> int:
    """`python jobs/evaluate.py ARGV` in process (`mythos evaluate ARGV`)."""
    from mythos_platform.cli import run_job

    return run_job("evaluate", argv)


def test_job_rejects_unknown_model_before_starting_ray(tmp_path, capsys):
    cfg = ["--config", str(ROOT / "jobs/configs/evaluate-debug.yaml"), "--set", f"run_root={tmp_path}"]
    # bad keys and values fail in one line naming the dotted key, exit status 2, before any Ray work
    for sets, message in ((["loopz=[1, 2]"], "loopz: unknown key (did you mean 'loops'?)"),
                          (["loops=[0, 2]"], "loops: got [0, 2]; must be positive ints"),
                          (["exit_on=first"], "exit_on: got 'first'; allowed: 'all', 'last'"),
                          (["limit=many"], "limit: got 'many'; expected a number")):
        assert evaluate_job([*cfg, *(a for s in sets for a in ("--set", s))]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "eval").exists()  # nothing written either
    assert evaluate_job([*cfg, "--model", str(tmp_path / "missing"), "--tasks", "multihop_k1"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_job_config_file_and_convenience_flags(tmp_path):
    from mythos_platform.cli import parser

    shipped = load_config(ROOT / "jobs/configs/evaluate-debug.yaml", cls=LoopEvalConfig)
    assert shipped == LoopEvalConfig(model="runs/debug/export/debug")  # the file sets the model; the rest are defaults

    def config(*argv: str) -> LoopEvalConfig:
        args = parser(only="evaluate").parse_args(["evaluate", *argv])
        return load_config(ROOT / "jobs/configs/evaluate-debug.yaml", args.overrides, cls=LoopEvalConfig)

    # --model / --tasks are --set model=... / tasks=[...], in command-line order with the --sets
    cfg = config("--tasks", "multihop_k1,on", "--model", "models:/m@a", "--set", "limit=8.0")
    assert cfg.tasks == ["multihop_k1", "on"] and cfg.model == "models:/m@a"
    assert cfg.limit == 8 and isinstance(cfg.limit, int)  # a count, as lm-eval takes it
    cfg = config("--tasks", "multihop_k1", "--set", "tasks=[multihop_k2]", "--set", "model=a", "--model", "b")
    assert cfg.tasks == ["multihop_k2"] and cfg.model == "b"
    # run as a script (ray job submit ... -- python jobs/evaluate.py), from another folder
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/evaluate.py"), "--config",
                           str(ROOT / "jobs/configs/evaluate-debug.yaml"), "--set", "batch_size=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "batch_size: got 0; must be >= 1" in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------------------------ Ray: loop counts fanned out


@pytest.mark.ray
def test_loop_eval_logs_per_loop_metrics_plot_and_tables(demo, ray_cluster, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = LoopEvalConfig(model=str(demo), loops=[1, 2], tasks=["multihop_k1"], exit_thresholds=[0.2],
                         exit_max_loops=4, limit=8, batch_size=8, cpus_per_task=0.5, run_root=str(tmp_path),
                         run_name="t")
    res = run_loop_eval(cfg, progress=None)
    assert not res.failures and len(res.points) == 3
    client = MlflowClient(res.tracking_uri)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED" and client.get_experiment(run.info.experiment_id).name == "mythos-eval"
    acc = {m.step: m.value for m in client.get_metric_history(res.run_id, "multihop_k1/acc")}
    assert sorted(acc) == [1, 2]
    # the value at 2 loops is the greedy-answer accuracy computed directly from the model
    model = MythosLM(pretrained=str(demo), n_loops=2, progress=False).model
    rows = [json.loads(line) for line in (catalog.TASKS_DIR / "data/multihop_k1.jsonl").read_text().splitlines()[:8]]
    with torch.no_grad():
        logits = model(torch.tensor([[EOS, *r["prompt"].encode()] for r in rows]), n_loops=2).logits[:, -1]
    assert acc[2] == pytest.approx(float((logits.argmax(-1) == torch.tensor([ord(r["answer"]) for r in rows])).float()
                                         .mean()))
    used = client.get_metric_history(res.run_id, "multihop_k1/mean_loops/exit_0.2")
    assert len(used) == 1 and used[0].step == 4 and 1 <= used[0].value <= 4
    assert client.get_metric_history(res.run_id, "multihop_k1/acc/exit_0.2")
    arts = {Path(a.path).name for a in client.list_artifacts(res.run_id, "results")}
    assert {"accuracy_vs_loops.png", "results.md", "results.csv", "results.json"} <= arts
    assert (res.out_dir / "accuracy_vs_loops.png").read_bytes()[:4] == b"\x89PNG"
    assert "| multihop_k1 | acc | 0.125 |" in res.table_md and "exit 0.2 (cap 4)" in res.table_md
    # the same evaluation launched again (a relaunched pipeline) finds its finished results: nothing
    # is scored again and no second MLflow run is made; another config or other model bytes score anew
    again = run_loop_eval(cfg, progress=None)
    assert again.reused and again.run_id == res.run_id and again.points == res.points
    assert again.table_md == res.table_md and again.plot_path == res.plot_path
    assert len(client.search_runs([run.info.experiment_id], "attributes.run_name = 't'")) == 1
    assert finished_earlier(cfg.updated({"limit": 4}), res.out_dir, res.model_dir, model_digest(res.model_dir)) is None
    assert finished_earlier(cfg, res.out_dir, res.model_dir, "0" * 64) is None
    assert finished_earlier(cfg, res.out_dir, res.model_dir, model_digest(res.model_dir)) is not None
    client.set_terminated(res.run_id, status="KILLED")  # a run that did not finish is scored again
    assert finished_earlier(cfg, res.out_dir, res.model_dir, model_digest(res.model_dir)) is None
