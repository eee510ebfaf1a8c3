"""Chat with the Baichuan chat models: the authors' prompt format, generation defaults and streaming.

Prompt format (read off the published Chat models):
- Baichuan2-Chat: [system tokens] + per round `195 + user tokens` and `196 + assistant tokens` (no eos
  between rounds) + a final 196. Input budget = model_max_length - max_new_tokens: whole old rounds are
  dropped first (the newest round is always kept), then the prompt is left-truncated.
- Baichuan-13B-Chat: the same ids and budget max(model_max_length // 2, model_max_length - max_new_tokens),
  no system role, and each assistant reply in the history is followed by eos (2), as its remote code does.

A model trained by this project is prompted in the template it was trained with (recorded in its folder,
see `templates.py`): `baichuan2` and `baichuan` are the two rules above, `human_assistant` and `base` the
templates' own prompts under the first rule's budget. A checkpoint with no record (the published ones)
follows its variant: Baichuan2 checkpoints (NormHead) the first rule, Baichuan-7B/13B checkpoints the second.
Message text is encoded so that it never yields a control token (`<reserved_106>` typed by a user stays
text, see `EscapingTokenizer`) unless `allow_control_tokens` is set.
Generation defaults come from the checkpoint's generation_config.json (the Chat models ship temperature
0.3, top_k 5, top_p 0.85, repetition_penalty 1.05 / 1.1, max_new_tokens 2048); a checkpoint without them
(a base model, the built-in default) gets the Baichuan2-Chat values. Every value can be overridden.
"""

from __future__ import annotations

import copy
import queue
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..errors import BaichuanTuneError
from ..data.templates import TEMPLATES, TemplateError, get_template, model_template
from ..models.tokenization_baichuan import EscapingTokenizer

ROLES = ("system", "user", "assistant")
FORMATS = tuple(TEMPLATES)  # the chat formats are the training templates

# Baichuan2-Chat's generation_config.json: the fallback for checkpoints that lack a chat config.
CHAT_DEFAULTS = {
    "user_token_id": 195,
    "assistant_token_id": 196,
    "do_sample": True,
    "temperature": 0.3,
    "top_k": 5,
    "top_p": 0.85,
    "repetition_penalty": 1.05,
}
DEFAULT_MAX_NEW_TOKENS = 2048
MIN_TEMPERATURE = 1e-5  # temperatures below this decode greedily (see chat_generation_config)


class ChatFormatError(BaichuanTuneError, ValueError):
    """A conversation or generation option the chat format cannot take; the message names the field."""


def chat_format(config) -> str:
    """"baichuan2" for Baichuan2 checkpoints (they have NormHead), "baichuan" for Baichuan-7B/13B."""
    return "baichuan2" if getattr(config, "norm_head", True) else "baichuan"


def prompt_format(model, fmt: str | None = None) -> str:
    """The chat format to prompt `model` in: `fmt` if given, else the template recorded with the model
    (the one it was trained in), else the published Chat models' rule (`chat_format`)."""
    return fmt or model_template(model) or chat_format(model.config)


def validate_messages(messages, fmt: str = "baichuan2") -> list[dict]:
    """Check a conversation ([{"role", "content"}, ...]) before any token is produced."""
    if fmt not in FORMATS:
        raise ChatFormatError(f"unknown chat format {fmt!r} (known: {', '.join(FORMATS)})")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatFormatError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system" and not get_template(fmt).allow_system:
            raise ChatFormatError(f"messages[{i}]: Baichuan-7B/13B chat has no system role")
        if role == "system" and i != 0:
            raise ChatFormatError(f"messages[{i}]: a system message may only come first")
    return list(messages)


