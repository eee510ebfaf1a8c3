"""An OpenAI-compatible HTTP API for a Baichuan model, on FastAPI + uvicorn.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both with
`"stream": true` as server-sent events). Chat prompts follow the authors' format and history budget
(`generation.py`); defaults for temperature, top_k, top_p and repetition_penalty come from the
checkpoint's generation_config.json, and a request may override them (`top_k` and `repetition_penalty`
are accepted as extensions, as other OpenAI-compatible servers do).

Concurrency: one worker thread runs `generate` for one request at a time, fed by a bounded queue. Every
request gets its own output channel, so concurrent clients never see each other's tokens; when the
queue is full a request is answered 429 at once instead of waiting without bound.

Bad input never reaches the model: the body is parsed and validated here (unknown fields and wrong types
are rejected, nothing is coerced) and answered 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from .generation import (
    ChatFormatError,
    GenerationResult,
    build_chat_input,
    chat_generation_config,
    chat_token_ids,
    context_length,
    generate_text,
    prompt_format,
    split_rounds,
)
from .tokenization_baichuan import EscapingTokenizer

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


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc) -> str:
    # pydantic adds the tried union member to the location ("content", "list[TextPart]"): drop those tags.
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and str(p) not in _TYPE_TAGS)]
    return ".".join(parts)


def validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field '{param}'", param=param, code="unknown_field")
    if first["type"] == "missing":
        return APIError(400, f"missing required field '{param}'", param=param, code="missing_field")
    return APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value")


# ----------------------------------------------------------------------------- request bodies


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)  # beyond these the scaled logits overflow
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)  # int64, as OpenAI's; torch.manual_seed takes it
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value):
        # A length limit in Field() would also cap the characters of a single stop string.
        if isinstance(value, list) and len(value) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(value)}")
        return value

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str] = Field(min_length=1)


def _no_constant(name: str):
    # Python's json accepts NaN and Infinity, which JSON does not; an infinite penalty would reach the model.
    raise ValueError(f"{name} is not a JSON number")


async def parse_body(request, cls):
    raw = await request.body()
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


# ----------------------------------------------------------------------------- worker


@dataclass
class Job:
    """One request's generation: its inputs and the channel its events go back on."""

    prompt_ids: list[int]
    config: object
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            self.cancelled.set()


