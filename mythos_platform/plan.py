"""`mythos plan`: the memory one GPU needs for a training run, and its throughput, before any Ray work.

    mythos plan --variant 1t --gpus 384 --gpu-memory 80 --ep 384 --ac block --micro-batch 1 --seq-len 2048
    mythos plan --config jobs/configs/scale/1t.yaml

Per GPU, as mythos_platform/train/parallel.py builds the model (FSDP2 `fully_shard` per block and
at the root, over all workers; bf16 compute with MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=fp32); expert weights sharded over `train.expert_parallel` workers and replicated over
the rest, outside FSDP2, by expert_parallel.py):

- parameters, gradients, optimizer: FSDP2 keeps the fp32 parameter shard and its fp32 gradient
  shard; AdamW keeps two fp32 moments per parameter: 4 + 4 + 8 = 16 bytes per local parameter, the
  ZeRO-3 stage of Rajbhandari et al. 2020 ("ZeRO: Memory Optimizations Toward Training Trillion
  Parameter Models": 2 + 2 + 12 bytes with fp16 copies; here the fp32 shard is the master copy).
  Local parameters: the non-expert ones / the FSDP degree + the routed experts / the EP degree.
  DDP (and one GPU) keep everything whole, and DDP's gradient buckets once more (4 bytes).
- the FSDP2 working set: the root unit (embedding, norms, the loop's injection, LoRA, ACT) is
  gathered for the whole step in the compute dtype, with its unsharded gradient and the fp32
  copy it is reduced in; and two blocks (the one computing and the one prefetched) plus one
  block's unsharded gradients and their fp32 reduce copy. DDP with bf16 autocast: its cache of
  bf16 weight copies (2 bytes per parameter).
- activations of one micro-batch (mythos/memory_plan.py: saved tensors, the logits, and the
  larger of the loss gradients and one recomputed unit); with expert parallelism in bf16 the
  local experts' bf16 copy that each MoE call casts and autograd keeps.
- runtime: the CUDA context, NCCL's buffers and the caching allocator's slack (an assumption,
  `--runtime-gb`); and a reserve (`--headroom`, a fraction of the GPU) that the total must stay under.

Peaks that come at different moments (activations at the start of the backward pass, whole
gradients at its end) are added: the total is an upper estimate.

Throughput: FLOPs per token of a training step (`mythos.sizing.flops_per_token`: forward + backward
of the differentiated loop, the mean training loop count) plus the recomputation activation
checkpointing adds, at an assumed hardware FLOPs utilisation (`--hfu`, of `--gpu-tflops`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from math import gcd

from mythos.config import MythosConfig
from mythos.memory_plan import Activations, ParamLayout, StepShape, activation_bytes, param_layout
from mythos.sizing import flops_per_token, meta_model, parameter_counts

from .config import ConfigError, PretrainConfig

GIB = 1024**3


@dataclass(frozen=True)
class Hardware:
    """What the config does not say: the GPU and the assumptions of the estimate."""

    gpu_memory_gb: float = 80.0
    """GiB per GPU."""
    gpu_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989 TFLOP/s)."""
    hfu: float = 0.40
    """Assumed hardware FLOPs utilisation: executed FLOPs (recomputation included) / peak."""
    headroom: float = 0.10
    """Fraction of the GPU kept free (fragmentation, spikes); the total must stay under the rest."""
    runtime_gb: float = 3.0
    """CUDA context, NCCL buffers, allocator slack (GiB, assumed)."""
    fsdp: int | None = None
    """FSDP degree; None: every worker (what the trainer does)."""
    loops: int | None = None
    """Loop count; None: the model's train_loops_max for memory, its train_loops_mean for throughput."""


@dataclass(frozen=True)
class Line:
    name: str
    bytes: float
    note: str = ""
    keys: str = ""
    """The config keys that change this line (named when it overflows)."""


