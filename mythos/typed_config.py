"""`ConfigModel`: the base of every configuration in the project (the model's `MythosConfig` and
every job section above it), on pydantic v2; and `ConfigError`, the one error they raise.

pydantic does the typing (types, literals, ranges written as `Field(ge=...)`, unknown keys,
defaults, nested sections); this module adds what a person editing a YAML file needs from the
error: the dotted path of the bad key (`train.lr`, `model.overrides.dim`), what was given, and what
is allowed, with "did you mean" for misspelt keys:

    train.lrr: unknown key (did you mean 'lr'?); allowed in 'train': batch_size, betas, ...
    train.lr: got -0.001; must be > 0

Cross-field rules live in a section's `check()`, which calls `self.need(cond, key, allowed,
value)` with keys relative to the section; they run as pydantic "after" validators, so the key
is placed under the section's own path wherever the section is nested.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

__all__ = ["ConfigError", "ConfigModel", "flatten_dict"]

_MISSING: Any = object()
C = TypeVar("C", bound="ConfigModel")


class ConfigError(ValueError):
    """A configuration key or value is invalid. `path` is the dotted key (e.g. `train.lr`) and
    `detail` what is wrong with it; `str()` is `"<path>: <detail>"`."""

    def __init__(self, path: str, message: str, value: Any = _MISSING) -> None:
        self.path = path
        self.detail = message if value is _MISSING else f"got {value!r}; {message}"
        super().__init__(f"{path}: {self.detail}" if path else self.detail)

    def under(self, prefix: str) -> "ConfigError":
        """The same error with its path placed under `prefix`."""
        if getattr(self, "unknown", None):
            return unknown_key(join(prefix, self.path), *self.unknown)
        return ConfigError(join(prefix, self.path), self.detail)


class ConfigModel(BaseModel):
    """A typed configuration section: unknown keys are errors, attribute docstrings are the field
    descriptions, and `check()` holds the rules that involve more than one field."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=(), allow_inf_nan=False,
                              validate_default=False)
    error_prefix: ClassVar[str] = ""
    """Put before the key in this class's own errors (e.g. `MythosConfig`); nested sections take
    their place's path instead."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            # pydantic runs a custom __init__ for nested sections too: keep the unprefixed error
            # so that the enclosing section can place it under its own path
            err = config_error(exc, type(self), self.error_prefix)
            err.local = config_error(exc, type(self)) if self.error_prefix else err
            raise err from None

    # --- rules ----------------------------------------------------------------------------
    def check(self) -> None:
        """Cross-field and derived checks of this section (keys relative to it); see `need`."""

    @staticmethod
    def need(cond: bool, key: str, allowed: str, value: Any = _MISSING) -> None:
        if not cond:
            raise ConfigError(key, allowed, value)

    @model_validator(mode="after")
    def _run_check(self):
        self.check()
        return self

    # --- conversions ----------------------------------------------------------------------
    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, path: str = "") -> C:
        """Validate `data` (a nested mapping, e.g. from YAML); `path` prefixes the error's key."""
        try:
            return cls.model_validate({} if data is None else data)
        except ValidationError as exc:
            raise config_error(exc, cls, path or cls.error_prefix) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists (tuples become lists): YAML/JSON-ready."""
        return _plain(self.model_dump())

    def flatten(self, sep: str = ".") -> dict[str, Any]:
        """Dotted keys to leaf values (dicts are walked too; lists stay lists): for MLflow params."""
        return flatten_dict(self.to_dict(), sep=sep)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with top-level fields replaced."""
        return type(self).from_dict({**self.to_dict(), **changes})


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else (path or key)


def flatten_dict(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten_dict(v, key, sep))
        else:
            out[key] = v
    return out


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# pydantic's errors -> ConfigError
# ---------------------------------------------------------------------------------------------
def config_error(exc: ValidationError, cls: type[BaseModel], prefix: str = "") -> ConfigError:
    """The first error of `exc` (validating `cls`) as a ConfigError whose path starts at `prefix`;
    the others, if any, are listed after it."""
    by_path: dict[str, list[tuple[dict[str, Any], ConfigError]]] = {}
    for e in exc.errors():
        one = _one(e, cls, prefix)
        by_path.setdefault(one.path, []).append((e, one))
    errors = []
    for path, found in by_path.items():
        if len(found) > 1:  # every member of a union refused the value: say which types are accepted
            e = found[0][0]
            tp = _annotation_at(cls, _without_union_tags(cls, tuple(e["loc"])))
            errors.append(ConfigError(path, f"expected {_type_name(tp)}", e.get("input", _MISSING)))
        else:
            errors.append(found[0][1])
    first = errors[0]
    if len(errors) > 1:
        more = f" (also invalid: {', '.join(e.path or '<top level>' for e in errors[1:])})"
        return ConfigError(first.path, first.detail + more)
    return first


