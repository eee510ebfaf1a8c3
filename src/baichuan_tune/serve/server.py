"""An OpenAI-compatible HTTP API for a Baichuan model, on FastAPI + uvicorn.

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions (both with
`"stream": true` as server-sent events). Chat prompts follow the authors' format and history budget
(`generation.py`); defaults for temperature, top_k, top_p and repetition_penalty come from the
checkpoint's generation_config.json, and a request may override them (`top_k` and `repetition_penalty`
are accepted as extensions, as other OpenAI-compatible servers do). Every field of OpenAI's two request
schemas is accepted, ignored or refused by name (`openai_api.py`).

Concurrency: one generation thread, fed by a bounded queue. With `max_batch` > 0 (the default) it batches
continuously (`batching.BatchScheduler`): requests join the running batch between decoding steps and
leave as they end; requests the batch does not implement (log-probabilities, penalties, logit_bias, n,
best_of, a seed) run one at a time meanwhile. With `max_batch` 0 one worker generates for one request at
a time. Every request gets its own output channel, so concurrent clients never see each other's tokens;
when the queue is full a request is answered 429 at once instead of waiting without bound. A request's body is
limited (413 beyond), and parsing and tokenising it run in a thread, so a large request never holds up
the event loop (and /health).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .generation import (
    ChatFormatError,
    GenerationResult,
    GenerationSettings,
    IncrementalDecoder,
    TokenLogprob,
    build_chat_input,
    chat_generation_config,
    chat_token_ids,
    context_length,
    generate_text,
    logit_bias_config,
    prompt_format,
    score_tokens,
    split_rounds,
    token_bytes,
    token_text,
)
from ..models.tokenization_baichuan import EscapingTokenizer
from .openai_api import APIError, ChatRequest, CompletionRequest, _Sampling, parse_request

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # see ServeConfig.max_body_bytes for the reasoning
MAX_HEADER_BYTES = 16 * 1024  # request line + headers (h11's default, as Node.js's); more is answered 431


# ----------------------------------------------------------------------------- worker


@dataclass
class Choice:
    """One finished choice: choice `index` continues prompt `prompt` of its request."""

    index: int
    prompt: int
    result: GenerationResult
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo with logprobs: the prompt's own


@dataclass
class Job:
    """One request's generation: its prompts, its settings and the channel its events go back on.

    Events: ("text", (choice index, delta)) while generating, ("choice", Choice) as each one ends, then
    ("done", None); or ("error", APIError).
    """

    prompts: list[list[int]]
    settings: GenerationSettings
    loop: asyncio.AbstractEventLoop
    n: int = 1  # choices per prompt: choice i * n + j is prompt i's j-th
    best_of: int | None = None  # candidates per prompt, of which the n with the best mean log-prob are kept
    generate: bool = True  # False for max_tokens 0: the prompt is only echoed (and scored)
    adapter: int = 0  # which served LoRA adapter generates (0: the base model; see adapters.MultiLoRA)
    score_prompt: bool = False  # echo with logprobs: the prompt tokens' log-probs too
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone (server shut down): nobody is listening
            self.cancelled.set()


def _mean_logprob(result: GenerationResult) -> float:
    # OpenAI's best_of: "the one with the highest log probability per token".
    scores = [lp.logprob for lp in result.logprobs or []]
    return sum(scores) / len(scores) if scores else -math.inf


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

    def _gone(self, job: Job) -> bool:
        return job.cancelled.is_set() or self._stopping.is_set()

    def _generate(self, job: Job) -> None:
        try:
            if job.settings.seed is not None:
                torch.manual_seed(job.settings.seed)
            for number, prompt in enumerate(job.prompts):
                if self._gone(job):
                    break
                self._choices(job, number, prompt)
            job.send("done", None)
        except Exception as exc:  # noqa: BLE001 - reported to that client; the worker keeps serving
            job.send("error", APIError(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error"))

    def _choices(self, job: Job, number: int, prompt: list[int]) -> None:
        """Prompt `number`'s n choices, or the n best of its best_of candidates (which are not streamed)."""
        scored = score_tokens(self.model, prompt, job.settings.logprobs) if job.score_prompt else None
        ranked = job.best_of is not None and job.best_of > job.n
        settings = job.settings
        if ranked and settings.logprobs is None:
            settings = replace(settings, logprobs=0)  # the ranking needs each token's log-prob
        first, results = number * job.n, []
        for k in range(job.best_of if ranked else job.n):
            if self._gone(job):
                return
            on_text = None if ranked else (lambda text, index=first + k: job.send("text", (index, text)))
            results.append(self._sequence(job, prompt, settings, on_text))
        if ranked:
            results = sorted(results, key=_mean_logprob, reverse=True)[: job.n]
        for k, result in enumerate(results):
            job.send("choice", Choice(first + k, number, result, scored))

    def _sequence(self, job: Job, prompt: list[int], settings: GenerationSettings, on_text) -> GenerationResult:
        if not job.generate:
            return GenerationResult("", [], len(prompt), "length", [] if settings.logprobs is not None else None)
        return generate_text(self.model, self.tokenizer, prompt, settings, on_text=on_text,
                             cancelled=lambda: self._gone(job))


