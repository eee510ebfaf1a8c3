"""The request bodies the server accepts: every field of OpenAI's chat completions and legacy completions.

Each field is implemented, accepted and ignored (it has no effect on a local model: caching, storage and
billing hints, identifiers), or refused with a 400 that names it (what a text-only model without tool
calling or constrained decoding cannot do). docs/inference.md has the table; `refusals` holds the rules.

Bad input never reaches the model: the body is parsed and validated here (unknown fields and wrong types
are rejected, nothing is coerced) and answered 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_CHOICES = 128  # OpenAI's limit on `n`
MAX_BEST_OF = 20  # OpenAI's limit on `best_of`
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on chat's `top_logprobs`; legacy `logprobs` is allowed as many (OpenAI: 5)
MAX_SEQUENCES = 1024  # prompts x choices in one request: an evaluation batch, not a denial of service

# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered to the client as `status` with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def unsupported(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="unsupported_parameter")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str:
    # pydantic adds the tried union member to the location ("content", "list[ContentPart]"): drop those tags.
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and str(p) not in _TYPE_TAGS)]
    return ".".join(parts)


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param=param, code="unknown_field")
    if first["type"] == "missing":
        return APIError(400, f"missing required field '{param}'", param=param, code="missing_field")
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's own message
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


# ----------------------------------------------------------------------------- messages


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ContentPart(_Strict):
    """One part of a message's content. Only text (and an assistant's earlier refusal) can be read."""

    type: Literal["text", "refusal", "image_url", "input_audio", "file"]
    text: str | None = None
    refusal: str | None = None
    image_url: dict | None = None
    input_audio: dict | None = None
    file: dict | None = None
    prompt_cache_breakpoint: dict | None = None  # accepted, ignored: a caching hint


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted, ignored: the chat format has no speaker names
    refusal: str | None = None  # assistant: an earlier refusal, read as its text when there is no content
    tool_calls: list[dict] | None = None  # assistant: refused unless empty (no tool calling)
    function_call: dict | None = None  # assistant: refused (no function calling)
    audio: dict | None = None  # assistant: refused (no audio)
    tool_call_id: str | None = None  # tool messages, which are refused

    @model_validator(mode="after")
    def _developer_is_system(self):
        # OpenAI's newer name for the system role ("developer messages replace the previous system messages").
        if self.role == "developer":
            self.role = "system"
        return self

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            return self.refusal or ""
        return "".join(p.text if p.type == "text" else p.refusal for p in self.content)


def _message_refusals(i: int, m: ChatMessage) -> APIError | None:
    where = f"messages.{i}"
    if m.role in ("tool", "function"):
        return unsupported(f"{where}.role", f"'{m.role}' messages answer tool calls, which this model cannot make")
    for name in ("tool_calls", "function_call", "audio"):
        if getattr(m, name):
            return unsupported(f"{where}.{name}", "this model cannot make tool calls or speak; send text only")
    if m.content is None and m.role != "assistant":
        return APIError(400, f"missing required field '{where}.content'", param=f"{where}.content",
                        code="missing_field")
    for j, part in enumerate(m.content if isinstance(m.content, list) else []):
        if part.type not in ("text", "refusal"):
            return unsupported(f"{where}.content.{j}.type",
                               f"this model reads text only; a '{part.type}' content part cannot be used")
        if part.type == "refusal" and m.role != "assistant":
            return APIError(400, f"{where}.content.{j}: a refusal part belongs to an assistant message",
                            param=f"{where}.content.{j}.type", code="invalid_value")
        if getattr(part, part.type) is None:
            return APIError(400, f"missing required field '{where}.content.{j}.{part.type}'",
                            param=f"{where}.content.{j}.{part.type}", code="missing_field")
    return None


# ----------------------------------------------------------------------------- request bodies


class StreamOptions(_Strict):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None  # accepted, ignored: no obfuscation field is sent


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


Penalty = Field(None, ge=-2, le=2)  # OpenAI's range for frequency_penalty and presence_penalty
Bias = Annotated[float, Field(ge=-100, le=100)]  # OpenAI's range for a logit_bias value


class _Sampling(_Strict):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)  # extension
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # extension; beyond these logits overflow
    frequency_penalty: float | None = Penalty
    presence_penalty: float | None = Penalty
    logit_bias: dict[str, Bias] | None = None  # token id (a decimal string, checked by the server) -> bias
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI's; torch.manual_seed takes it
    user: str | None = None  # accepted, ignored: an end-user id for OpenAI's abuse monitoring

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value):
        # A length limit in Field() would also cap the characters of a single stop string.
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(value)}")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def choices(self) -> int:
        return self.n or 1


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # Refused when they ask for something (see `refusals`); their "off" values are accepted.
    tools: list[dict] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    functions: list[dict] | None = None
    function_call: Literal["none", "auto"] | dict | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None
    moderation: dict | None = None
    # Accepted, ignored: they change nothing a local model does.
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_options: dict | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = None

    def top(self) -> int | None:
        """The log-prob settings: None for none, else how many alternatives each token lists."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: score the prompt only
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    suffix: str | None = None  # refused unless empty: this model cannot fill in the middle

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_forms(cls, value, handler):
        try:
            return handler(value)
        except ValidationError:  # pydantic would report the last union member's complaint only
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id "
                             "lists") from None

    def top(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a string or a list of token ids (an empty one is refused later)."""
        if isinstance(self.prompt, str) or not self.prompt or isinstance(self.prompt[0], int):
            return [self.prompt]
        return list(self.prompt)


def _tool_refusals(req: ChatRequest) -> APIError | None:
    if req.tools:
        return unsupported("tools", "this model cannot call tools; send the request without tools")
    if req.functions:
        return unsupported("functions", "this model cannot call functions; send the request without functions")
    # With no tools, "none" and "auto" both mean a plain answer; anything else demands a call.
    if req.tool_choice not in (None, "none", "auto"):
        return unsupported("tool_choice", "this model cannot call tools; leave tool_choice out or 'none'")
    if req.function_call not in (None, "none", "auto"):
        return unsupported("function_call", "this model cannot call functions; leave function_call out or 'none'")
    return None


def _chat_refusals(req: ChatRequest) -> APIError | None:
    for i, message in enumerate(req.messages):
        if (error := _message_refusals(i, message)) is not None:
            return error
    if (error := _tool_refusals(req)) is not None:
        return error
    if req.response_format is not None and req.response_format.type != "text":
        return unsupported("response_format", f"type '{req.response_format.type}' needs constrained (JSON) "
                                              "decoding, which this server does not do; use {'type': 'text'}")
    if req.modalities and "audio" in req.modalities:
        return unsupported("modalities", "this model writes text only; use ['text']")
    for name, what in (("audio", "speak"), ("prediction", "use predicted outputs"),
                       ("web_search_options", "search the web"), ("moderation", "run a moderation model")):
        if getattr(req, name) is not None:
            return unsupported(name, f"this server cannot {what}; leave {name} out")
    if req.top_logprobs and not req.logprobs:
        return APIError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs", code="invalid_value")
    return None


def _completion_refusals(req: CompletionRequest) -> APIError | None:
    if req.suffix:
        return unsupported("suffix", "this model cannot insert text before a suffix; leave suffix out")
    if req.best_of is not None and req.best_of < req.choices():
        return APIError(400, f"best_of ({req.best_of}) must be at least n ({req.choices()})", param="best_of",
                        code="invalid_value")
    if req.best_of is not None and req.best_of > req.choices() and req.stream:
        return APIError(400, "best_of: the best of several candidates cannot be streamed", param="best_of",
                        code="invalid_value")
    return None


def refusals(req: _Sampling) -> APIError | None:
    """The first thing a valid request asks for that this server cannot do, as a 400; None if nothing."""
    error = _chat_refusals(req) if isinstance(req, ChatRequest) else _completion_refusals(req)
    if error is not None:
        return error
    sequences = (len(req.prompts()) if isinstance(req, CompletionRequest) else 1) * max(
        req.choices(), getattr(req, "best_of", None) or 1)
    if sequences > MAX_SEQUENCES:
        return APIError(400, f"the request asks for {sequences} sequences (prompts x n); at most {MAX_SEQUENCES}",
                        param="n", code="invalid_value")
    return None


# ----------------------------------------------------------------------------- parsing


def _no_constant(name: str):
    # Python's json accepts NaN and Infinity, which JSON does not; an infinite penalty would reach the model.
    raise ValueError(f"{name} is not a JSON number")


def parse_request(raw: bytes, cls):
    """The validated request of type `cls` in `raw`, or APIError (400) naming the first bad field."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON ({exc})", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "request body is not valid JSON (nested too deeply)", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        parsed = cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None
    bad = _not_unicode(data)
    if bad is not None:
        raise APIError(400, f"{bad}: not valid Unicode text (a lone surrogate escape such as \\ud800)",
                       param=bad, code="invalid_value")
    error = refusals(parsed)
    if error is not None:
        raise error
    return parsed


def _not_unicode(value, path: str = "") -> str | None:
    """The path of the first string holding a lone surrogate: JSON can escape one, no tokenizer can encode it."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "(body)"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _not_unicode(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
