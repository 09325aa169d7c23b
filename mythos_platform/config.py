"""Typed job configuration: one pydantic model per concern, loaded from YAML, overridable from the CLI.

    cfg = load_config("jobs/configs/debug.yaml", ["train.lr=1e-3", "model.overrides.n_loops=8"])
    cfg.train.lr, cfg.model.build(), cfg.flatten()   # {"train.lr": 0.001, ...} for MLflow

Precedence: command line (`a.b=c`, the value parsed as a YAML scalar or list) > file > defaults.
A section may start from another YAML file with `extends: path.yaml` (its own keys win), which is
how the pipeline, the sweep and the depth experiment compose the pretraining configs:

    pretrain:
      extends: jobs/configs/reasoning.yaml
      train: {batch_size: 32}

Every unknown key, at any depth, and every bad value raises `ConfigError`, whose message names the
dotted path (`train.lr`, `model.overrides.dim`) and what is allowed. All of this happens before
any Ray work starts.

The library is pydantic v2 (`mythos.typed_config.ConfigModel`), the same one the Serve request
schemas use: it gives typed, nested, picklable sections with attribute access and JSON schemas,
and `ConfigModel` turns its errors into the dotted-path messages above.
"""

from __future__ import annotations

import copy
import json
import os
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mythos.config import MythosConfig
from mythos.typed_config import ConfigError, ConfigModel, config_error, flatten_dict, join
from mythos.variants import get_variant

__all__ = [
    "ConfigError",
    "Section",
    "DataConfig",
    "ModelSection",
    "TrainConfig",
    "CheckpointConfig",
    "TrackingConfig",
    "ScalingConfig",
    "RunConfig",
    "PretrainConfig",
    "load_config",
    "read_yaml",
    "merge",
    "apply_overrides",
    "parse_override",
    "flatten_dict",
    "join",
]

REPO_ROOT = Path(__file__).resolve().parents[1]


class Section(ConfigModel):
    """A job config section (`ConfigModel`) that may start from a YAML file: `extends: file.yaml`
    in its mapping loads the file's mapping and merges the section's own keys over it."""

    @model_validator(mode="before")
    @classmethod
    def _extends(cls, data: Any) -> Any:
        seen: list[str] = []
        while isinstance(data, dict) and "extends" in data:  # a file may extend another one
            source = data["extends"]
            if not isinstance(source, str) or not source:
                raise ConfigError("extends", "must be the path of a YAML file", source)
            if source in seen:
                raise ConfigError("extends", f"files extend each other in a cycle: {' -> '.join(seen + [source])}")
            seen.append(source)
            data = merge(read_yaml(source, "extends"), {k: v for k, v in data.items() if k != "extends"})
        return data

    def recorded(self) -> dict[str, Any]:
        """`to_dict()` as a JSON record of it reads back (non-JSON values as strings): what a finished
        run's record is compared with to tell whether a relaunch has the same config."""
        return json.loads(json.dumps(self.to_dict(), default=str))

    def updated(self: S, values: dict[str, Any]) -> S:
        """A validated copy with dotted keys set to typed values, e.g. {"run.root": "/x"}."""
        data = self.to_dict()
        for key, value in values.items():
            *parents, leaf = key.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        return type(self).from_dict(data)


S = TypeVar("S", bound=Section)