def _one(err: dict[str, Any], cls: type[BaseModel], prefix: str) -> ConfigError:
    loc = _without_union_tags(cls, tuple(err["loc"]))
    path = _dotted(loc)
    kind, value, ctx = err["type"], err.get("input", _MISSING), err.get("ctx") or {}
    if kind == "value_error" and isinstance(ctx.get("error"), ConfigError):  # a check() or a nested section
        return getattr(ctx["error"], "local", ctx["error"]).under(join(prefix, path))
    if kind == "extra_forbidden":
        parent = _model_at(cls, loc[:-1])
        allowed = sorted(parent.model_fields) if parent is not None else []
        return unknown_key(join(prefix, path), str(loc[-1]), allowed)
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length tuple given too few items
        loc, path = loc[:-1], _dotted(loc[:-1])
        kind = "too_short"
    annotation = _annotation_at(cls, loc)
    if value is None and kind != "value_error":
        return ConfigError(join(prefix, path), f"must not be null; expected {_type_name(annotation)}")
    return ConfigError(join(prefix, path), _explain(kind, ctx, annotation, err["msg"]), value)


def _explain(kind: str, ctx: dict[str, Any], annotation: Any, msg: str) -> str:
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    if kind == "literal_error":
        return f"allowed: {ctx['expected'].replace(' or ', ', ')}"
    if kind.startswith("int_"):
        return "expected an integer"
    if kind == "finite_number":
        return "must be a finite number"
    if kind.startswith("float_"):
        return "expected a number"
    if kind.startswith("bool_"):
        return "expected true or false"
    if kind.startswith("string_"):
        return "expected a string"
    if kind in ("too_short", "too_long"):
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is tuple and args and args[-1] is not Ellipsis:
            return f"expected a list of {len(args)} items ({_type_name(annotation)})"
        if kind == "too_short":
            return f"must have at least {ctx.get('min_length')} item(s)"
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list ({_type_name(annotation)})"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "expected a mapping"
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    return msg


def unknown_key(path: str, key: str, allowed: list[str]) -> ConfigError:
    """The error for an unknown `key` at `path` (its last part), with "did you mean"."""
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    where = path.rsplit(".", 1)[0] if "." in path else ""
    place = f"in {where!r}" if where else "at the top level"
    err = ConfigError(path, f"unknown key{hint}; allowed {place}: {', '.join(allowed)}")
    err.unknown = (key, allowed)
    return err


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else join(out, str(part))
    return out


def _without_union_tags(cls: type[BaseModel], loc: tuple) -> tuple:
    """`loc` without the member names pydantic puts after a union-typed key ('limit', 'int')."""
    out: list = []
    for part in loc:
        tp = _annotation_at(cls, tuple(out))
        is_union = typing.get_origin(tp) in (Union, types.UnionType)
        if is_union and _model_at(cls, tuple(out)) is None and typing.get_origin(
                next((a for a in typing.get_args(tp) if a is not type(None)), None)) not in (list, tuple, dict):
            continue
        out.append(part)
    return tuple(out)


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    tp = _annotation_at(cls, loc)
    for cand in (tp, *typing.get_args(tp)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _annotation_at(cls: type[BaseModel], loc: tuple) -> Any:
    """The type annotation at `loc` below `cls` (through nested sections, optionals and lists)."""
    tp: Any = cls
    for part in loc:
        model = next((c for c in (tp, *typing.get_args(tp)) if isinstance(c, type) and issubclass(c, BaseModel)),
                     None)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            tp = model.model_fields[part].annotation
        elif typing.get_origin(tp) in (list, tuple, dict):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[-1] if args else Any
        else:
            return Any
    return tp


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