@dataclass
class Plan:
    cfg: PretrainConfig
    model: MythosConfig
    hw: Hardware
    shape: StepShape
    lines: list[Line]
    activations: Activations
    throughput: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(line.bytes for line in self.lines)

    @property
    def usable(self) -> float:
        return self.hw.gpu_memory_gb * (1 - self.hw.headroom) * GIB

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


@lru_cache(maxsize=8)
def _meta(cfg_json: str):
    """The model on the meta device (built once per config: suggestions re-plan many times)."""
    return meta_model(MythosConfig.from_json(cfg_json))


def dtype_of(cfg: PretrainConfig) -> str:
    """The compute dtype on GPUs: bf16 unless train.mixed_precision is fp32 ("auto" is bf16 on CUDA)."""
    return "fp32" if cfg.train.mixed_precision == "fp32" else "bf16"


def step_shape(cfg: PretrainConfig, model: MythosConfig, hw: Hardware) -> StepShape:
    loops = hw.loops or max(model.train_loops_max, model.bptt_depth)
    loop_losses = cfg.train.deep_supervision or cfg.train.loop_schedule == "trajectory"
    return StepShape(cfg.train.batch_size, cfg.data.row_len, loops, model.bptt_depth, cfg.train.activation_checkpointing,
                     dtype_of(cfg), fused_attention=True, loop_losses=loop_losses)


def degrees(cfg: PretrainConfig, hw: Hardware) -> tuple[int, int]:
    """(FSDP degree, expert-parallel degree); ConfigError names what does not divide."""
    gpus, ep = cfg.scaling.num_workers, cfg.train.expert_parallel
    if cfg.train.parallelism == "ddp" or gpus == 1:
        return 1, ep
    fsdp = hw.fsdp or gpus
    if fsdp < 1 or gpus % fsdp:
        raise ConfigError("--fsdp", f"must divide scaling.num_workers={gpus}", fsdp)
    return fsdp, ep


def state_lines(cfg: PretrainConfig, layout: ParamLayout, hw: Hardware) -> list[Line]:
    """Parameters, gradients and AdamW moments on one GPU, and the FSDP2 / DDP working set."""
    fsdp, ep = degrees(cfg, hw)
    experts_apart = ep > 1
    local = (layout.total - layout.routed) / fsdp + (layout.routed / ep if experts_apart else layout.routed / fsdp)
    pb = 2 if dtype_of(cfg) == "bf16" else 4
    shard = "scaling.num_workers, train.expert_parallel"
    lines = [Line("parameters", 4 * local, f"{local / 1e9:.3g}B local, fp32", shard),
             Line("gradients", 4 * local, "fp32", shard),
             Line("optimizer", 8 * local, "AdamW moments, fp32", shard)]
    if fsdp == 1:
        whole = 4 * (layout.total - layout.routed) if cfg.train.parallelism == "ddp" and cfg.scaling.num_workers > 1 \
            else 0.0
        cache = 2 * local if pb == 2 else 0.0
        lines.append(Line("DDP buckets, autocast copies", whole + cache, "whole model", "train.parallelism"))
        return lines
    block = layout.largest_block + (0 if experts_apart else layout.routed_per_layer)
    reduce = 4 if pb == 2 else 0
    working = layout.root * (2 * pb + reduce) + block * (3 * pb + reduce)
    lines.append(Line("FSDP2 unsharded", working, f"root {layout.root / 1e9:.2g}B + 2 blocks of "
                      f"{block / 1e9:.2g}B, with grads", "train.expert_parallel"))
    return lines


def expert_copies(cfg: PretrainConfig, model: MythosConfig, layout: ParamLayout, shape: StepShape) -> float:
    """bf16 with experts outside FSDP2: each MoE call under autograd casts the local experts to
    bf16 (grouped_mm's operand), and autograd keeps the copy (one unit at a time under checkpointing)."""
    ep = cfg.train.expert_parallel
    if ep <= 1 or shape.dtype != "bf16" or not model.use_moe:
        return 0.0
    calls = {"none": model.core_layers * shape.differentiated, "block": 1, "iteration": model.core_layers}
    return 2 * layout.routed_per_layer / ep * calls[shape.checkpointing]