class DataConfig(Section):
    """Where training text comes from and how it becomes fixed-length token blocks."""

    source: Literal["generated", "local", "fineweb", "pointer"] = "generated"
    """generated: multi-hop problems as byte text (an LM corpus); local: files in `paths`; fineweb:
    FineWeb-Edu (streamed); pointer: the reasoning corpus, one pointer-chasing problem per row with
    per-loop labels and its own word-level tokenizer (data/pointer.py)."""
    paths: list[str] = Field(default_factory=list)
    """local: file globs (parquet / jsonl / json / txt). fineweb: optional local parquet files
    with FineWeb-Edu's columns, used instead of the hub (offline runs and tests)."""
    format: Literal["auto", "parquet", "jsonl", "txt"] = "auto"
    """local files' format; auto picks it from the extension of the first match."""
    txt_unit: Literal["paragraph", "file"] = "paragraph"
    """txt files: one document per blank-line-separated paragraph, or per file."""
    text_column: str = "text"
    """Column holding the document text (parquet, jsonl, fineweb)."""
    fineweb_dataset: str = "HuggingFaceFW/fineweb-edu"
    """Hugging Face dataset repository."""
    fineweb_config: str = "sample-10BT"
    """Dataset configuration: sample-10BT / sample-100BT / sample-350BT, default, or a dump (CC-MAIN-...)."""
    min_score: float | None = None
    """Keep documents with `score_column >= min_score` (FineWeb-Edu educational score, 0..5); null keeps all."""
    score_column: str = "score"
    tokenizer: str = "byte"
    """'byte', a tokenizer.json path, a Hugging Face hub name (e.g. 'gpt2'), or 'pointer' (source
    pointer's word-level tokenizer, built from n_symbols)."""
    seq_len: int = 256
    """Model input length; each row holds seq_len + 1 tokens (inputs and shifted targets)."""
    val_fraction: float = 0.01
    """File sources: fraction of documents (by a hash of their text) held out for validation."""
    val_blocks: int | None = 64
    """Cap on validation blocks (null: no cap)."""
    num_blocks: int | None = None
    """Cap on training blocks (null: everything the source yields)."""
    shuffle_seed: int | None = 0
    """Seed of the training shuffle (blocks for generated/local, file order for fineweb); null: no shuffle."""
    # --- generated corpus ---------------------------------------------------------------
    n_docs: int = 20000
    """generated, pointer: training problems."""
    val_docs: int = 1000
    """generated, pointer: validation problems (drawn with a different seed stream)."""
    min_hops: int = 1
    max_hops: int = 4
    """generated, pointer: training hop counts are drawn uniformly from min_hops..max_hops."""
    n_symbols: int = 16
    """generated, pointer: size of the symbol alphabet of the random function (2..52)."""
    seed: int = 0
    """generated, pointer: corpus seed; validation uses the stream `seed` with split tag 1."""
    # --- pointer corpus ---------------------------------------------------------------------
    hop_marks: bool = True
    """pointer: write the hop count k as k marks before the pairs."""
    loop_labels: Literal["trajectory", "hold"] = "trajectory"
    """pointer: per-loop labels; trajectory: after loop t the t-hop answer f^t(start) (every row
    trains the whole chain); hold: f^min(t, k)(start), hop until k and then stay."""
    label_loops: int | None = None
    """pointer: per-loop labels per training row (chains are followed this far); null: max_hops."""
    mark_labels: bool = False
    """pointer (hop marks on): also label each hop mark after every loop: pending before loop j,
    consumed from it (mark j from the left) — a stop signal that moves one mark per loop."""
    unmarked_fraction: float = 0.0
    """pointer (hop marks on): share of training problems written without marks; they get
    trajectory labels (hop on every loop) for their first unmarked_depth loops."""
    unmarked_depth: int | None = None
    """pointer: loops labelled on unmarked rows; null: max_hops."""
    fixed_point_fraction: float = 0.0
    """pointer (hop marks on): share of training problems with max_hops+1..fixed_point_max_hops marks
    whose chain reaches a fixed point within max_hops hops: long mark strings to train a stop
    signal on, while no answer needs more than max_hops distinct hops."""
    fixed_point_max_hops: int = 16
    """pointer: the most marks a fixed-point problem has."""
    val_hops: int | None = None
    """pointer: hop count of the validation problems, deeper than training to measure extrapolation
    (their labels run to val_hops loops); null: 2 * max_hops."""
    pair_embedding: Literal["factored", "token"] = "token"
    """pointer: token: one free embedding row per pair word, initialised as E[x] + T[y] (E the
    symbol embeddings, T a random table); factored: a pair word "xy" embeds as E[x] + T[y] all
    through training (train/pair_embedding.py), merged into plain rows at export. Both learn under
    the trajectory schedule (docs/depth.md); factored needs an untied head."""
    # --- execution on small machines -------------------------------------------------------
    cpus_per_task: float = 0.25
    """CPUs each read / tokenize task asks for; fractional so data tasks fit beside train workers."""
    docs_per_batch: int = 1024
    """Documents per tokenize-and-pack batch (each batch drops its tail of < seq_len + 1 tokens)."""
    materialize: bool = False
    """Materialize the training dataset before training (small data on small machines)."""
    order: Literal["fixed", "streaming"] | None = None
    """fixed: the data order is a pure function of the config (seeds) and the position in it: each
    rank reads a fixed, equal part of the training set in a fixed order (the set is materialized in
    the object store at the start of training, spilled to disk when large), so a relaunch or a
    restart after a failure replays the very batches of an uninterrupted run. streaming: Ray Data
    streams blocks to whichever rank asks first (no materialization, lower memory for very large
    data; the order differs between launches, so a resumed run is not step-for-step reproducible).
    null: fixed, except for FineWeb from the hub without a num_blocks cap, which streams."""

    def check(self) -> None:
        self.need(self.source != "local" or bool(self.paths), "paths",
                  "source 'local' needs at least one file glob in paths")
        self.need(self.seq_len >= 1, "seq_len", "must be >= 1", self.seq_len)
        self.need(0.0 <= self.val_fraction < 1.0, "val_fraction", "must be in [0, 1)", self.val_fraction)
        self.need(self.val_blocks is None or self.val_blocks >= 0, "val_blocks", "must be >= 0 or null",
                  self.val_blocks)
        self.need(self.num_blocks is None or self.num_blocks >= 1, "num_blocks", "must be >= 1 or null",
                  self.num_blocks)
        self.need(self.n_docs >= 1, "n_docs", "must be >= 1", self.n_docs)
        self.need(self.val_docs >= 0, "val_docs", "must be >= 0", self.val_docs)
        self.need(self.min_hops >= 1, "min_hops", "must be >= 1", self.min_hops)
        self.need(self.max_hops >= self.min_hops, "max_hops", f"must be >= min_hops={self.min_hops}",
                  self.max_hops)
        self.need(2 <= self.n_symbols <= 52, "n_symbols", "must be in 2..52", self.n_symbols)
        self.need(self.label_loops is None or self.label_loops >= 1, "label_loops", "must be >= 1 or null",
                  self.label_loops)
        self.need(self.val_hops is None or self.val_hops >= 1, "val_hops", "must be >= 1 or null", self.val_hops)
        self.need(0.0 <= self.unmarked_fraction < 1.0, "unmarked_fraction", "must be in [0, 1)",
                  self.unmarked_fraction)
        self.need(self.unmarked_fraction == 0.0 or self.hop_marks, "unmarked_fraction",
                  "needs hop_marks: true (without marks every row is unmarked)", self.unmarked_fraction)
        self.need(not self.mark_labels or self.hop_marks, "mark_labels", "needs hop_marks: true", self.mark_labels)
        self.need(0.0 <= self.fixed_point_fraction < 1.0, "fixed_point_fraction", "must be in [0, 1)",
                  self.fixed_point_fraction)
        self.need(self.fixed_point_fraction == 0.0 or self.fixed_point_max_hops > self.max_hops,
                  "fixed_point_max_hops", f"must be > max_hops={self.max_hops}", self.fixed_point_max_hops)
        self.need(self.unmarked_depth is None or self.unmarked_depth >= 1, "unmarked_depth",
                  "must be >= 1 or null", self.unmarked_depth)
        self.need(not (self.order == "fixed" and self._uncapped_stream), "order",
                  "'fixed' materializes the training set, which the FineWeb stream from the hub without a cap "
                  "cannot be: set num_blocks (a cap), local paths, or order: streaming", self.order)
        self.need((self.source == "pointer") == (self.tokenizer == "pointer"), "tokenizer",
                  "source 'pointer' brings its own word-level tokenizer: set data.tokenizer=pointer with it "
                  "(and only with it)", self.tokenizer)
        self.need(0.0 < self.cpus_per_task, "cpus_per_task", "must be > 0", self.cpus_per_task)
        self.need(self.docs_per_batch >= 1, "docs_per_batch", "must be >= 1", self.docs_per_batch)
        self.need(bool(self.tokenizer), "tokenizer", "must name 'byte', a tokenizer.json or a hub name")
        self.need(bool(self.text_column), "text_column", "must be a column name")

    @property
    def row_len(self) -> int:
        """Model input tokens per training row: seq_len, or a pointer problem's prompt length."""
        return self.pointer_format().prompt_len(self.max_hops) if self.source == "pointer" else self.seq_len

    @property
    def resolved_label_loops(self) -> int:
        return self.label_loops if self.label_loops is not None else self.max_hops

    @property
    def resolved_val_hops(self) -> int:
        return self.val_hops if self.val_hops is not None else 2 * self.max_hops

    def pointer_format(self):
        """The reasoning corpus's text format (source pointer)."""
        from .data.pointer import PointerFormat

        return PointerFormat(self.n_symbols, self.hop_marks)

    @property
    def _uncapped_stream(self) -> bool:
        return self.source == "fineweb" and not self.paths and self.num_blocks is None

    @property
    def resolved_order(self) -> str:
        """`order`, with null resolved: fixed, except for the uncapped FineWeb stream from the hub."""
        return self.order or ("streaming" if self._uncapped_stream else "fixed")

    def build_tokenizer(self):
        """The tokenizer this data is encoded with (and that is saved beside the model)."""
        if self.tokenizer == "pointer":
            from .data.pointer import pointer_tokenizer

            return pointer_tokenizer(self.pointer_format())
        from mythos.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer)


