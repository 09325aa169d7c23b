"""The compiled loop body (mythos/compile.py): one compile serves every iteration and loop count,
the compiled model computes what the eager one does, keys and the trainer's build path.

The tests compile with a counting backend around "eager" / "aot_eager" (no code generation: fast);
what inductor buys is measured by `benchmarks/model_bench.py --compile-size` (docs/performance.md)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.backends.registry import lookup_backend

from mythos import Mythos, MythosConfig
from mythos.compile import apply_compile, compile_loop_body, compile_wanted, is_compiled
from mythos.generation import SamplingParams, generate
from mythos_platform.train.parallel import blocks, build_model

TINY = dict(dim=64, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=64, train_loops_max=16, loop_emb_dim=16,
            core_layers=2, lora_rank=4, bptt_depth=2)
CONFIGS = {
    "gqa": MythosConfig(**TINY, n_experts=0),
    "gqa-moe": MythosConfig(**TINY, n_experts=4, top_k=2, expert_dim=32),
    "gqa-moda": MythosConfig(**TINY, n_experts=0, moda=True),
}


class Counting:
    """A torch.compile backend that counts compiled graphs and the calls into them."""

    def __init__(self, inner: str = "eager") -> None:
        self.inner = lookup_backend(inner)
        self.compiles = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        compiled = self.inner(gm, example_inputs)

        def run(*args):
            self.calls += 1
            return compiled(*args)

        return run


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # graphs are cached per code object across models: start each test empty
    yield
    torch._dynamo.reset()


def pair(cfg: MythosConfig, backend) -> tuple[Mythos, Mythos]:
    torch.manual_seed(0)
    eager = Mythos(cfg)
    compiled = Mythos(cfg)
    compiled.load_state_dict(eager.state_dict())
    compile_loop_body(compiled, backend=backend)
    return eager, compiled


def train_step(model: Mythos, x: torch.Tensor, loops: int, bptt: int) -> torch.Tensor:
    model.train()
    out = model(x, targets=x, n_loops=loops, bptt_depth=bptt)
    (out.loss + out.aux_loss).backward()
    return out.loss.detach()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_no_recompile_across_loop_counts_1_to_16(name):
    """After a warm-up (loop counts with truncated and differentiated iterations, and an eval pass)
    every loop count 1..16, in training with truncated backprop and in eval, reuses the compiled
    graphs, which run at every iteration of every core layer. (MoDA's depth axis, t + 1 entries,
    takes two graphs per mode: one entry, and any number, which the warm-up's loop counts reach.)"""
    cfg, backend = CONFIGS[name].replace(core_layers=1), Counting()
    _, model = pair(cfg, backend)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    train_step(model, x, loops=1, bptt=2)
    train_step(model, x, loops=4, bptt=2)
    with torch.no_grad():
        model.eval()(x, n_loops=2)
    warm = backend.compiles
    assert warm > 0
    for n in range(1, 17):
        before = backend.calls
        train_step(model, x, loops=n, bptt=2)
        assert backend.calls - before >= n * cfg.core_layers  # every iteration ran the compiled block
        with torch.no_grad():
            before = backend.calls
            model.eval()(x, n_loops=n)
            assert backend.calls - before >= n * cfg.core_layers
    assert backend.compiles == warm


@pytest.mark.parametrize("name", ["gqa", "gqa-moe"])
def test_compiled_outputs_and_gradients_equal_eager(name):
    cfg = CONFIGS[name]
    backend = Counting("aot_eager")
    eager, compiled = pair(cfg, backend)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    for loops in (1, 5):
        loss_e = train_step(eager, x, loops, bptt=2)
        loss_c = train_step(compiled, x, loops, bptt=2)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for (n, p), q in zip(eager.named_parameters(), compiled.parameters()):
        if p.grad is None:
            assert q.grad is None, n
        else:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    for (n, b), c in zip(eager.named_buffers(), compiled.buffers()):  # e.g. the experts' load count
        torch.testing.assert_close(c, b, msg=n)
    with torch.no_grad():
        out_e = eager.eval()(x, n_loops=7).logits
        out_c = compiled.eval()(x, n_loops=7).logits
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    assert backend.calls > 0


def test_decode_with_a_kv_cache_equals_eager_without_recompiling_per_token_or_loop_count():
    """Generation (prefill, then one token per pass, reading and extending the KV cache) through the
    compiled blocks gives the eager tokens; after a warm-up that has seen a second prompt length and
    cache size (they become symbolic), new loop counts and lengths compile nothing."""
    cfg = CONFIGS["gqa"]
    backend = Counting()
    eager, compiled = pair(cfg, backend)
    eager.eval(), compiled.eval()
    for prompt, new in (([1, 2, 3, 4, 5], 3), ([7, 3, 9], 6)):
        params = SamplingParams(max_new_tokens=new, temperature=0.0, n_loops=4)
        assert generate(compiled, [prompt], params) == generate(eager, [prompt], params)
    warm = backend.compiles
    for loops in (1, 9, 16):
        params = SamplingParams(max_new_tokens=5, temperature=0.0, n_loops=loops)
        before = backend.calls
        assert generate(compiled, [[5, 4, 3, 2]], params) == generate(eager, [[5, 4, 3, 2]], params)
        assert backend.calls - before >= 5 * loops * cfg.core_layers
    assert backend.compiles == warm


def test_state_dict_keys_do_not_change():
    cfg = CONFIGS["gqa-moe"]
    plain, compiled = pair(cfg, Counting())
    assert all(is_compiled(layer) for layer in compiled.core.layers)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in compiled.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    plain.load_state_dict(compiled.state_dict())  # strict, both ways
    compiled.load_state_dict(plain.state_dict())


def test_the_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compile_wanted("on", cpu) and compile_wanted("auto", cuda)
    assert not compile_wanted("auto", cpu) and not compile_wanted("off", cuda)
    with pytest.raises(ValueError, match="compile: got 'yes'"):
        compile_wanted("yes", cpu)
    model = Mythos(CONFIGS["gqa"])
    assert not apply_compile(model, "off", cpu) and not any(is_compiled(m) for m in model.modules())
    assert apply_compile(model, "on", cpu) and all(is_compiled(layer) for layer in model.core.layers)


def test_build_model_compiles_the_loop_body_when_asked():
    cfg, cpu = CONFIGS["gqa-moe"], torch.device("cpu")
    on = build_model(cfg, "ddp", cpu, False, seed=0, compile="on")
    assert all(is_compiled(layer) for layer in on.core.layers)
    assert not any(is_compiled(b) for b in (*on.prelude, *on.coda))  # the loop body only
    for mode in ("off", "auto"):  # auto: off on a CPU (docs/performance.md)
        model = build_model(cfg, "ddp", cpu, False, seed=0, compile=mode)
        assert not any(is_compiled(m) for m in model.modules())


@pytest.mark.parametrize("mode", ["block", "iteration"])
def test_compiled_blocks_under_activation_checkpointing_give_the_eager_gradients(mode):
    """build_model's order: activation checkpointing, then compile. The differentiated iterations'
    blocks run compiled too (block: compiled inside the checkpoint; iteration: the checkpointed
    iteration calls compiled blocks), and the gradients are the eager ones."""
    from mythos_platform.train.activation_checkpointing import apply_activation_checkpointing

    cfg, backend = CONFIGS["gqa-moe"], Counting("aot_eager")
    torch.manual_seed(0)
    eager, model = Mythos(cfg), Mythos(cfg)
    model.load_state_dict(eager.state_dict())
    apply_activation_checkpointing(model, mode)
    compile_loop_body(model, backend=backend)
    assert all(is_compiled(layer) for layer in model.core.layers)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(train_step(model, x, 3, 2), train_step(eager, x, 3, 2))
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=n)
    before = backend.calls
    train_step(model, x, 2, 2)  # every iteration differentiated (checkpointed)
    assert backend.calls - before >= 2 * 2 * cfg.core_layers  # forward and recomputation, compiled




def test_fsdp2_on_compiled_blocks_gives_the_eager_gradients(one_rank_group):
    """build_model's order: compile the blocks in place, then fully_shard them (FSDP2's hooks run
    eagerly around the compiled block); one rank, so in-process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = CONFIGS["gqa-moe"]
    backend = Counting("aot_eager")
    eager, model = pair(cfg, backend)
    mesh = init_device_mesh("cpu", (1,))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randint(0, cfg.vocab_size, (2, 12))
    torch.testing.assert_close(train_step(model, x, 3, 2), train_step(eager, x, 3, 2))
    for (n, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-4, atol=1e-5, msg=n)
    assert backend.calls > 0 and all(is_compiled(layer) for layer in model.core.layers)
