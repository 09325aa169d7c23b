"""OpenAI-style request and response bodies of `/v1/completions`, and the error format.

Requests are pydantic v2 models in strict mode with unknown fields forbidden, so a wrong type
("max_tokens": "5"), an out-of-range value or a field this server does not know (e.g. "logprobs")
fails validation; `validation_error` turns pydantic's errors into one OpenAI-style 400 body that
names the field:

    {"error": {"message": "max_tokens: Input should be a valid integer", "type": "invalid_request_error",
               "param": "max_tokens", "code": "int_type"}}

Extension fields (not in OpenAI's API): `n_loops` (loop iterations of the recurrent block per
token), `exit_threshold` (adaptive exit), `top_k`, `ignore_eos`. Responses carry a `mythos` object with the
loop count asked for and the mean loops actually run per step.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    """Send a last chunk with `usage` (and `mythos`) and no choices before [DONE]."""


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str | list[str] = Field(description="A string, or a list of strings (one choice each).")
    max_tokens: int | None = Field(None, ge=1, description="null: the server's limits.default_max_tokens")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0: greedy (top_p/top_k are then ignored)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    echo: bool = Field(False, description="only false is supported")
    user: str | None = None
    # --- extensions ---------------------------------------------------------------------
    n_loops: int | None = Field(None, ge=1, description="loop iterations per token; null: the server default")
    exit_threshold: float | None = Field(None, ge=0.0, description="adaptive exit threshold; null: server default")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0: off)")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past EOS (benchmarks)")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status; `param` names the field."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param(loc: tuple) -> str | None:
    """('stop', 'list[str]', 2) -> 'stop[2]'; union branch tags (strings after the field) are dropped."""
    if not loc:
        return None
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in CompletionRequest.model_fields or part in StreamOptions.model_fields:
            out += f".{part}"
    return out


def validation_error(exc: ValidationError) -> APIError:
    """pydantic's errors -> one 400 naming the first bad field (messages of that field joined)."""
    errors = exc.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {errors[0]['msg']}", None, "json_invalid")
    if errors and not errors[0]["loc"]:
        return APIError(400, f"request body: {errors[0]['msg']}", None, errors[0]["type"])
    first = _param(tuple(errors[0]["loc"]))
    same = [e for e in errors if _param(tuple(e["loc"])) == first]
    msgs = list(dict.fromkeys(e["msg"] for e in same))
    code = same[0]["type"]
    if code == "extra_forbidden":
        msg = f"{first}: unknown field (not supported by this server)"
    else:
        msg = f"{first}: " + " or ".join(msgs)
    return APIError(400, msg, first, code)


def parse_request(raw: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def new_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def mythos_info(n_loops: int, loops_used: float, exit_threshold: float | None) -> dict[str, Any]:
    return {"n_loops": n_loops, "loops_used": round(loops_used, 3), "exit_threshold": exit_threshold}


def completion(id: str, model: str, choices: list[dict], usage_: dict, mythos: dict) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_, "mythos": mythos}


def chunk(id: str, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, **extra}