class ModelSection(Section):
    """A named model size (`mythos.variants.get_variant`) plus field overrides of its MythosConfig."""

    variant: str = "debug"
    """debug | 1b | 3b | 10b | 50b | 100b | 500b | 1t."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """MythosConfig fields replacing the variant's values, e.g. {n_loops: 8, lora_rank: 4}."""

    def build(self) -> MythosConfig:
        """The variant's MythosConfig with the overrides applied; ConfigError names the bad key
        (`variant`, or `overrides.<field>`)."""
        try:
            base = get_variant(self.variant)
        except ConfigError as exc:
            raise ConfigError("variant", exc.detail) from None
        try:
            return MythosConfig.model_validate({**base.to_dict(), **self.overrides})
        except ValidationError as exc:
            err = config_error(exc, MythosConfig, "overrides")
        field_name = err.path.removeprefix("overrides.").split(".")[0].split("[")[0]
        if field_name in self.overrides or err.detail.startswith("unknown key"):
            raise err
        # a rule broken by a value the variant sets (e.g. its dim against an overridden n_heads)
        raise ConfigError("overrides", f"{err.detail} (variant {self.variant!r} with overrides "
                                       f"{self.overrides}, at {field_name})") from None

    def check(self) -> None:
        self.build()


class TrainConfig(Section):
    """The optimisation loop run by each Ray Train worker."""

    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Sequences per worker per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 3e-5
    """Floor of the cosine decay."""
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    log_every: int = 10
    """Gather and log metrics every N steps."""
    eval_every: int = 100
    """Validation every N steps; 0 disables (a final evaluation still runs)."""
    val_batches: int = 8
    """Batches per validation pass."""
    seed: int = 0
    ponder_cost: float = 0.0
    """Weight of the ACT ponder cost in the loss."""
    parallelism: Literal["fsdp", "ddp"] = "fsdp"
    """fsdp: FSDP2 fully_shard; ddp: DistributedDataParallel."""
    mixed_precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on CUDA, fp32 on CPU."""
    nonfinite: Literal["skip", "stop"] = "skip"
    """A non-finite loss or gradient: skip the step, or stop the run. A stopped run ends with an
    error naming the step, exports nothing and is not retried (a retry would diverge again)."""
    max_consecutive_skips: int = Field(5, ge=1)
    """nonfinite=skip: this many skipped steps in a row stop the run (it has diverged)."""
    max_total_skips: int = Field(50, ge=1)
    """nonfinite=skip: this many skipped steps in all stop the run."""
    deep_supervision: bool = False
    """Language modelling: a loss after every differentiated loop iteration too (all predict the next tokens)."""
    loop_schedule: Literal["random", "trajectory"] = "random"
    """random: a loop count drawn per step from the model's loop distribution (the same on every
    rank), truncated backprop; trajectory: every step runs as many loops as the data has per-loop
    labels (source pointer: data.label_loops) and applies the loss after every loop, under autograd
    (deep supervision of the whole chain)."""
    loop_loss_weights: Literal["uniform", "linear"] = "uniform"
    """trajectory: weights of the per-loop losses (linear: later loops weigh more)."""
    activation_checkpointing: Literal["none", "block", "iteration"] = "none"
    """Recompute activations in the backward pass instead of keeping them (~+30% step time on the
    debug model, mythos_platform/train/activation_checkpointing.py, docs/memory.md). none: keep all;
    block: checkpoint every transformer block call (prelude, coda, and each core layer at each
    differentiated loop iteration; each keeps its input); iteration: checkpoint each differentiated
    loop iteration whole (input norm, core layers, LoRA, injection; each keeps the state entering
    it; prelude and coda blocks as in `block`), which keeps least but recomputes all core layers
    at once: `mythos plan` says which fits."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile of the transformer block the loop runs (compiled once, reused by every
    iteration and loop count). auto: on where it is measured to help (see docs/performance.md): on
    CUDA, off on a CPU (there it gains 0.97-1.07x a train step for ~4 s, or ~45 s with a cold
    inductor cache, of compiling per worker process)."""
    expert_parallel: int = 1
    """Expert-parallel degree: routed experts sharded over groups of this many workers with
    all-to-all token dispatch; 1 = off. Must divide scaling.num_workers and the model's n_experts."""
    init_from: str | None = None
    """A model folder (config.json + model.safetensors) to start from instead of a random
    initialisation; parameters the folder lacks (e.g. a depth-wise LoRA added by a sweep) keep
    their initial values."""

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_yaml_switch(cls, value: Any) -> Any:
        """YAML 1.1 (PyYAML, so the files and `--set`) reads a bare on/off as true/false:
        `--set train.compile=on` means "on"."""
        return {True: "on", False: "off"}[value] if isinstance(value, bool) else value

    def check(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_batches"):
            self.need(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        self.need(self.lr > 0, "lr", "must be > 0", self.lr)
        self.need(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}]", self.min_lr)
        self.need(0 <= self.warmup_steps <= self.steps, "warmup_steps", f"must be in [0, steps={self.steps}]",
                  self.warmup_steps)
        self.need(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        self.need(all(0 <= b < 1 for b in self.betas), "betas", "both must be in [0, 1)", list(self.betas))
        self.need(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables)", self.grad_clip)
        self.need(self.eval_every >= 0, "eval_every", "must be >= 0 (0 disables)", self.eval_every)
        self.need(self.ponder_cost >= 0, "ponder_cost", "must be >= 0", self.ponder_cost)
        self.need(self.expert_parallel >= 1, "expert_parallel", "must be >= 1 (1 = off)", self.expert_parallel)


class CheckpointConfig(Section):
    """Sharded training checkpoints (resumable) and the exported model folder."""

    every_steps: int = 100
    """Checkpoint every N steps; 0: only at the end."""
    keep: int = 2
    """Checkpoints Ray Train keeps (the newest)."""
    storage_path: str | None = None
    """Ray Train storage (a shared path or URI such as s3://...); null: <run.root>/checkpoints."""
    export_dir: str | None = None
    """Where the final config.json + model.safetensors go; null: <run.root>/export."""

    def check(self) -> None:
        self.need(self.every_steps >= 0, "every_steps", "must be >= 0", self.every_steps)
        self.need(self.keep >= 1, "keep", "must be >= 1", self.keep)

    def resolved_storage_path(self, run_root: str) -> str:
        """storage_path, or an absolute `<run_root>/checkpoints` (Ray Train wants absolute paths)."""
        if self.storage_path:
            return self.storage_path if "://" in self.storage_path else os.path.abspath(self.storage_path)
        return os.path.abspath(os.path.join(run_root, "checkpoints"))

    def resolved_export_dir(self, run_root: str) -> str:
        return os.path.abspath(self.export_dir or os.path.join(run_root, "export"))


class TrackingConfig(Section):
    """MLflow: one experiment per job kind; null tracking_uri means SQLite under the run root."""

    experiment: str = "mythos-pretrain"
    tracking_uri: str | None = None
    """null: sqlite:///<run.root>/mlflow.db (the MLFLOW_TRACKING_URI environment variable wins)."""
    run_name: str | None = None
    enabled: bool = True

    def check(self) -> None:
        self.need(bool(self.experiment), "experiment", "must be a non-empty name")


class ScalingConfig(Section):
    """Ray Train workers and what each one asks the cluster for."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Fractional values allowed (e.g. 0.5 to fit two workers and data tasks on 2 CPUs)."""
    resources: dict[str, float] = Field(default_factory=dict)
    """Extra custom resources per worker, e.g. {accelerator_type:H100: 0.001}."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def check(self) -> None:
        self.need(self.num_workers >= 1, "num_workers", "must be >= 1", self.num_workers)
        self.need(self.cpus_per_worker > 0, "cpus_per_worker", "must be > 0", self.cpus_per_worker)
        for k, v in self.resources.items():
            self.need(v >= 0, f"resources.{k}", "must be >= 0", v)

    def worker_resources(self) -> dict[str, float]:
        """`resources_per_worker` for ray.train.ScalingConfig."""
        res = {"CPU": self.cpus_per_worker, **self.resources}
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


class RunConfig(Section):
    """Where a job writes (MLflow store, checkpoints, exports) and how it recovers."""

    root: str = "./runs"
    name: str | None = None
    """Ray Train run name (a folder under the storage path); null: generated from the time."""
    max_failures: int = 0
    """Worker-group restarts from the latest checkpoint (Ray FailureConfig); -1: unlimited."""

    def check(self) -> None:
        self.need(bool(self.root), "root", "must be a path")
        self.need(self.max_failures >= -1, "max_failures", "must be >= -1", self.max_failures)


class PretrainConfig(Section):
    """Everything `jobs/pretrain.py` needs."""

    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    def check(self) -> None:
        model = self.model.build()
        self.need(self.data.source == "pointer" or self.data.seq_len <= model.max_seq_len, "data.seq_len",
                  f"must be <= the model's max_seq_len={model.max_seq_len}", self.data.seq_len)
        if self.data.tokenizer == "byte":
            self.need(model.vocab_size >= 259, "model.overrides.vocab_size",
                      "must be >= 259 for the byte tokenizer", model.vocab_size)
        if self.train.parallelism == "fsdp" and self.scaling.num_workers > 1 and self.data.source == "pointer":
            self.need(self.data.pair_embedding != "factored", "data.pair_embedding",
                      "factored is not supported with train.parallelism=fsdp yet (use ddp, or token)",
                      self.data.pair_embedding)
        if self.train.expert_parallel > 1:
            ep = self.train.expert_parallel
            self.need(model.use_moe, "train.expert_parallel", "must be 1 for a model without routed experts "
                      "(model n_experts=0)", ep)
            self.need(model.n_experts % ep == 0, "train.expert_parallel",
                      f"must divide the model's n_experts={model.n_experts}", ep)
            self.need(self.scaling.num_workers % ep == 0, "train.expert_parallel",
                      f"must divide scaling.num_workers={self.scaling.num_workers}", ep)
        if self.train.init_from:
            self.need(Path(self.train.init_from, "model.safetensors").is_file(), "train.init_from",
                      "is not a model folder (config.json + model.safetensors)", self.train.init_from)
        if self.data.source == "pointer":
            self._check_pointer(model)
        else:
            self.need(self.train.loop_schedule != "trajectory", "train.loop_schedule",
                      "trajectory needs per-loop labels from the data: use data.source=pointer, or 'random'",
                      self.train.loop_schedule)

    def preflight(self, prefix: str = "") -> None:
        """The checks against this machine (run root, data files, enough data), before any Ray
        work (mythos_platform/preflight.py); ConfigError names the key under `prefix`."""
        from .preflight import preflight_pretrain

        preflight_pretrain(self, prefix)

    def _check_pointer(self, model: MythosConfig) -> None:
        d, fmt = self.data, self.data.pointer_format()
        self.need(model.vocab_size >= fmt.vocab_size, "model.overrides.vocab_size",
                  f"must be >= {fmt.vocab_size} for {d.n_symbols} symbols", model.vocab_size)
        longest = [("max_hops", d.max_hops), ("val_hops", d.resolved_val_hops)]
        if d.fixed_point_fraction > 0:
            longest.append(("fixed_point_max_hops", d.fixed_point_max_hops))
        for key, hops in longest:
            self.need(fmt.prompt_len(hops) <= model.max_seq_len, f"data.{key}",
                      f"a {hops}-hop problem is {fmt.prompt_len(hops)} tokens, more than the model's "
                      f"max_seq_len={model.max_seq_len} (raise model.overrides.max_seq_len)", hops)
        if self.train.loop_schedule == "trajectory":
            loops = d.resolved_label_loops
            self.need(loops >= d.max_hops, "data.label_loops",
                      f"must be >= max_hops={d.max_hops}: a trajectory "
                      "runs at least as many loops as the longest training chain", d.label_loops)
            self.need(model.train_loops_max >= loops, "model.overrides.train_loops_max",
                      f"must be >= the {loops} loops a trajectory step runs (data.label_loops, default max_hops)",
                      model.train_loops_max)
        self.need(not model.tie_embeddings, "model.overrides.tie_embeddings",
                      "must be false with data.source=pointer (pair rows are initialised or factored as E[x] + "
                      "T[y]; a tied head would score every pair word like its source symbol)", model.tie_embeddings)


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=c' -> (['a', 'b'], c) with c parsed as a YAML scalar or list ('1e-3', '[0.9, 0.95]', 'null')."""
    if "=" not in item:
        raise ConfigError(item, "override must look like section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip().removeprefix("--")
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(key or item, "override key must be a dotted path like train.lr")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r} as YAML: {exc}") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b=c` set; missing sections are created (unknown keys fail later)."""
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), f"is a value ({child!r}), not a section; "
                                                            f"cannot set {'.'.join(parts)}")
            node = child
        node[parts[-1]] = value
    return out


def find_file(path: str | os.PathLike) -> Path | None:
    """`path` itself if absolute, else tried against the working directory, then the repo root."""
    p = Path(path).expanduser()
    for cand in ([p] if p.is_absolute() else [Path.cwd() / p, REPO_ROOT / p]):
        if cand.is_file():
            return cand
    return None


def read_yaml(path: str | os.PathLike, key: str = "") -> dict[str, Any]:
    """The mapping in the YAML file at `path` as written; ConfigError names `key`."""
    found = find_file(path)
    if found is None:
        raise ConfigError(key or str(path), f"config file {str(path)!r} does not exist (relative paths are "
                                            f"tried against the working directory, then {REPO_ROOT})")
    try:
        loaded = yaml.safe_load(found.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(key or str(path), f"{path} is not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(key or str(path), f"{path} must hold a mapping of sections at the top level")
    return loaded or {}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """`b` merged over `a`: nested mappings key by key, anything else replaced."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = (),
                cls: type[S] = PretrainConfig) -> S:  # type: ignore[assignment]
    """Defaults < YAML file at `path` (optional) < `overrides` ('a.b=c'); validated, or ConfigError."""
    data = {} if path is None else read_yaml(path)
    return cls.from_dict(apply_overrides(data, overrides or ()))