def throughput(cfg: PretrainConfig, model: MythosConfig, hw: Hardware) -> dict[str, float]:
    """Tokens/s at `hw.hfu` of the peak, FLOPs per token with and without the recomputation."""
    loops = hw.loops or max(1, round(model.train_loops_mean))
    f = flops_per_token(model, loops, cfg.data.row_len, model.bptt_depth, model=_meta(model.to_json()))
    recompute = 0.0
    if cfg.train.activation_checkpointing != "none":
        recompute = (f.train_step - f.forward) / 2 - 2 * model.dim * model.vocab_size  # all but the head
    per_gpu = hw.hfu * hw.gpu_tflops * 1e12 / (f.train_step + recompute)
    gpus = cfg.scaling.num_workers
    step_tokens = cfg.train.batch_size * cfg.data.row_len * cfg.train.grad_accum * gpus
    return {"loops": loops, "train_flops": f.train_step, "recompute_flops": recompute, "tokens_per_s_gpu": per_gpu,
            "tokens_per_s": per_gpu * gpus, "mfu": per_gpu * f.train_step / (hw.gpu_tflops * 1e12),
            "step_tokens": step_tokens, "step_s": step_tokens / (per_gpu * gpus)}


def make_plan(cfg: PretrainConfig, hw: Hardware = Hardware()) -> Plan:
    model = cfg.model.build()
    layout = param_layout(model, _meta(model.to_json()))
    shape = step_shape(cfg, model, hw)
    act = activation_bytes(model, shape)
    lines = state_lines(cfg, layout, hw)
    copies = expert_copies(cfg, model, layout, shape)
    note = (f"{shape.micro_batch} x {shape.seq_len} tokens, {shape.differentiated} loops under autograd, "
            f"checkpointing {shape.checkpointing}")
    lines.append(Line("activations", act.peak + copies, note,
                      "train.activation_checkpointing, train.batch_size, data.seq_len, model.overrides.bptt_depth"))
    lines.append(Line("runtime", hw.runtime_gb * GIB, "CUDA context, NCCL, allocator (assumed)"))
    return Plan(cfg, model, hw, shape, lines, act, throughput(cfg, model, hw))


def gib(b: float) -> str:
    return f"{b / GIB:,.1f}"


def format_plan(plan: Plan) -> str:
    cfg, m, hw, sh = plan.cfg, plan.model, plan.hw, plan.shape
    counts = parameter_counts(m, _meta(m.to_json()))
    fsdp, ep = degrees(cfg, hw)
    par = f"FSDP2 over {fsdp}" if fsdp > 1 else cfg.train.parallelism.upper()
    out = [f"mythos plan: {cfg.model.variant} ({counts.total / 1e9:,.1f}B parameters, {counts.active / 1e9:,.2f}B "
           f"active per token), {cfg.scaling.num_workers} GPUs x {hw.gpu_memory_gb:g} GiB, {par}, expert "
           f"parallel {ep}, {sh.dtype}",
           f"  micro-batch {sh.micro_batch} x {sh.seq_len} tokens, {sh.n_loops} loops of which "
           f"{sh.differentiated} under autograd, activation checkpointing: {sh.checkpointing}",
           f"  {'per GPU':<26}{'GiB':>9}"]
    for line in plan.lines:
        out.append(f"  {line.name:<26}{gib(line.bytes):>9}  {line.note}")
    a = plan.activations
    out.append(f"  {'':<26}{'':>9}  (activations: saved {gib(a.saved)}, logits {gib(a.logits)}, then the larger "
               f"of loss gradients {gib(a.head)} and one recomputed unit {gib(a.recompute)})")
    left = plan.usable - plan.total
    verdict = (f"fits: {gib(left)} GiB to spare under the {hw.headroom:.0%} reserve" if plan.fits else
               f"DOES NOT FIT: {gib(-left)} GiB over")
    out.append(f"  {'total':<26}{gib(plan.total):>9}  of {gib(plan.usable)} GiB usable "
               f"({hw.gpu_memory_gb:g} GiB less {hw.headroom:.0%}): {verdict}")
    t = plan.throughput
    rec = f" + {t['recompute_flops'] / 1e9:,.1f} GFLOP recomputed" if t["recompute_flops"] else ""
    out.append(f"throughput at {t['loops']:.0f} loops: {t['train_flops'] / 1e9:,.1f} GFLOP per token per step{rec}; "
               f"at {hw.hfu:.0%} of {hw.gpu_tflops:g} TFLOP/s: {t['tokens_per_s_gpu']:,.0f} tokens/s per GPU, "
               f"{t['tokens_per_s']:,.0f} in all (MFU {t['mfu']:.0%}); a step of {t['step_tokens']:,} tokens "
               f"~{t['step_s']:.2f} s")
    return "\n".join(out)