class GenerationWorker:
    """One thread generating for one request at a time, from a queue of at most `max_queue` waiting jobs."""

    def __init__(self, model, tokenizer, max_queue: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        while True:  # fail whatever still waits, so no client hangs
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            job.send("error", APIError(503, "server shutting down", "server_error", code="shutting_down"))
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        if self._stopping.is_set():
            raise APIError(503, "server shutting down", "server_error", code="shutting_down")
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"server busy: {self.max_queue} requests already waiting; retry shortly",
                           "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                job = self.jobs.get(timeout=0.1)
            except queue.Empty:
                continue
            if not job.cancelled.is_set():
                self._generate(job)

    def _generate(self, job: Job) -> None:
        try:
            if job.seed is not None:
                torch.manual_seed(job.seed)
            result = generate_text(self.model, self.tokenizer, job.prompt_ids, job.config,
                                   on_text=lambda text: job.send("text", text), stop=job.stop,
                                   cancelled=lambda: job.cancelled.is_set() or self._stopping.is_set())
            job.send("done", result)
        except Exception as exc:  # noqa: BLE001 - reported to that client; the worker keeps serving
            job.send("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))


# ----------------------------------------------------------------------------- prompts and limits


@dataclass
class ServedModel:
    model: object
    tokenizer: object
    name: str
    api_key: str | None = None
    allow_control_tokens: bool = False  # message/prompt text may spell control tokens (`<reserved_106>` -> 195)

    @property
    def context(self) -> int:
        return context_length(self.model)


def _settings(served: ServedModel, req: _Sampling, max_new_tokens: int):
    try:
        return chat_generation_config(served.model, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                      repetition_penalty=req.repetition_penalty, max_new_tokens=max_new_tokens)
    except ChatFormatError as exc:
        raise APIError(400, str(exc)) from None


def _check_max_tokens(requested: int | None, context: int, param: str) -> None:
    if requested is not None and requested >= context:
        raise APIError(400, f"{param} must be less than the model's context length ({context}), got {requested}",
                       param=param, code="invalid_value")


def chat_prompt(served: ServedModel, req: ChatRequest) -> tuple[list[int], object]:
    """(prompt ids, generation config) under the authors' history rule; 400 if the newest round cannot fit."""
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    requested = req.max_completion_tokens or req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
    _check_max_tokens(requested, served.context, param)
    base = _settings(served, req, requested)
    ids = dict(fmt=prompt_format(served.model), allow_control_tokens=served.allow_control_tokens,
               **chat_token_ids(base))
    try:
        system, rounds = split_rounds(messages)
        # A system message alone is a conversation too (the prompt is the system text and 196).
        newest = ([{"role": "system", "content": system}] if system else []) + (rounds[-1] if rounds else [])
        needed = len(build_chat_input(served.tokenizer, newest, model_max_length=10**9, max_new_tokens=1, **ids))
        new_tokens = requested or max(1, min(base.max_new_tokens, served.context - needed))
        config = _settings(served, req, new_tokens)
        if needed + new_tokens > served.context:
            raise APIError(400, f"the last message needs {needed} prompt tokens and {param} {new_tokens} more, over "
                           f"the model's context length ({served.context})", param="messages",
                           code="context_length_exceeded")
        prompt = build_chat_input(served.tokenizer, messages, model_max_length=served.context,
                                  max_new_tokens=new_tokens, **ids)
    except ChatFormatError as exc:
        raise APIError(400, str(exc), param="messages") from None
    return prompt, config


def completion_prompt(served: ServedModel, req: CompletionRequest) -> tuple[list[int], object]:
    if isinstance(req.prompt, list) and len(req.prompt) != 1:
        raise APIError(400, "prompt: one prompt per request is supported", param="prompt", code="invalid_value")
    text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    tokenizer = served.tokenizer if served.allow_control_tokens else EscapingTokenizer(served.tokenizer)
    prompt = tokenizer.encode(text, add_special_tokens=False)
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt", code="invalid_value")
    new_tokens = req.max_tokens or 16  # OpenAI's default for completions
    _check_max_tokens(req.max_tokens, served.context, "max_tokens")
    if len(prompt) + new_tokens > served.context:
        raise APIError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {new_tokens}, over the model's "
                       f"context length ({served.context})", param="prompt", code="context_length_exceeded")
    return prompt, _settings(served, req, new_tokens)


# ----------------------------------------------------------------------------- responses


DISCONNECT_POLL_S = 0.25


def _usage(result: GenerationResult) -> dict:
    completion = len(result.token_ids)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_choice(delta=None, message=None, finish=None) -> dict:
    key, value = ("delta", delta) if message is None else ("message", message)
    return {"index": 0, key: value, "logprobs": None, "finish_reason": finish}


def _text_choice(text: str, finish=None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


async def _events(job: Job):
    """The job's ("text", delta) events, then ("done", result); an error event is raised."""
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            raise value
        yield kind, value
        if kind == "done":
            return


async def _final(job: Job) -> GenerationResult:
    async for kind, value in _events(job):
        if kind == "done":
            return value


async def _result(job: Job, request) -> GenerationResult | None:
    """The job's result, or None once the client has gone away.

    uvicorn does not cancel a handler whose client disconnects, so without this check a timed-out client
    would keep the only worker generating for nobody until max_tokens.
    """
    final = asyncio.ensure_future(_final(job))
    try:
        while not (await asyncio.wait({final}, timeout=DISCONNECT_POLL_S))[0]:
            if await request.is_disconnected():
                return None
        return final.result()
    finally:
        final.cancel()
        job.cancelled.set()  # the worker stops at the next token (or skips a job not yet started)


async def _stream(job: Job, head: dict, chat: bool, include_usage: bool):
    """Server-sent events: chunks as OpenAI sends them, then `data: [DONE]`; the job stops if the client goes."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice) -> str:
        return _sse({**head, "object": obj, "choices": [choice]})

    try:
        if chat:
            yield chunk(_chat_choice(delta={"role": "assistant", "content": ""}))
        async for kind, value in _events(job):
            if kind == "text":
                yield chunk(_chat_choice(delta={"content": value}) if chat else _text_choice(value))
            else:
                yield chunk(_chat_choice(delta={}, finish=value.finish_reason) if chat
                            else _text_choice("", value.finish_reason))
                if include_usage:
                    yield _sse({**head, "object": obj, "choices": [], "usage": _usage(value)})
    except APIError as exc:
        yield _sse(exc.body())
    finally:
        job.cancelled.set()
    yield "data: [DONE]\n\n"


def _non_stream_body(head: dict, chat: bool, result: GenerationResult) -> dict:
    if chat:
        message = {"role": "assistant", "content": result.text}
        return {**head, "object": "chat.completion", "choices": [_chat_choice(message=message, finish=result.finish_reason)],
                "usage": _usage(result)}
    return {**head, "object": "text_completion", "choices": [_text_choice(result.text, result.finish_reason)],
            "usage": _usage(result)}


# ----------------------------------------------------------------------------- app


def _authorize(served: ServedModel, request) -> None:
    if served.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), served.api_key.encode()):
        raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _check_model(served: ServedModel, req):
    if req.model != served.name:
        raise APIError(404, f"model '{req.model}' is not served here; this server serves '{served.name}'",
                       param="model", code="model_not_found")
    return req


def _error_handlers(app) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown route (404), wrong method (405), ...
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return JSONResponse(APIError(400, str(exc.errors()[:1])).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}", "server_error").body(),
                            status_code=500)


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               allow_control_tokens: bool = False):
    """The FastAPI app serving `model`; its lifespan starts and stops the generation worker."""
    from contextlib import asynccontextmanager

    served = ServedModel(model, tokenizer, model_name, api_key, allow_control_tokens)
    worker = GenerationWorker(model, tokenizer, max_queue)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="baichuan-tune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    _error_handlers(app)

    async def generate(request: Request, req: _Sampling, prompt: list[int], config, chat: bool):
        job = Job(prompt, config, req.stops(), req.seed, asyncio.get_running_loop())
        worker.submit(job)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": served.name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(job, head, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _result(job, request)
        if result is None:  # nobody is left to read an answer
            return Response(status_code=499)
        return JSONResponse(_non_stream_body(head, chat, result))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "waiting": worker.jobs.qsize(), "max_queue": max_queue}

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(served, request)
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": created,
                                            "owned_by": "baichuan-tune"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(served, request)
        req = _check_model(served, await parse_body(request, ChatRequest))
        prompt, config = chat_prompt(served, req)
        return await generate(request, req, prompt, config, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(served, request)
        req = _check_model(served, await parse_body(request, CompletionRequest))
        prompt, config = completion_prompt(served, req)
        return await generate(request, req, prompt, config, chat=False)

    return app


# ----------------------------------------------------------------------------- running


def bind_socket(host: str, port: int):
    """A listening TCP socket on host:port (port 0: a free one), IPv4 or IPv6 as `host` is."""
    import socket

    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


class BackgroundServer:
    """uvicorn serving `app` from a thread (for tests and notebooks): `.url`, `.stop()`; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host if ':' not in self.host else f'[{self.host}]'}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0):
        if self.thread.is_alive():
            return self
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