# ----------------------------------------------------------------------------- prompts and limits


@dataclass
class ServedModel:
    model: object
    tokenizer: object
    name: str
    api_key: str | None = None
    allow_control_tokens: bool = False  # message/prompt text may spell control tokens (`<reserved_106>` -> 195)
    adapter: int = 0  # the LoRA adapter this name serves (0: the base model itself)
    template: str | None = None  # its chat template (None: the one recorded with the model, see prompt_format)

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
    fmt = served.template or prompt_format(served.model)
    roles = chat_token_ids(base) | (_role_ids(served.template) if served.template else {})  # an adapter's own
    ids = dict(fmt=fmt, allow_control_tokens=served.allow_control_tokens, **roles)
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


def _role_ids(fmt: str) -> dict:
    """The role-token ids of a template that has its own (they replace the generation config's)."""
    from ..data.templates import get_template

    template = get_template(fmt)
    if template.user_token_id is None:
        return {}
    return dict(user_token_id=template.user_token_id, assistant_token_id=template.assistant_token_id)


def completion_prompt(served: ServedModel, req: CompletionRequest) -> tuple[list[list[int]], object]:
    """(each prompt's ids, generation config); 400 naming a prompt that is empty or cannot fit."""
    new_tokens = 16 if req.max_tokens is None else req.max_tokens  # OpenAI's default for completions
    _check_max_tokens(req.max_tokens, served.context, "max_tokens")
    items, prompts = req.prompts(), []
    tokenizer = served.tokenizer if served.allow_control_tokens else EscapingTokenizer(served.tokenizer)
    for i, item in enumerate(items):
        param = "prompt" if len(items) == 1 else f"prompt.{i}"
        if isinstance(item, str):
            prompt = tokenizer.encode(item, add_special_tokens=False)
        else:
            prompt = _known_ids(served, item, param)
        if not prompt:
            raise APIError(400, f"{param} must not be empty", param=param, code="invalid_value")
        if len(prompt) + new_tokens > served.context:
            raise APIError(400, f"{param} has {len(prompt)} tokens and max_tokens is {new_tokens}, over the model's "
                           f"context length ({served.context})", param=param, code="context_length_exceeded")
        prompts.append(prompt)
    return prompts, _settings(served, req, max(1, new_tokens))  # max_tokens 0 generates nothing (Job.generate)


def _known_ids(served: ServedModel, ids: list[int], param: str) -> list[int]:
    vocab = served.model.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"{param}: token id {bad} is not in the model's vocabulary (0 to {vocab - 1})",
                       param=param, code="invalid_value")
    return list(ids)


