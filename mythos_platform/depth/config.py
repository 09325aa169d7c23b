"""Configuration of the depth-extrapolation experiment (jobs/depth.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ConfigError, ModelSection, RunConfig, Section, TrackingConfig, _join
from ..data.multihop_tokens import PairTokenFormat

# One looped block and nothing outside it, the same function at every iteration (no loop-index
# embedding, no depth-wise LoRA), A ~ 0 and a small injected input: docs/depth.md says why.
_SMALL_MODEL: dict[str, Any] = {
    "dim": 128, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64, "vocab_size": 280,
    "prelude_layers": 0, "core_layers": 1, "coda_layers": 0,
    "n_experts": 4, "top_k": 1, "n_shared_experts": 1, "expert_dim": 128, "dense_ffn_dim": 256,
    "loop_emb_dim": 0, "lora_rank": 0, "act_enabled": False, "injection_init_decay": 0.02,
    "input_gain_init": 0.1, "train_loops_max": 32, "train_loops_mean": 4.0, "bptt_depth": 32,
    "loop_distribution": "uniform",
}
# a non-looped stack of 4 narrower blocks, about the RDT's parameter count
_BASELINE: dict[str, Any] = {"dim": 64, "core_layers": 4, "expert_dim": 72}


@dataclass
class DepthConfig(Section):
    """Train an RDT and a parameter-matched non-looped baseline on pointer chasing with hops <= N;
    evaluate both on hops 1..2N, the RDT at many loop counts."""

    run: RunConfig = field(default_factory=lambda: RunConfig(root="./runs/depth", name="depth"))
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(experiment="mythos-depth"))
    model: ModelSection = field(default_factory=lambda: ModelSection(variant="debug", overrides=dict(_SMALL_MODEL)))
    n_symbols: int = 16
    train_max_hops: int = 4
    """N: training problems have 1..N hops."""
    eval_max_hops: int = 8
    """Evaluation covers hops 1..eval_max_hops (2N by default)."""
    schedule: Literal["hops", "random", "mixed"] = "hops"
    """hops: each step draws k in 1..N and runs k loops on k-hop problems; random: mixed hops,
    loops drawn uniformly in [N, loop_max] with targets f^min(t,k) (the state should stop moving);
    mixed: each step is a random-schedule step with probability mixed_fraction, else a hops step."""
    mixed_fraction: float = 0.5
    """Share of random-schedule steps under schedule=mixed."""
    loop_max: int = 8
    """Largest training loop count (random schedule)."""
    supervision: Literal["per_loop", "final"] = "per_loop"
    """per_loop: a loss after every iteration (target t hops on); final: the answer after the last."""
    steps: int = 10000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 500
    seed: int = 0
    eval_problems: int = 200
    """Problems per hop count (held-out seed)."""
    eval_loops: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 8, 12, 16])
    answer_at: Literal["start", "eq"] = "start"
    """Where the answer is read: start = the start symbol comes last and answers (one attention
    step per hop); eq = an EQ mark after the hop marks answers (the start symbol must be copied
    there first). See data/multihop_tokens.py."""
    pair_embedding: Literal["factored", "token"] = "factored"
    """factored: pair (x, y) embeds as E[x] + T[y] (depth/pair_embedding.py); token: one free row
    per pair, initialised as (E[x] + Q E[y]) / sqrt(2) with Q a fixed random rotation."""
    curriculum_steps: int = 2000
    """> 0: training starts on 1-hop problems and admits one more hop count once the last 50 steps'
    training accuracy reaches curriculum_accuracy, or at the latest after this many steps at a
    level (depth/curriculum.py); 0 draws from 1..train_max_hops from the first step."""
    curriculum_accuracy: float = 0.9
    baseline: bool = True
    baseline_overrides: dict[str, Any] = field(default_factory=lambda: dict(_BASELINE))
    """MythosConfig fields that differ for the baseline (applied over model.overrides), e.g. a
    narrower, deeper stack {dim: 64, core_layers: 4} of about the RDT's parameter count; the
    baseline always runs its blocks once (n_loops = 1). Empty: the RDT's own blocks, run once."""
    threads_per_model: int = 1
    """torch threads of each training task (the RDT and the baseline train side by side)."""

    def baseline_model(self) -> ModelSection:
        return ModelSection(self.model.variant, {**self.model.overrides, **self.baseline_overrides})

    @property
    def token_format(self) -> PairTokenFormat:
        return PairTokenFormat(self.n_symbols, self.answer_at)

    def check(self, path: str) -> None:
        self.need(2 <= self.n_symbols <= 52, _join(path, "n_symbols"), "must be in 2..52", self.n_symbols)
        self.need(self.train_max_hops >= 1, _join(path, "train_max_hops"), "must be >= 1", self.train_max_hops)
        self.need(self.eval_max_hops >= self.train_max_hops, _join(path, "eval_max_hops"),
                  f"must be >= train_max_hops={self.train_max_hops}", self.eval_max_hops)
        self.need(self.loop_max >= self.train_max_hops, _join(path, "loop_max"),
                  f"must be >= train_max_hops={self.train_max_hops}", self.loop_max)
        self.need(0.0 <= self.mixed_fraction <= 1.0, _join(path, "mixed_fraction"), "must be in [0, 1]",
                  self.mixed_fraction)
        self.need(self.curriculum_steps >= 0, _join(path, "curriculum_steps"), "must be >= 0", self.curriculum_steps)
        self.need(0.0 < self.curriculum_accuracy <= 1.0, _join(path, "curriculum_accuracy"), "must be in (0, 1]",
                  self.curriculum_accuracy)
        for name in ("steps", "batch_size", "eval_problems", "log_every", "threads_per_model"):
            self.need(getattr(self, name) >= 1, _join(path, name), "must be >= 1", getattr(self, name))
        self.need(self.lr > 0, _join(path, "lr"), "must be > 0", self.lr)
        self.need(bool(self.eval_loops) and all(n >= 1 for n in self.eval_loops), _join(path, "eval_loops"),
                  "must be a non-empty list of ints >= 1", self.eval_loops)
        model = self.model.build(_join(path, "model"))
        if self.baseline_overrides:
            try:
                self.baseline_model().build()
            except ConfigError as exc:
                raise ConfigError(_join(path, "baseline_overrides"),
                                  f"gives an invalid baseline model: {exc}") from None
        fmt = self.token_format
        self.need(model.vocab_size >= fmt.vocab_size, _join(path, "model.overrides.vocab_size"),
                  f"must be >= {fmt.vocab_size} for {self.n_symbols} symbols", model.vocab_size)
        self.need(model.max_seq_len >= fmt.max_len(self.eval_max_hops), _join(path, "model.overrides.max_seq_len"),
                  f"must be >= {fmt.max_len(self.eval_max_hops)} for {self.eval_max_hops} hops", model.max_seq_len)
        self.need(model.train_loops_max >= self.loop_max, _join(path, "model.overrides.train_loops_max"),
                  f"must be >= loop_max={self.loop_max}", model.train_loops_max)