def input_budget(model_max_length: int, max_new_tokens: int, fmt: str = "baichuan2") -> int:
    """Most prompt tokens the authors' rule keeps for a reply of `max_new_tokens`."""
    if fmt == "baichuan":
        return max(model_max_length // 2, model_max_length - max_new_tokens)
    budget = model_max_length - max_new_tokens
    if budget <= 0:
        raise ChatFormatError(
            f"max_new_tokens ({max_new_tokens}) must be smaller than the context length ({model_max_length})"
        )
    return budget


def _encode(tokenizer, text: str) -> list[int]:
    # The published tokenizer_config.json files set add_bos_token/add_eos_token false: text alone.
    return list(tokenizer.encode(text, add_special_tokens=False)) if text else []


def split_rounds(messages: list[dict]) -> tuple[str, list[list[dict]]]:
    """(system text, rounds): a round starts at each user message after the first message."""
    system, rounds, current = "", [], []
    for message in messages:
        if message["role"] == "system":
            system = message["content"]
            continue
        if message["role"] == "user" and current:
            rounds.append(current)
            current = []
        current.append(message)
    if current:
        rounds.append(current)
    return system, rounds


def _baichuan2_prompt(tokenizer, messages, budget, user_id, assistant_id) -> list[int]:
    system, rounds = split_rounds(messages)
    system_ids = _encode(tokenizer, system)
    history_budget = budget - len(system_ids)
    history: list[int] = []
    for round_ in reversed(rounds):
        ids: list[int] = []
        for message in round_:
            ids.append(user_id if message["role"] == "user" else assistant_id)
            ids += _encode(tokenizer, message["content"])
        # The newest round is always kept; an older one only if it fits whole.
        if history and len(history) + len(ids) > history_budget:
            break
        history = ids + history
        if len(history) >= history_budget:
            break
    prompt = system_ids + history
    if messages[-1]["role"] != "assistant":
        prompt.append(assistant_id)
    return prompt[-budget:]


def _baichuan_prompt(tokenizer, messages, budget, user_id, assistant_id, eos_id) -> list[int]:
    total: list[int] = []
    pending: list[int] = []  # the round being collected, newest message last
    for message in reversed(messages):
        content = _encode(tokenizer, message["content"])
        if message["role"] == "assistant":
            pending = [assistant_id] + content + [eos_id] + pending
            continue
        pending = [user_id] + content + pending
        if total and len(total) + len(pending) > budget:
            break
        total = pending + total
        pending = []
        if len(total) >= budget:
            break
    return total[-budget:] + [assistant_id]


def build_chat_input(
    tokenizer,
    messages,
    *,
    model_max_length: int,
    max_new_tokens: int,
    fmt: str = "baichuan2",
    user_token_id: int = 195,
    assistant_token_id: int = 196,
    eos_token_id: int = 2,
    allow_control_tokens: bool = False,
) -> list[int]:
    """Prompt ids for a conversation in chat format `fmt` (see the module docstring); message text never
    gives a control token unless `allow_control_tokens`."""
    messages = validate_messages(messages, fmt)
    budget = input_budget(model_max_length, max_new_tokens, fmt)
    if not allow_control_tokens:
        tokenizer = EscapingTokenizer(tokenizer, (user_token_id, assistant_token_id))
    if fmt == "baichuan":
        return _baichuan_prompt(tokenizer, messages, budget, user_token_id, assistant_token_id, eos_token_id)
    if fmt == "baichuan2":
        return _baichuan2_prompt(tokenizer, messages, budget, user_token_id, assistant_token_id)
    try:
        return get_template(fmt).encode_prompt(tokenizer, messages, budget)
    except TemplateError as exc:
        raise ChatFormatError(f"{exc.field.replace('turns', 'messages')}: {exc.problem} (chat format {fmt})") from None


# ----------------------------------------------------------------------------- generation settings


def context_length(model) -> int:
    """The model's context in tokens (BaichuanConfig keeps model_max_length = max_position_embeddings)."""
    config = model.config
    return int(getattr(config, "model_max_length", None) or config.max_position_embeddings)


def chat_generation_config(model, generation_config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
    """The checkpoint's generation config, chat defaults filled in where absent, then `overrides`.

    `temperature=0` (or below MIN_TEMPERATURE, or `do_sample=False`) means greedy decoding. Keys left None in `overrides` are
    ignored, so command-line options that were not given keep the checkpoint's values.
    """
    config = copy.deepcopy(generation_config or model.generation_config)
    for key, value in CHAT_DEFAULTS.items():
        if getattr(config, key, None) is None:
            setattr(config, key, value)
    if config.max_new_tokens is None:
        config.max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, context_length(model) // 2)
    for key in ("eos_token_id", "pad_token_id"):
        if getattr(config, key, None) is None:
            setattr(config, key, getattr(model.config, key, None))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("temperature") is not None and 0 <= overrides["temperature"] < MIN_TEMPERATURE:
        # Sampling tends to greedy as T -> 0, and below this logits / T overflows float32 into NaN.
        overrides.pop("temperature")
        overrides["do_sample"] = False
    for key, value in overrides.items():
        setattr(config, key, value)
    _check_generation_config(config)
    if not config.do_sample:
        config.temperature = config.top_k = config.top_p = None  # greedy: no sampling flags to warn about
    return config


def _check_generation_config(config: GenerationConfig) -> None:
    checks = [
        ("max_new_tokens", config.max_new_tokens is not None and config.max_new_tokens >= 1, "an integer >= 1"),
        ("temperature", config.temperature is None or config.temperature > 0, "a number > 0 (0 means greedy)"),
        ("top_p", config.top_p is None or 0 < config.top_p <= 1, "a number in (0, 1]"),
        ("top_k", config.top_k is None or config.top_k >= 0, "an integer >= 0"),
        ("repetition_penalty", config.repetition_penalty is None or 0.01 <= config.repetition_penalty <= 100,
         "a number in [0.01, 100]"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise ChatFormatError(f"generation option {name} must be {expected}, got {getattr(config, name)!r}")


def chat_token_ids(config: GenerationConfig) -> dict:
    """The role and eos ids of a chat generation config, as `build_chat_input` takes them."""
    return dict(user_token_id=config.user_token_id, assistant_token_id=config.assistant_token_id,
                eos_token_id=next(iter(_as_list(config.eos_token_id)), 2))


def chat_prompt_ids(model, tokenizer, messages, config: GenerationConfig, fmt: str | None = None,
                    allow_control_tokens: bool = False) -> list[int]:
    """Prompt ids of `messages` for `model` in its chat format (`prompt_format`)."""
    return build_chat_input(
        tokenizer,
        messages,
        model_max_length=context_length(model),
        max_new_tokens=config.max_new_tokens,
        fmt=prompt_format(model, fmt),
        allow_control_tokens=allow_control_tokens,
        **chat_token_ids(config),
    )


def _as_list(token_id) -> list[int]:
    if token_id is None:
        return []
    return list(token_id) if isinstance(token_id, (list, tuple)) else [token_id]


# ----------------------------------------------------------------------------- request settings


class FrequencyPresencePenalty(LogitsProcessor):
    """OpenAI's frequency and presence penalties, which transformers lacks (its repetition_penalty divides
    logits and counts the prompt too). From OpenAI's API reference, "Parameter details"
    (https://platform.openai.com/docs/api-reference/parameter-details):
    `mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence`, where c[j] counts how often
    token j was sampled before the current position: the generated tokens, not the prompt.
    """

    def __init__(self, prompt_length: int, frequency: float, presence: float):
        self.prompt_length, self.frequency, self.presence = prompt_length, frequency, presence

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


def logit_bias_config(bias: dict[int, float]) -> list | None:
    """OpenAI's `logit_bias` ({token id: bias added to its logit}) as transformers' `sequence_bias`."""
    return [[[token_id], float(value)] for token_id, value in sorted(bias.items())] or None


@dataclass
class GenerationSettings:
    """Everything that decides a generated sequence besides its prompt, in one object a scheduler can carry.

    transformers' GenerationConfig holds what `generate` reads (length, sampling, repetition penalty,
    logit bias as `sequence_bias`); the rest is what it has no field for.
    """

    config: GenerationConfig  # transformers' settings for `generate`
    stop: list[str] = field(default_factory=list)  # strings that end the text (cut from it)
    frequency_penalty: float = 0.0  # OpenAI's: subtracted from a logit once per earlier generated occurrence
    presence_penalty: float = 0.0  # OpenAI's: subtracted from a logit once the token was generated at all
    logprobs: int | None = None  # None: no log-probs; k: each token's log-prob and the k most likely ones
    seed: int | None = None  # torch's seed before the request's first sequence (reproducible sampling)

    def logits_processors(self, prompt_length: int) -> LogitsProcessorList:
        # transformers runs custom processors after its own penalties and bias, before temperature/top-k/top-p.
        if not (self.frequency_penalty or self.presence_penalty):
            return LogitsProcessorList()
        return LogitsProcessorList([FrequencyPresencePenalty(prompt_length, self.frequency_penalty,
                                                             self.presence_penalty)])


def _logprobs_of(logits: torch.Tensor, chosen: torch.Tensor, top: int) -> list[TokenLogprob]:
    """TokenLogprob for each row of `logits` [N, vocab] and its `chosen` id [N]."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, chosen[:, None])[:, 0].tolist()
    best = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
    ids, values = best.indices.tolist(), best.values.tolist()  # one transfer, not one per row
    return [TokenLogprob(token_id, picked[row], list(zip(ids[row], values[row])))
            for row, token_id in enumerate(chosen.tolist())]


@torch.inference_mode()
def score_tokens(model, token_ids: list[int], top: int = 0, chunk: int = 512) -> list[TokenLogprob | None]:
    """Each token's log-probability given the tokens before it (None for the first, which has no context),
    from one forward pass over `token_ids`; the output head runs on `chunk` positions at a time, so a long
    prompt never holds [length, vocab] logits at once."""
    from ..eval.scoring import _body_and_head

    body, head = _body_and_head(model)
    ids = torch.tensor([token_ids], dtype=torch.long, device=model_device(model))
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state[0]
    scored: list[TokenLogprob | None] = [None]
    for start in range(0, len(token_ids) - 1, chunk):
        end = min(start + chunk, len(token_ids) - 1)
        scored += _logprobs_of(head(hidden[start:end]), ids[0, start + 1 : end + 1], top)
    return scored


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The UTF-8 bytes a token stands for: a byte-fallback piece (<0xE4>) is one byte, "▁" a space."""
    if not 0 <= token_id < len(tokenizer):
        return b""  # an id of the model's padded vocabulary that the tokenizer never produces
    piece = tokenizer.convert_ids_to_tokens(token_id)
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def token_text(raw: bytes) -> str:
    """A token's bytes as text, or (part of a character) `bytes:\\xe4` as OpenAI writes such tokens."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


# ----------------------------------------------------------------------------- decoding loop


class IncrementalDecoder:
    """Text deltas from a growing list of token ids.

    transformers' TextStreamer holds text back until a space, which suits neither CJK-heavy chat nor a
    server that must stream every token; this decodes a short window instead (the prefix/read-offset
    scheme): it re-decodes only the tokens since the last emitted boundary and holds back a trailing
    U+FFFD, the sign of a multi-byte character whose bytes have not all arrived (byte-fallback pieces).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, new_ids) -> str:
        self.ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class _CallbackStreamer(BaseStreamer):
    """Feeds generated ids (not the prompt, not eos) to an IncrementalDecoder and its text to `on_text`."""

    def __init__(self, decoder: IncrementalDecoder, on_text: Callable[[str], None], eos_ids: list[int]):
        self.decoder = decoder
        self.on_text = on_text
        self.eos_ids = set(eos_ids)
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first pushes the whole prompt
            self.prompt_seen = True
            return
        text = self.decoder.push([i for i in value.reshape(-1).tolist() if i not in self.eos_ids])
        if text:
            self.on_text(text)

    def end(self):
        text = self.decoder.flush()
        if text:
            self.on_text(text)


class StopText:
    """Cuts the output at the first stop string and holds back text that may begin one."""

    def __init__(self, stops: list[str] | None):
        self.stops = [s for s in (stops or []) if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def feed(self, delta: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            safe = len(self.text)
        elif final:
            safe = len(self.text)
        else:
            hold = max((len(s) - 1 for s in self.stops), default=0)
            safe = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return out


class _StopWhen(StoppingCriteria):
    def __init__(self, predicate: Callable[[], bool]):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs):
        stop = bool(self.predicate())
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


@dataclass
class TokenLogprob:
    """A token's log-probability under the model's own distribution (log-softmax of its logits, before
    temperature, penalties or bias) and the `top` most likely tokens at its position, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class GenerationResult:
    def __init__(self, text: str, token_ids: list[int], prompt_tokens: int, finish_reason: str,
                 logprobs: list[TokenLogprob] | None = None):
        self.text = text
        self.token_ids = token_ids
        self.prompt_tokens = prompt_tokens
        self.finish_reason = finish_reason  # "stop" (eos or a stop string) or "length"
        self.logprobs = logprobs  # one per token id, when asked for (GenerationSettings.logprobs)


def model_device(model) -> torch.device:
    """Where the model's (first) weights are: where its inputs go."""
    return next(model.parameters()).device


@torch.inference_mode()
def generate_text(
    model,
    tokenizer,
    prompt_ids: list[int],
    config: GenerationConfig | GenerationSettings,
    on_text: Callable[[str], None] | None = None,
    stop: list[str] | None = None,
    cancelled: Callable[[], bool] | None = None,
    fast: bool | None = None,
) -> GenerationResult:
    """Generate one reply for `prompt_ids` through `fast_decode.decode`, passing text deltas to `on_text`.

    `config` is a GenerationConfig or GenerationSettings (which adds stop strings, OpenAI's penalties and
    log-probabilities). Stops at eos, at `max_new_tokens`, at the first stop string (cut from the text)
    or when `cancelled()` turns true. Deltas passed to `on_text` add up to the returned text. Plain
    settings decode through `fast_decode.decode` (`fast`: None takes the fast path on CUDA, transformers'
    generate otherwise); OpenAI's penalties and log-probabilities go through transformers' generate.
    """
    settings = config if isinstance(config, GenerationSettings) else GenerationSettings(config)
    stop_text = StopText(list(settings.stop) + list(stop or []))
    if settings.logprobs is not None or len(settings.logits_processors(len(prompt_ids))):
        return _generate_with_processors(model, tokenizer, prompt_ids, settings, stop_text, on_text, cancelled)
    from .fast_decode import decode

    config = settings.config
    eos = set(_as_list(config.eos_token_id))
    decoder = IncrementalDecoder(tokenizer)
    kept: list[int] = []

    def deliver(delta: str) -> None:
        out = stop_text.feed(delta)
        if out and on_text is not None:
            on_text(out)

    def on_tokens(rows: list[list[int]]) -> bool:
        # Token by token, so that a stop string or a cancellation ends the reply where it happened.
        for token in rows[0]:
            kept.append(token)
            if token in eos:
                return True
            text = decoder.push([token])
            if text:
                deliver(text)
            if stop_text.stopped or (cancelled is not None and cancelled()):
                return True
        return False

    decode(model, [list(prompt_ids)], config, on_tokens, fast=fast)
    tail = decoder.flush()
    if tail:
        deliver(tail)
    tail = stop_text.feed("", final=True)
    if tail and on_text is not None:
        on_text(tail)
    new_ids = kept
    ended = stop_text.stopped or (new_ids and new_ids[-1] in eos) or len(new_ids) < config.max_new_tokens
    if new_ids and new_ids[-1] in eos:
        new_ids = new_ids[:-1]
    return GenerationResult(stop_text.text, new_ids, len(prompt_ids), "stop" if ended else "length")


def _generate_with_processors(model, tokenizer, prompt_ids, settings, stop_text, on_text, cancelled) -> GenerationResult:
    """generate_text through transformers' generate: custom logits processors and per-step raw logits."""
    eos = _as_list(settings.config.eos_token_id)

    def deliver(delta: str) -> None:
        out = stop_text.feed(delta)
        if out and on_text is not None:
            on_text(out)

    streamer = _CallbackStreamer(IncrementalDecoder(tokenizer), deliver, eos)
    criteria = StoppingCriteriaList([_StopWhen(lambda: stop_text.stopped or (cancelled is not None and cancelled()))])
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=model_device(model))
    want_logprobs = settings.logprobs is not None
    config = settings.config
    if want_logprobs:  # the raw logits of each step: the model's own distribution
        config = copy.copy(config)
        config.output_logits = config.return_dict_in_generate = True
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        logits_processor=settings.logits_processors(len(prompt_ids)),
        streamer=streamer,
        stopping_criteria=criteria,
    )
    tail = stop_text.feed("", final=True)
    if tail and on_text is not None:
        on_text(tail)
    sequence = output.sequences[0] if want_logprobs else output[0]
    new_ids = sequence[len(prompt_ids) :].tolist()
    ended = stop_text.stopped or (new_ids and new_ids[-1] in eos) or len(new_ids) < settings.config.max_new_tokens
    if new_ids and new_ids[-1] in eos:
        new_ids = new_ids[:-1]
    logprobs = None
    if want_logprobs and new_ids:
        steps = torch.cat(output.logits[: len(new_ids)], dim=0)  # [new tokens, vocab]
        logprobs = _logprobs_of(steps, sequence[len(prompt_ids) : len(prompt_ids) + len(new_ids)], settings.logprobs)
    elif want_logprobs:
        logprobs = []
    return GenerationResult(stop_text.text, new_ids, len(prompt_ids), "stop" if ended else "length", logprobs)


def stream_in_thread(run: Callable[[Callable[[str], None]], object]) -> Iterator[str]:
    """Run `run(on_text)` in a thread and yield its text deltas; an exception there is raised here."""
    deltas: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def target():
        try:
            run(deltas.put)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            failure.append(exc)
        finally:
            deltas.put(done)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    while (item := deltas.get()) is not done:
        yield item
    thread.join()
    if failure:
        raise failure[0]


def chat(
    model,
    tokenizer,
    messages,
    stream: bool = False,
    generation_config: GenerationConfig | None = None,
    fmt: str | None = None,
    allow_control_tokens: bool = False,
    **overrides,
):
    """The authors' `model.chat`: the reply text, or with `stream=True` an iterator over the reply so far.

    As in the authors' code, the streamed values are the whole response up to now (not deltas), and
    generation settings come from `generation_config` or the model's, with `overrides` on top
    (temperature, top_k, top_p, repetition_penalty, max_new_tokens, do_sample, ...). The prompt is in the
    template recorded with the model (`fmt` overrides it); `allow_control_tokens=True` lets message text
    produce control tokens (`<reserved_106>` -> 195), as the authors' code does.
    """
    config = chat_generation_config(model, generation_config, **overrides)
    prompt_ids = chat_prompt_ids(model, tokenizer, messages, config, fmt, allow_control_tokens)
    if not stream:
        return generate_text(model, tokenizer, prompt_ids, config).text

    def cumulative() -> Iterator[str]:
        text = ""
        for delta in stream_in_thread(lambda on_text: generate_text(model, tokenizer, prompt_ids, config, on_text)):
            text += delta
            yield text

    return cumulative()


@torch.no_grad()
def greedy_answers(model, tokenizer, template: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to `prompts`, one user turn each, in `template`'s chat format: how the training demos ask
    the model before and after training."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids = get_template(template).encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
        input_ids = torch.tensor([ids], device=model.device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