def overflow_message(plan: Plan) -> str:
    """What does not fit: the largest lines and the keys that change them, and what would fit."""
    big = sorted((line for line in plan.lines if line.keys), key=lambda line: -line.bytes)[:2]
    named = "; ".join(f"{line.name} {gib(line.bytes)} GiB ({line.keys})" for line in big)
    text = (f"the plan does not fit: {gib(plan.total)} GiB per GPU > {gib(plan.usable)} GiB usable; "
            f"largest: {named}")
    tips = suggestions(plan)
    return text + ("\n  would fit: " + "\n  would fit: ".join(tips) if tips else "\n  nothing nearby fits: more "
                   "GPUs with more memory, or a smaller model")


def _try(plan: Plan, values: dict) -> Plan | None:
    try:
        return make_plan(plan.cfg.updated(values), plan.hw)
    except ConfigError:
        return None


def suggestions(plan: Plan, limit: int = 3) -> list[str]:
    """Nearby settings that fit: another checkpointing mode, a smaller micro-batch, a larger expert-
    parallel degree, more GPUs (the first `limit`, cheapest first)."""
    cfg, m = plan.cfg, plan.model
    tries: list[dict] = [{"train.activation_checkpointing": mode} for mode in ("block", "iteration")
                         if mode != cfg.train.activation_checkpointing]
    b = cfg.train.batch_size
    while b > 1:
        b //= 2
        tries.append({"train.batch_size": b, "train.grad_accum": cfg.train.grad_accum * cfg.train.batch_size // b})
    if m.bptt_depth > 1:
        tries.append({"model.overrides.bptt_depth": m.bptt_depth // 2})
    if cfg.data.source != "pointer" and cfg.data.seq_len > 1:
        tries.append({"data.seq_len": cfg.data.seq_len // 2})
    gpus = cfg.scaling.num_workers
    if m.use_moe:
        tries += [{"train.expert_parallel": ep} for ep in range(cfg.train.expert_parallel + 1, gcd(m.n_experts, gpus) + 1)
                  if m.n_experts % ep == 0 and gpus % ep == 0]
    tries += [{"scaling.num_workers": gpus * f} for f in (2, 4, 8)]
    if m.use_moe and cfg.train.expert_parallel < m.n_experts:  # every expert on its own worker
        tries.append({"scaling.num_workers": -(-gpus // m.n_experts) * m.n_experts, "train.expert_parallel": m.n_experts})
    out = []
    for values in tries:
        p = _try(plan, values)
        if p is not None and p.fits:
            sets = " ".join(f"--set {k}={v}" for k, v in values.items())
            out.append(f"{sets}  ({gib(p.total)} GiB per GPU)")
        if len(out) >= limit:
            break
    return out
