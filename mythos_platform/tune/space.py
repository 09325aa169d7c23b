"""The sweep's search space: dotted pretrain-config keys mapped to distributions, checked up front.

    space:
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}
      model.overrides.train_loops_mean: [2, 4, 6]       # a list is a grid
      model.overrides.lora_rank: {choice: [0, 4, 8]}
      model.overrides.bptt_depth: 2                     # a scalar is fixed in every trial

Keys may also nest (`model: {overrides: {lora_rank: [4, 8]}}`), which is what
`--set space.model.overrides.lora_rank=[4,8]` produces. Every key must be a leaf of
`PretrainConfig` (under `model.overrides`, a `MythosConfig` field); every distribution must be
well formed; and every value a distribution can produce (each grid/choice item, the ends and
the middle of a range, and every combination of the discrete values when there are few) must
pass the pretrain config's own checks. Failures raise `ConfigError` naming `space.<key>`
before any trial starts.
"""

from __future__ import annotations

import difflib
import itertools
import math
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from mythos.config import MythosConfig

from ..config import ConfigError, PretrainConfig, Section

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
DISCRETE = ("grid", "choice", "fixed")
RESERVED = ("run.", "tracking.", "checkpoint.storage_path", "checkpoint.export_dir")
"""Keys the sweep itself sets for every trial (run root and name, MLflow experiment, storage)."""
MAX_COMBINATIONS = 512
"""Discrete spaces up to this size have every combination checked, not only each value."""


