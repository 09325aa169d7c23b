"""OpenAI-style request bodies of `/v1/completions`, `/v1/chat/completions` and `/tokenize`, and the error format.

Requests are pydantic v2 models in strict mode with unknown fields forbidden, so a wrong type
("max_tokens": "5"), an out-of-range or non-finite value ("temperature": NaN) or a field this server
does not know fails validation; `validation_error` turns pydantic's errors into one OpenAI-style 400
body that names the field:

    {"error": {"message": "max_tokens: Input should be a valid integer", "type": "invalid_request_error",
               "param": "max_tokens", "code": "int_type"}}

What clients send by default is accepted: `null` for any field means its default (as in OpenAI's
API), and the neutral values of features this server does not have (`n: 1`, `best_of: 1`,
`frequency_penalty: 0`, `presence_penalty: 0`, `suffix: null`, `logit_bias: {}`); any other value of
those is refused with code `unsupported_value`, naming the field.

Extension fields (not in OpenAI's API): `n_loops` (loop iterations of the recurrent block per
token), `exit_threshold` (adaptive exit), `top_k`, `ignore_eos`. Responses carry a `mythos` object with the
loop count asked for and the mean loops actually run per step.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError


def only(allowed: Callable[[Any], bool], message: str) -> AfterValidator:
    """A validator that accepts the neutral values of a feature the server does not have."""
    def check(value: Any) -> Any:
        if not allowed(value):
            raise PydanticCustomError("unsupported_value", message)
        return value
    return AfterValidator(check)


ONE = only(lambda v: v == 1, "only 1 is supported (one choice per prompt; send a list of prompts for more)")
NO_PENALTY = only(lambda v: v == 0, "only 0 is supported (this server applies no repetition penalties)")
Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    """Send a last chunk with `usage` (and `mythos`) and no choices before [DONE]."""


class OpenAIRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (sampling, streaming, extensions)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=0, description="null: the server's limits.default_max_tokens; "
                                                           "0 only with echo (score the prompt)")
    temperature: Finite = Field(1.0, ge=0.0, le=2.0, description="0: greedy (top_p/top_k are then ignored)")
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: Annotated[int, ONE] = 1
    user: str | None = None
    frequency_penalty: Annotated[Finite, NO_PENALTY] = 0.0
    presence_penalty: Annotated[Finite, NO_PENALTY] = 0.0
    logit_bias: Annotated[dict[str, float], only(lambda v: not v, "only {} is supported (no logit bias)")] = {}
    # --- extensions ---------------------------------------------------------------------
    n_loops: int | None = Field(None, ge=1, description="loop iterations per token; null: the server default")
    exit_threshold: Finite | None = Field(None, ge=0.0, description="adaptive exit threshold; null: server default")
    top_k: int = Field(0, ge=0, description="keep the k most likely tokens (0: off)")
    ignore_eos: bool = Field(False, description="generate max_tokens tokens even past EOS (benchmarks)")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="A string, a list of strings (one choice each), a list of token ids, or a list of those.")
    echo: bool = Field(False, description="put the prompt before the completion (and its logprobs)")
    logprobs: int | None = Field(None, ge=0, description="the k most likely tokens at each position; "
                                                         "null: no logprobs")
    best_of: Annotated[int, ONE] = 1
    suffix: Annotated[str, only(lambda v: v == "", "is not supported (no insertion); send null")] = ""

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text or a list of token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [list(self.prompt)]
        return list(self.prompt)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """What the chat template sees: role, content as one string (text parts joined), name if any."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text, **({"name": self.name} if self.name else {})}


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens; "
                                                                      "wins when both are given")
    logprobs: bool = Field(False, description="each generated token's logprob")
    top_logprobs: int | None = Field(None, ge=0, description="the k most likely tokens at each position "
                                                             "(needs logprobs: true)")
    response_format: Annotated[dict[str, Any], only(lambda v: v == {"type": "text"},
                                                    "only {'type': 'text'} is supported")] = {"type": "text"}


class TokenizeRequest(BaseModel):
    """POST /tokenize (vLLM's API; lm-eval's remote tokenizer uses it): a prompt, or chat messages
    rendered by the chat template."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="put the prefix token first, as the completion routes do")
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int]


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


def _field_names(*models: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for m in models:
        names |= set(m.model_fields)
    return names


REQUEST_FIELDS = _field_names(CompletionRequest, ChatCompletionRequest, StreamOptions, ChatMessage, ContentPart,
                              TokenizeRequest, DetokenizeRequest)
"""Names that may appear in an error location (other strings there are pydantic's union branch tags)."""


def _param(loc: tuple) -> str | None:
    """('stop', 'list[str]', 2) -> 'stop[2]'; union branch tags (strings that are not fields) are dropped."""
    if not loc:
        return None
    out = str(loc[0])
    for part in loc[1:]:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in REQUEST_FIELDS:
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
    # a union field (prompt, stop, content) fails once per branch: name the branch that got furthest
    # (`messages[0].content[0].type`), unless the furthest ones disagree on the place
    under = [e for e in errors if e["loc"][:1] == errors[0]["loc"][:1]]
    depth = max(len(e["loc"]) for e in under)
    deepest = {_param(tuple(e["loc"])) for e in under if len(e["loc"]) == depth}
    if len(deepest) == 1:
        first = deepest.pop()
    same = [e for e in errors if _param(tuple(e["loc"])) == first]
    msgs = list(dict.fromkeys(e["msg"] for e in same))
    code = same[0]["type"]
    if code == "extra_forbidden":
        msg = f"{first}: unknown field (not supported by this server)"
    else:
        msg = f"{first}: " + " or ".join(msgs)
    return APIError(400, msg, first, code)


def parse_request(raw: bytes, cls: type[BaseModel] = CompletionRequest) -> Any:
    """The request body as `cls`; APIError(400) naming the first bad field."""
    try:
        return cls.model_validate_json(raw)
    except ValidationError as exc:
        raise validation_error(exc) from None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def mythos_info(n_loops: int, loops_used: float, exit_threshold: float | None) -> dict[str, Any]:
    return {"n_loops": n_loops, "loops_used": round(loops_used, 3), "exit_threshold": exit_threshold}