def _logit_bias(served: ServedModel, req: _Sampling) -> dict[int, float]:
    vocab, bias = served.model.config.vocab_size, {}
    for key, value in (req.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab):
            raise APIError(400, f"logit_bias.{key}: not a token id of this model (0 to {vocab - 1})",
                           param=f"logit_bias.{key}", code="invalid_value")
        bias[int(key)] = value
    return bias


def request_settings(served: ServedModel, req: _Sampling, config) -> GenerationSettings:
    """Everything the request decides about generation, on top of the prompt's generation config."""
    config.sequence_bias = logit_bias_config(_logit_bias(served, req))
    return GenerationSettings(config, stop=req.stops(), frequency_penalty=req.frequency_penalty or 0.0,
                              presence_penalty=req.presence_penalty or 0.0, logprobs=req.top(), seed=req.seed)


@dataclass
class Prepared:
    """A request made ready for the worker: parsed, checked, tokenised."""

    served: ServedModel
    req: _Sampling
    prompts: list[list[int]]
    settings: GenerationSettings
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text, put before its choices


def prepare(models: dict[str, ServedModel], raw: bytes, chat: bool) -> Prepared:
    """Parse, check and tokenise a request body (in a thread: tokenising a large prompt takes a while)."""
    req = parse_request(raw, ChatRequest if chat else CompletionRequest)
    served = _check_model(models, req)
    if chat:
        prompt, config = chat_prompt(served, req)
        return Prepared(served, req, [prompt], request_settings(served, req, config))
    prompts, config = completion_prompt(served, req)
    echo = None
    if req.echo:  # a text prompt comes back as it was sent; token ids as their text
        echo = [item if isinstance(item, str) else served.tokenizer.decode(item) for item in req.prompts()]
    return Prepared(served, req, prompts, request_settings(served, req, config), echo)


# ----------------------------------------------------------------------------- responses


DISCONNECT_POLL_S = 0.25


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chat_choice(index: int, delta=None, message=None, finish=None, logprobs=None) -> dict:
    key, value = ("delta", delta) if message is None else ("message", message)
    return {"index": index, key: value, "logprobs": logprobs, "finish_reason": finish}