@dataclass(frozen=True)
class Param:
    """One searched (or fixed) key: `kind` in DISTRIBUTIONS or 'fixed', with its arguments."""

    key: str
    kind: str
    args: tuple

    def candidates(self) -> list[Any]:
        """Values to validate: every discrete value; a range's ends and middle."""
        if self.kind in DISCRETE:
            return list(self.args)
        lo, hi = self.args
        if self.kind == "randint":
            return sorted({lo, (lo + hi) // 2, hi})
        if self.kind == "loguniform":
            return [lo, math.sqrt(lo * hi), hi]
        return [lo, (lo + hi) / 2, hi]

    def to_tune(self, algorithm: str) -> Any:
        from ray import tune

        if self.kind == "fixed":
            return self.args[0]
        if self.kind == "grid" or (self.kind == "choice" and algorithm == "grid"):
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        lo, hi = self.args
        if self.kind == "uniform":
            return tune.uniform(lo, hi)
        if self.kind == "loguniform":
            return tune.loguniform(lo, hi)
        return tune.randint(lo, hi + 1)  # the YAML range is inclusive

    def describe(self) -> str:
        return f"{self.args[0]!r}" if self.kind == "fixed" else f"{self.kind}{list(self.args)}"


def parse_space(space: dict[str, Any], path: str = "space") -> list[Param]:
    """The (possibly nested) `space` mapping as a flat list of `Param`, shape-checked only."""
    flat: dict[str, Any] = {}
    for key, spec in _flatten(space, ""):
        flat[key] = spec  # the later spelling wins: `--set space.a.b=...` replaces a flat `a.b` entry
    return [_parse_spec(key, spec, f"{path}.{key}") for key, spec in flat.items()]


def _flatten(node: dict[str, Any], prefix: str) -> typing.Iterator[tuple[str, Any]]:
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and not (len(v) == 1 and next(iter(v)) in DISTRIBUTIONS):
            if not v:
                raise ConfigError(f"space.{key}", "empty mapping: give a value, a list (grid) or a distribution")
            if any(str(name) in DISTRIBUTIONS for name in v):
                raise ConfigError(f"space.{key}", f"a distribution is a mapping with exactly one of "
                                                  f"{', '.join(DISTRIBUTIONS)}", v)
            if len(v) == 1 and isinstance(next(iter(v.values())), list):
                name = str(next(iter(v)))
                close = difflib.get_close_matches(name, DISTRIBUTIONS, n=1)
                if close or _is_leaf(key):  # `key` takes a value, so this mapping is a (misspelt) distribution
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise ConfigError(f"space.{key}", f"unknown distribution {name!r}{hint}; allowed: "
                                                      f"{', '.join(DISTRIBUTIONS)}")
            yield from _flatten(v, key)
        else:
            yield key, v


def _parse_spec(key: str, spec: Any, path: str) -> Param:
    if isinstance(spec, list):
        spec = {"grid": spec}
    if not isinstance(spec, dict):
        return Param(key, "fixed", (_scalar(spec),))
    (kind, args), = spec.items()
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(path, f"{kind} needs a non-empty list of values", args)
        return Param(key, kind, tuple(_scalar(a) for a in args))
    if not isinstance(args, list) or len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(path, f"{kind} needs a list [low, high] of two numbers", args)
    lo, hi = (float(a) for a in args)
    if kind == "randint":
        if not all(float(a).is_integer() for a in args):
            raise ConfigError(path, "randint needs integer bounds [low, high] (both inclusive)", args)
        lo, hi = int(lo), int(hi)
    if not lo < hi:
        raise ConfigError(path, f"{kind} needs low < high", args)
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(path, "loguniform needs 0 < low < high", args)
    return Param(key, kind, (lo, hi))


def _scalar(x: Any) -> Any:
    """'1e-3' (YAML 1.1 leaves such floats as strings) -> 0.001; everything else unchanged."""
    if isinstance(x, str):
        try:
            return float(x) if any(c in x.lower() for c in ".e") else int(x)
        except ValueError:
            return x
    return x


def _is_number(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    try:
        float(str(x))
        return True
    except ValueError:
        return False


def check_key(key: str, path: str = "space") -> None:
    """`key` must name a leaf of PretrainConfig (a MythosConfig field under model.overrides)."""
    where = f"{path}.{key}"
    if any(key == r.rstrip(".") or key.startswith(r) for r in RESERVED):
        raise ConfigError(where, "is set by the sweep for every trial (run root/name, MLflow experiment, "
                                 "checkpoint storage) and cannot be searched")
    parts = key.split(".")
    cls: Any = PretrainConfig
    for i, part in enumerate(parts):
        done = ".".join(parts[:i])
        if _is_section(cls):
            fields = set(cls.model_fields)
            if part not in fields:
                close = difflib.get_close_matches(part, sorted(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(where, f"unknown key {part!r}{hint}; allowed in "
                                         f"{done or 'the pretrain config'!r}: {', '.join(sorted(fields))}")
            if done == "model" and part == "overrides":
                cls = MythosConfig
            else:
                cls = cls.model_fields[part].annotation
        elif typing.get_origin(cls) is dict:
            if i != len(parts) - 1:
                raise ConfigError(where, f"{'.'.join(parts[:i + 1])} is a value, not a section")
            return
        else:
            raise ConfigError(where, f"{done} is a value, not a section")
    if _is_section(cls) or typing.get_origin(cls) is dict:
        raise ConfigError(where, "names a whole section; search one of its fields")


def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_leaf(key: str) -> bool:
    try:
        check_key(key)
        return True
    except ConfigError:
        return False


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_params(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of the pretrain config dict `base` with dotted `values` set."""
    import copy

    out = copy.deepcopy(base)
    for key, value in values.items():
        set_dotted(out, key, value)
    return out


def validate_space(params: list[Param], base: dict[str, Any], algorithm: str, path: str = "space") -> None:
    """Keys, the algorithm's needs, and every candidate value against the pretrain config."""
    for p in params:
        where = f"{path}.{p.key}"
        check_key(p.key, path)
        if algorithm == "grid" and p.kind not in DISCRETE:
            raise ConfigError(where, f"search.algorithm 'grid' needs a value, a list or choice; {p.kind} "
                                     "ranges need search.algorithm random or optuna")
        if algorithm == "optuna" and p.kind == "grid":
            raise ConfigError(where, "optuna samples its own points: use choice instead of a grid list")
        for value in p.candidates():
            _check_values(base, {p.key: value}, where)
    discrete = [p for p in params if p.kind in DISCRETE]
    total = math.prod(len(p.args) for p in discrete)
    if len(discrete) > 1 and total <= MAX_COMBINATIONS:
        for combo in itertools.product(*(p.args for p in discrete)):
            values = {p.key: v for p, v in zip(discrete, combo)}
            _check_values(base, values, f"{path}.{'+'.join(values)}")


def _check_values(base: dict[str, Any], values: dict[str, Any], where: str) -> None:
    try:
        PretrainConfig.from_dict(apply_params(base, values))
    except ConfigError as exc:
        named = [k for k in values if exc.path == k]
        where = f"space.{named[0]}" if named else where
        shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
        raise ConfigError(where, f"the pretrain config rejects {shown}: {exc}") from None


def grid_size(params: list[Param], algorithm: str, num_samples: int) -> int | None:
    """Trials the search will run (None when a searcher decides, i.e. never for these algorithms)."""
    grid = math.prod(len(p.args) for p in params if p.kind == "grid" or (algorithm == "grid" and p.kind == "choice"))
    return grid * num_samples
