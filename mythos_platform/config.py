"""Typed job configuration: one dataclass per concern, loaded from YAML, overridable from the CLI.

    cfg = load_config("jobs/configs/debug.yaml", ["train.lr=1e-3", "model.overrides.n_loops=8"])
    cfg.train.lr, cfg.model.build(), cfg.flatten()   # {"train.lr": 0.001, ...} for MLflow

Precedence: command line (`a.b=c`, the value parsed as a YAML scalar or list) > file > defaults.
Every unknown key, at any depth, and every bad value raises `ConfigError`, whose message
names the dotted path (`train.lr`, `model.overrides.dim`) and what is allowed. All of this
happens before any Ray work starts.

The sections are plain dataclasses (picklable, attribute access). The conversion from a
dict is a small hand-written walker over the type hints rather than pydantic, so the
error messages and the accepted spellings (e.g. `lr: 3e-4`, which YAML 1.1 reads as a
string) are ours to choose.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mythos.config import ConfigError as _MythosConfigError
from mythos.config import MythosConfig

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
    "apply_overrides",
    "from_dict",
    "parse_override",
]


class ConfigError(_MythosConfigError):
    """A job configuration key or value is invalid. `path` is the dotted key (e.g. `train.lr`)."""

    def __init__(self, path: str, message: str, value: Any = dataclasses.MISSING) -> None:
        self.path = path
        got = "" if value is dataclasses.MISSING else f"got {value!r}; "
        super().__init__(f"{path}: {got}{message}" if path else f"{got}{message}")


S = TypeVar("S", bound="Section")


# ---------------------------------------------------------------------------------------
# Base class: conversion helpers shared by every section
# ---------------------------------------------------------------------------------------
class Section:
    """Mixin for config dataclasses: `from_dict`, `to_dict`, `flatten`, `replace`, `validate`."""

    def check(self, path: str) -> None:
        """Cross-field and range checks of this section; `self.need(...)` raises with the path."""

    @staticmethod
    def need(cond: bool, path: str, allowed: str, value: Any = dataclasses.MISSING) -> None:
        if not cond:
            raise ConfigError(path, allowed, value)

    def validate(self, path: str = "") -> None:
        """Run `check` on this section and, recursively, on every nested section."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Section):
                v.validate(_join(path, f.name))
        self.check(path)

    @classmethod
    def from_dict(cls: type[S], data: dict[str, Any] | None, path: str = "") -> S:
        obj = _convert(cls, {} if data is None else data, path)
        obj.validate(path)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def flatten(self, sep: str = ".") -> dict[str, Any]:
        """Dotted keys to leaf values (dicts are walked too; lists stay lists): for MLflow params."""
        return flatten_dict(self.to_dict(), sep=sep)

    def replace(self: S, **changes: Any) -> S:
        return type(self).from_dict({**self.to_dict(), **changes})


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def flatten_dict(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, key, sep))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------------------
# The type-directed converter
# ---------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, path: str) -> Any:
    """`value` (from YAML) converted to type `tp`, or ConfigError naming `path`."""
    if tp is Any:
        return copy.deepcopy(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise ConfigError(path, f"allowed: {', '.join(repr(a) for a in args)}", value)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(path, f"must not be null; expected {_type_name(tp)}")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(path, f"expected {_type_name(tp)}", value)
    if origin in (list, tuple):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(path, f"expected a list ({_type_name(tp)})", value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(path, f"expected a list of {len(args)} items ({_type_name(tp)})", value)
            return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, "expected a mapping", value)
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, path): _convert(vt, v, _join(path, str(k))) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(path, "expected true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        num = _number(value)
        if num is not None and float(num).is_integer():
            return int(num)
        raise ConfigError(path, "expected an integer", value)
    if tp is float:
        num = _number(value)
        if num is not None:
            return float(num)
        raise ConfigError(path, "expected a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(path, "expected a string", value)
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a programming error


def _number(value: Any) -> float | int | None:
    """int/float, or a string YAML 1.1 left unparsed such as '3e-4'; bools are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            return None
    return None


def _convert_dataclass(cls: type, value: Any, path: str) -> Any:
    if isinstance(value, cls):
        value = dataclasses.asdict(value)
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping (section {cls.__name__})", value)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            raise ConfigError(_join(path, str(key)), _unknown_message(str(key), fields, path))
    hints = _hints(cls)
    kwargs = {name: _convert(hints[name], v, _join(path, name)) for name, v in value.items()}
    return cls(**kwargs)


def _unknown_message(key: str, allowed: typing.Iterable[str], path: str) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = f"in {path!r}" if path else "at the top level"
    return f"unknown key{hint}; allowed {where}: {', '.join(allowed)}"


def from_dict(cls: type[S], data: dict[str, Any] | None, path: str = "") -> S:
    return cls.from_dict(data, path)


# ---------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------
@dataclass
class DataConfig(Section):
    """Where training text comes from and how it becomes fixed-length token blocks."""

    source: Literal["generated", "local", "fineweb", "pointer"] = "generated"
    """generated: multi-hop problems as byte text (an LM corpus); local: files in `paths`; fineweb:
    FineWeb-Edu (streamed); pointer: the reasoning corpus, one pointer-chasing problem per row with
    per-loop labels and its own word-level tokenizer (data/pointer.py)."""
    paths: list[str] = field(default_factory=list)
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

    def check(self, path: str) -> None:
        p = lambda name: _join(path, name)  # noqa: E731
        self.need(self.source != "local" or bool(self.paths), p("paths"),
                  "source 'local' needs at least one file glob in paths")
        self.need(self.seq_len >= 1, p("seq_len"), "must be >= 1", self.seq_len)
        self.need(0.0 <= self.val_fraction < 1.0, p("val_fraction"), "must be in [0, 1)", self.val_fraction)
        self.need(self.val_blocks is None or self.val_blocks >= 0, p("val_blocks"), "must be >= 0 or null",
                  self.val_blocks)
        self.need(self.num_blocks is None or self.num_blocks >= 1, p("num_blocks"), "must be >= 1 or null",
                  self.num_blocks)
        self.need(self.n_docs >= 1, p("n_docs"), "must be >= 1", self.n_docs)
        self.need(self.val_docs >= 0, p("val_docs"), "must be >= 0", self.val_docs)
        self.need(self.min_hops >= 1, p("min_hops"), "must be >= 1", self.min_hops)
        self.need(self.max_hops >= self.min_hops, p("max_hops"), f"must be >= min_hops={self.min_hops}",
                  self.max_hops)
        self.need(2 <= self.n_symbols <= 52, p("n_symbols"), "must be in 2..52", self.n_symbols)
        self.need(self.label_loops is None or self.label_loops >= 1, p("label_loops"), "must be >= 1 or null",
                  self.label_loops)
        self.need(self.val_hops is None or self.val_hops >= 1, p("val_hops"), "must be >= 1 or null", self.val_hops)
        self.need(0.0 <= self.unmarked_fraction < 1.0, p("unmarked_fraction"), "must be in [0, 1)",
                  self.unmarked_fraction)
        self.need(self.unmarked_fraction == 0.0 or self.hop_marks, p("unmarked_fraction"),
                  "needs hop_marks: true (without marks every row is unmarked)", self.unmarked_fraction)
        self.need(not self.mark_labels or self.hop_marks, p("mark_labels"), "needs hop_marks: true", self.mark_labels)
        self.need(0.0 <= self.fixed_point_fraction < 1.0, p("fixed_point_fraction"), "must be in [0, 1)",
                  self.fixed_point_fraction)
        self.need(self.fixed_point_fraction == 0.0 or self.fixed_point_max_hops > self.max_hops,
                  p("fixed_point_max_hops"), f"must be > max_hops={self.max_hops}", self.fixed_point_max_hops)
        self.need(self.unmarked_depth is None or self.unmarked_depth >= 1, p("unmarked_depth"),
                  "must be >= 1 or null", self.unmarked_depth)
        self.need((self.source == "pointer") == (self.tokenizer == "pointer"), p("tokenizer"),
                  "source 'pointer' brings its own word-level tokenizer: set data.tokenizer=pointer with it "
                  "(and only with it)", self.tokenizer)
        self.need(0.0 < self.cpus_per_task, p("cpus_per_task"), "must be > 0", self.cpus_per_task)
        self.need(self.docs_per_batch >= 1, p("docs_per_batch"), "must be >= 1", self.docs_per_batch)
        self.need(bool(self.tokenizer), p("tokenizer"), "must name 'byte', a tokenizer.json or a hub name")
        self.need(bool(self.text_column), p("text_column"), "must be a column name")

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

    def build_tokenizer(self):
        """The tokenizer this data is encoded with (and that is saved beside the model)."""
        if self.tokenizer == "pointer":
            from .data.pointer import pointer_tokenizer

            return pointer_tokenizer(self.pointer_format())
        from mythos.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer)


@dataclass
class ModelSection(Section):
    """A named model size (`mythos.variants.get_variant`) plus field overrides of its MythosConfig."""

    variant: str = "debug"
    """debug | 1b | 3b | 10b | 50b | 100b | 500b | 1t."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """MythosConfig fields replacing the variant's values, e.g. {n_loops: 8, lora_rank: 4}."""

    def build(self, path: str = "model") -> MythosConfig:
        """The variant's MythosConfig with the overrides applied; ConfigError names the bad key."""
        base = _variant(self.variant, _join(path, "variant"))
        opath = _join(path, "overrides")
        hints = typing.get_type_hints(MythosConfig)
        fields = {f.name for f in dataclasses.fields(MythosConfig)}
        typed = {}
        for key, value in self.overrides.items():
            if key not in fields:
                raise ConfigError(_join(opath, key), _unknown_message(key, fields, opath))
            typed[key] = _convert(hints[key], value, _join(opath, key))
        try:
            return base.replace(**typed)
        except _MythosConfigError as exc:
            bad = _named_field(str(exc))
            where = _join(opath, bad) if bad in typed else (_join(opath, bad) if bad else opath)
            raise ConfigError(where, f"{exc} (variant {self.variant!r} with overrides {typed})") from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(opath, f"{type(exc).__name__}: {exc}") from None

    def check(self, path: str) -> None:
        self.build(path or "model")


def _named_field(message: str) -> str | None:
    """The field a `mythos.config.ConfigError` message names ('MythosConfig.<name>=...')."""
    marker = "MythosConfig."
    if marker in message:
        tail = message.split(marker, 1)[1]
        name = ""
        for ch in tail:
            if not (ch.isalnum() or ch == "_"):
                break
            name += ch
        return name or None
    return None


def _variant(name: str, path: str) -> MythosConfig:
    try:
        from mythos.variants import get_variant
    except ImportError:  # mythos.variants not there: the name cannot be checked here
        return MythosConfig()
    try:
        return get_variant(name)
    except (KeyError, ValueError) as exc:
        raise ConfigError(path, str(exc).strip("'\""), name) from None


@dataclass
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
    """A non-finite loss or gradient: skip the step, or stop the run."""
    deep_supervision: bool = False
    """Language modelling: a loss after every differentiated loop iteration too (all predict the next tokens)."""
    loop_schedule: Literal["random", "trajectory"] = "random"
    """random: a loop count drawn per step from the model's loop distribution (the same on every
    rank), truncated backprop; trajectory: every step runs as many loops as the data has per-loop
    labels (source pointer: data.label_loops) and applies the loss after every loop, under autograd
    (deep supervision of the whole chain)."""
    loop_loss_weights: Literal["uniform", "linear"] = "uniform"
    """trajectory: weights of the per-loop losses (linear: later loops weigh more)."""
    init_from: str | None = None
    """A model folder (config.json + model.safetensors) to start from instead of a random
    initialisation; parameters the folder lacks (e.g. a depth-wise LoRA added by a sweep) keep
    their initial values."""

    def check(self, path: str) -> None:
        p = lambda name: _join(path, name)  # noqa: E731
        for name in ("steps", "batch_size", "grad_accum", "log_every", "val_batches"):
            self.need(getattr(self, name) >= 1, p(name), "must be >= 1", getattr(self, name))
        self.need(self.lr > 0, p("lr"), "must be > 0", self.lr)
        self.need(0 <= self.min_lr <= self.lr, p("min_lr"), f"must be in [0, lr={self.lr}]", self.min_lr)
        self.need(0 <= self.warmup_steps <= self.steps, p("warmup_steps"), f"must be in [0, steps={self.steps}]",
                  self.warmup_steps)
        self.need(self.weight_decay >= 0, p("weight_decay"), "must be >= 0", self.weight_decay)
        self.need(all(0 <= b < 1 for b in self.betas), p("betas"), "both must be in [0, 1)", list(self.betas))
        self.need(self.grad_clip >= 0, p("grad_clip"), "must be >= 0 (0 disables)", self.grad_clip)
        self.need(self.eval_every >= 0, p("eval_every"), "must be >= 0 (0 disables)", self.eval_every)
        self.need(self.ponder_cost >= 0, p("ponder_cost"), "must be >= 0", self.ponder_cost)


@dataclass
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

    def check(self, path: str) -> None:
        self.need(self.every_steps >= 0, _join(path, "every_steps"), "must be >= 0", self.every_steps)
        self.need(self.keep >= 1, _join(path, "keep"), "must be >= 1", self.keep)

    def resolved_storage_path(self, run_root: str) -> str:
        """storage_path, or an absolute `<run_root>/checkpoints` (Ray Train wants absolute paths)."""
        if self.storage_path:
            return self.storage_path if "://" in self.storage_path else os.path.abspath(self.storage_path)
        return os.path.abspath(os.path.join(run_root, "checkpoints"))

    def resolved_export_dir(self, run_root: str) -> str:
        return os.path.abspath(self.export_dir or os.path.join(run_root, "export"))


@dataclass
class TrackingConfig(Section):
    """MLflow: one experiment per job kind; null tracking_uri means SQLite under the run root."""

    experiment: str = "mythos-pretrain"
    tracking_uri: str | None = None
    """null: sqlite:///<run.root>/mlflow.db (the MLFLOW_TRACKING_URI environment variable wins)."""
    run_name: str | None = None
    enabled: bool = True

    def check(self, path: str) -> None:
        self.need(bool(self.experiment), _join(path, "experiment"), "must be a non-empty name")


@dataclass
class ScalingConfig(Section):
    """Ray Train workers and what each one asks the cluster for."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Fractional values allowed (e.g. 0.5 to fit two workers and data tasks on 2 CPUs)."""
    resources: dict[str, float] = field(default_factory=dict)
    """Extra custom resources per worker, e.g. {accelerator_type:H100: 0.001}."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def check(self, path: str) -> None:
        self.need(self.num_workers >= 1, _join(path, "num_workers"), "must be >= 1", self.num_workers)
        self.need(self.cpus_per_worker > 0, _join(path, "cpus_per_worker"), "must be > 0", self.cpus_per_worker)
        for k, v in self.resources.items():
            self.need(v >= 0, _join(path, f"resources.{k}"), "must be >= 0", v)

    def worker_resources(self) -> dict[str, float]:
        """`resources_per_worker` for ray.train.ScalingConfig."""
        res = {"CPU": self.cpus_per_worker, **self.resources}
        if self.use_gpu:
            res.setdefault("GPU", 1.0)
        return res


@dataclass
class RunConfig(Section):
    """Where a job writes (MLflow store, checkpoints, exports) and how it recovers."""

    root: str = "./runs"
    name: str | None = None
    """Ray Train run name (a folder under the storage path); null: generated from the time."""
    max_failures: int = 0
    """Worker-group restarts from the latest checkpoint (Ray FailureConfig); -1: unlimited."""

    def check(self, path: str) -> None:
        self.need(bool(self.root), _join(path, "root"), "must be a path")
        self.need(self.max_failures >= -1, _join(path, "max_failures"), "must be >= -1", self.max_failures)


@dataclass
class PretrainConfig(Section):
    """Everything `jobs/pretrain.py` needs."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def check(self, path: str) -> None:
        model = self.model.build(_join(path, "model"))
        self.need(self.data.source == "pointer" or self.data.seq_len <= model.max_seq_len, _join(path, "data.seq_len"),
                  f"must be <= the model's max_seq_len={model.max_seq_len}", self.data.seq_len)
        if self.data.tokenizer == "byte":
            self.need(model.vocab_size >= 259, _join(path, "model.overrides.vocab_size"),
                      "must be >= 259 for the byte tokenizer", model.vocab_size)
        if self.train.parallelism == "fsdp" and self.scaling.num_workers > 1 and self.data.source == "pointer":
            self.need(self.data.pair_embedding != "factored", _join(path, "data.pair_embedding"),
                      "factored is not supported with train.parallelism=fsdp yet (use ddp, or token)",
                      self.data.pair_embedding)
        if self.train.init_from:
            self.need(Path(self.train.init_from, "model.safetensors").is_file(), _join(path, "train.init_from"),
                      "is not a model folder (config.json + model.safetensors)", self.train.init_from)
        if self.data.source == "pointer":
            self._check_pointer(path, model)
        else:
            self.need(self.train.loop_schedule != "trajectory", _join(path, "train.loop_schedule"),
                      "trajectory needs per-loop labels from the data: use data.source=pointer, or 'random'",
                      self.train.loop_schedule)

    def _check_pointer(self, path: str, model: MythosConfig) -> None:
        d, fmt = self.data, self.data.pointer_format()
        self.need(model.vocab_size >= fmt.vocab_size, _join(path, "model.overrides.vocab_size"),
                  f"must be >= {fmt.vocab_size} for {d.n_symbols} symbols", model.vocab_size)
        longest = [("max_hops", d.max_hops), ("val_hops", d.resolved_val_hops)]
        if d.fixed_point_fraction > 0:
            longest.append(("fixed_point_max_hops", d.fixed_point_max_hops))
        for key, hops in longest:
            self.need(fmt.prompt_len(hops) <= model.max_seq_len, _join(path, f"data.{key}"),
                      f"a {hops}-hop problem is {fmt.prompt_len(hops)} tokens, more than the model's "
                      f"max_seq_len={model.max_seq_len} (raise model.overrides.max_seq_len)", hops)
        if self.train.loop_schedule == "trajectory":
            loops = d.resolved_label_loops
            self.need(loops >= d.max_hops, _join(path, "data.label_loops"),
                      f"must be >= max_hops={d.max_hops}: a trajectory "
                      "runs at least as many loops as the longest training chain", d.label_loops)
            self.need(model.train_loops_max >= loops, _join(path, "model.overrides.train_loops_max"),
                      f"must be >= the {loops} loops a trajectory step runs (data.label_loops, default max_hops)",
                      model.train_loops_max)
        self.need(not model.tie_embeddings, _join(path, "model.overrides.tie_embeddings"),
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
    key = key.strip()
    if key.startswith("--"):
        key = key[2:]
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


def load_config(path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = (),
                cls: type[S] = PretrainConfig) -> S:  # type: ignore[assignment]
    """Defaults < YAML file at `path` (optional) < `overrides` ('a.b=c'); validated, or ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(str(path), "config file does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"is not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(str(path), "must hold a mapping of sections at the top level")
        data = loaded or {}
    data = apply_overrides(data, overrides or ())
    return cls.from_dict(data)