def _text_choice(index: int, text: str, finish=None, logprobs=None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def text_offsets(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> tuple[list[int], int]:
    """Where each token's text starts in the decoded text of `ids`, and that text's length. A token that
    holds part of a character starts where the character does."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    offsets, length = [], 0
    for token_id in ids:
        offsets.append(length)
        length += len(decoder.push([token_id]))
    return offsets, length + len(decoder.flush())


def _shown_tokens(tokenizer, result: GenerationResult) -> tuple[list[int], list[int]]:
    """(offsets, count) of the generated tokens whose text the answer shows: a stop string cut the rest."""
    offsets, full = text_offsets(tokenizer, result.token_ids)
    if len(result.text) >= full:
        return offsets, len(offsets)
    return offsets, sum(1 for offset in offsets if offset < len(result.text))


def _chat_token(tokenizer, token_id: int, logprob: float) -> dict:
    raw = token_bytes(tokenizer, token_id)
    return {"token": token_text(raw), "logprob": logprob, "bytes": list(raw)}


def _top_dict(tokenizer, lp: TokenLogprob, top: int) -> dict[str, float]:
    # The legacy format: the `top` most likely tokens and always the chosen one (up to top + 1 entries).
    best = {}
    for token_id, logprob in [*lp.top[:top], (lp.token_id, lp.logprob)]:
        best.setdefault(token_text(token_bytes(tokenizer, token_id)), logprob)
    return best


@dataclass
class Rendering:
    """How one request's choices become OpenAI's response objects."""

    chat: bool
    tokenizer: object
    prompts: list[list[int]]
    n: int  # choices per prompt
    top: int | None  # None: no log-probs; k: the alternatives listed per token
    echo_texts: list[str] | None = None  # completions with echo: each prompt's text, before its choices

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def text(self, choice: Choice) -> str:
        return (self.echo_texts[choice.prompt] if self.echo_texts else "") + choice.result.text

    def logprobs(self, choice: Choice) -> dict | None:
        if self.top is None:
            return None
        return self._chat_logprobs(choice.result) if self.chat else self._legacy_logprobs(choice)

    def _chat_logprobs(self, result: GenerationResult) -> dict:
        _, shown = _shown_tokens(self.tokenizer, result)
        content = [{**_chat_token(self.tokenizer, lp.token_id, lp.logprob),
                    "top_logprobs": [_chat_token(self.tokenizer, i, v) for i, v in lp.top[: self.top]]}
                   for lp in result.logprobs[:shown]]
        return {"content": content, "refusal": None}

    def _legacy_logprobs(self, choice: Choice) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if self.echo_texts:
            prompt = self.prompts[choice.prompt]
            offsets, _ = text_offsets(self.tokenizer, prompt, skip_special_tokens=False)
            self._add_tokens(out, prompt, choice.prompt_logprobs or [None] * len(prompt), offsets, 0)
        offsets, shown = _shown_tokens(self.tokenizer, choice.result)
        start = len(self.echo_texts[choice.prompt]) if self.echo_texts else 0
        self._add_tokens(out, choice.result.token_ids[:shown], choice.result.logprobs[:shown], offsets, start)
        return out

    def _add_tokens(self, out: dict, ids, logprobs, offsets, start: int) -> None:
        for token_id, lp, offset in zip(ids, logprobs, offsets):
            out["tokens"].append(token_text(token_bytes(self.tokenizer, token_id)))
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else _top_dict(self.tokenizer, lp, self.top))
            out["text_offset"].append(start + offset)

    def opening(self, index: int) -> dict | None:
        """The first streamed chunk of choice `index`: the assistant role, or the echoed prompt."""
        if self.chat:
            return _chat_choice(index, delta={"role": "assistant", "content": ""})
        if self.echo_texts:
            return _text_choice(index, self.echo_texts[index // self.n])
        return None

    def finish(self, choice: Choice) -> dict:
        """The last streamed chunk of a choice (its log-probs come here, all at once)."""
        if self.chat:
            return _chat_choice(choice.index, delta={}, finish=choice.result.finish_reason,
                                logprobs=self.logprobs(choice))
        return _text_choice(choice.index, "", choice.result.finish_reason, self.logprobs(choice))

    def choice(self, choice: Choice) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": choice.result.text}
            return _chat_choice(choice.index, message=message, finish=choice.result.finish_reason,
                                logprobs=self.logprobs(choice))
        return _text_choice(choice.index, self.text(choice), choice.result.finish_reason, self.logprobs(choice))

    def usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(c.result.token_ids) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def body(self, head: dict, choices: list[Choice]) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        return {**head, "object": obj, "choices": [self.choice(c) for c in choices], "usage": self.usage(choices)}


async def _events(job: Job):
    """The job's ("text", ...) and ("choice", ...) events until it is done; an error event is raised."""
    while True:
        kind, value = await job.events.get()
        if kind == "error":
            raise value
        if kind == "done":
            return
        yield kind, value


async def _final(job: Job) -> list[Choice]:
    choices = [value async for kind, value in _events(job) if kind == "choice"]
    return sorted(choices, key=lambda c: c.index)


async def _result(job: Job, request) -> list[Choice] | None:
    """The job's choices, or None once the client has gone away.

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


async def _stream(job: Job, head: dict, render: Rendering, include_usage: bool):
    """Server-sent events: chunks as OpenAI sends them, then `data: [DONE]`; the job stops if the client goes."""
    obj = "chat.completion.chunk" if render.chat else "text_completion"

    def chunk(choice) -> str:
        return _sse({**head, "object": obj, "choices": [choice]})

    finished: list[Choice] = []
    try:
        for index in range(render.choices):
            opening = render.opening(index)
            if opening is not None:
                yield chunk(opening)
        async for kind, value in _events(job):
            if kind == "text":
                index, text = value
                yield chunk(_chat_choice(index, delta={"content": text}) if render.chat else _text_choice(index, text))
            else:
                finished.append(value)
                yield chunk(await anyio.to_thread.run_sync(render.finish, value))
        if include_usage:
            yield _sse({**head, "object": obj, "choices": [], "usage": render.usage(finished)})
    except APIError as exc:
        yield _sse(exc.body())
    finally:
        job.cancelled.set()
    yield "data: [DONE]\n\n"


# ----------------------------------------------------------------------------- app


def _authorize(served: ServedModel, request) -> None:
    if served.api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), served.api_key.encode()):
        raise APIError(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def _check_model(models: dict[str, ServedModel], req) -> ServedModel:
    if req.model not in models:
        names = ", ".join(f"'{name}'" for name in models)
        raise APIError(404, f"model '{req.model}' is not served here; this server serves {names}",
                       param="model", code="model_not_found")
    return models[req.model]


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


async def read_body(request, limit: int) -> bytes:
    """The request body, or 413 as soon as it is known to be over `limit` bytes (declared or received)."""
    too_large = APIError(413, f"request body is over this server's limit of {limit} bytes (serve --max-body-bytes)",
                         param=None, code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _job(ready: Prepared, loop) -> tuple[Job, Rendering]:
    req, chat, served = ready.req, isinstance(ready.req, ChatRequest), ready.served
    generate = chat or req.max_tokens != 0
    job = Job(ready.prompts, ready.settings, loop, n=req.choices(), best_of=getattr(req, "best_of", None),
              generate=generate, score_prompt=ready.echo_texts is not None and req.top() is not None,
              adapter=served.adapter)
    render = Rendering(chat, served.tokenizer, ready.prompts, req.choices(), req.top(), ready.echo_texts)
    return job, render


DEFAULT_MAX_BATCH = 8  # see ServeConfig.max_batch


def served_models(model, tokenizer, model_name: str, api_key=None, allow_control_tokens=False, adapters=None,
                  lora=None) -> dict[str, ServedModel]:
    """The names this server answers to: `model_name` (the model as loaded), then each of `lora`'s adapters."""
    base = dict(model=model, tokenizer=tokenizer, api_key=api_key, allow_control_tokens=allow_control_tokens)
    models = {model_name: ServedModel(name=model_name, **base)}
    for index, (name, template) in enumerate(lora.templates.items() if lora is not None else (), start=1):
        models[name] = ServedModel(name=name, adapter=index, template=template, **base)
    return models


def create_worker(model, tokenizer, max_queue: int, max_batch: int, slot_tokens: int | None, lora=None,
                  batch_invariant: bool = False):
    """The generation thread: a continuous-batching scheduler of `max_batch` rows, or (0) the one-at-a-time worker."""
    if max_batch == 0:
        if lora is not None:
            raise ValueError("several adapters are served through the batching scheduler: max_batch must be >= 1")
        return GenerationWorker(model, tokenizer, max_queue)
    from .batching import BatchScheduler, check_cache_memory

    slot_tokens = min(slot_tokens or context_length(model), context_length(model))
    check_cache_memory(model, max_batch, slot_tokens)
    return BatchScheduler(model, tokenizer, max_queue, max_batch, slot_tokens, lora=lora, batch_invariant=batch_invariant)


def create_app(model, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 64,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, allow_control_tokens: bool = False,
               max_batch: int = DEFAULT_MAX_BATCH, slot_tokens: int | None = None, adapters: dict | None = None,
               batch_invariant: bool = False):
    """The FastAPI app serving `model`; its lifespan starts and stops the generation thread.

    `max_batch`: requests decoded together (0: one at a time); `slot_tokens`: the longest request (prompt
    + max_tokens) the batch takes (default: the context length; longer ones run one at a time);
    `adapters`: {name: LoRA adapter folder}, each served under its name beside `model_name` (the base);
    `batch_invariant`: each request's logits independent of its batch (`batching.BatchDecoder`).
    """
    from contextlib import asynccontextmanager

    lora = None
    if adapters:
        from .adapters import MultiLoRA

        lora = MultiLoRA(model, adapters)
    models = served_models(model, tokenizer, model_name, api_key, allow_control_tokens, lora=lora)
    served = models[model_name]
    worker = create_worker(model, tokenizer, max_queue, max_batch, slot_tokens, lora, batch_invariant)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="baichuan-tune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    _error_handlers(app)

    async def generate(request: Request, chat: bool):
        _authorize(served, request)
        raw = await read_body(request, max_body_bytes)
        ready = await anyio.to_thread.run_sync(prepare, models, raw, chat)  # off the event loop: /health answers
        job, render = _job(ready, asyncio.get_running_loop())
        worker.submit(job)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": ready.served.name}
        if ready.req.stream:
            options = ready.req.stream_options
            return StreamingResponse(_stream(job, head, render, bool(options and options.include_usage)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices = await _result(job, request)
        if choices is None:  # nobody is left to read an answer
            return Response(status_code=499)
        return JSONResponse(await anyio.to_thread.run_sync(render.body, head, choices))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "waiting": worker.jobs.qsize(), "max_queue": max_queue,
                "running": getattr(worker, "busy", None), "max_batch": max_batch}

    @app.get("/v1/models")
    async def list_models(request: Request):
        _authorize(served, request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "baichuan-tune"} for name in models]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

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


REFUSED_DRAIN_S = 2.0  # how long the rest of an unparsable request is read (and dropped) before closing


def _json_error_protocol():
    """uvicorn's h11 protocol, answering a request it cannot parse (headers over MAX_HEADER_BYTES: 431,
    malformed: 400) with the same OpenAI-style JSON body as every other error, not uvicorn's plain text.

    uvicorn closes such a connection at once, and closing a socket with unread input resets it: a client
    still sending its headers gets "connection reset" instead of the answer. Here the rest of the request is
    read and dropped for up to REFUSED_DRAIN_S seconds after the answer, which the client then reads.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _Connection(h11.Connection):
        parse_error: h11.RemoteProtocolError | None = None  # why the request could not be parsed

        def next_event(self):
            try:
                return super().next_event()
            except h11.RemoteProtocolError as exc:
                self.parse_error = exc
                raise

    class JSONErrorH11Protocol(H11Protocol):
        refused = False  # answered already: what still arrives is dropped

        def __init__(self, config, *args, **kwargs):
            super().__init__(config, *args, **kwargs)
            self.limit = config.h11_max_incomplete_event_size or MAX_HEADER_BYTES
            self.conn = _Connection(h11.SERVER, self.limit)

        def data_received(self, data: bytes) -> None:
            if not self.refused:
                super().data_received(data)

        def send_400_response(self, msg: str) -> None:
            error = self.conn.parse_error
            status = getattr(error, "error_status_hint", 400)
            message = (f"request line and headers are over this server's limit of {self.limit} bytes" if status == 431
                       else f"invalid HTTP request ({error or msg})")
            body = json.dumps(APIError(status, message, code="invalid_http_request").body()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=status, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.refused = True
            self.loop.call_later(REFUSED_DRAIN_S, self.transport.close)

    return JSONErrorH11Protocol


def uvicorn_config(app, log_level: str = "info", **options):
    """The uvicorn configuration `serve` and BackgroundServer run `app` with."""
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, http=_json_error_protocol(),
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES, **options)


class BackgroundServer:
    """uvicorn serving `app` from a thread (for tests and notebooks): `.url`, `.stop()`; a context manager."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host if ':' not in self.host else f'[{self.host}]'}:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app, log_level, timeout_graceful_shutdown=5))
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
