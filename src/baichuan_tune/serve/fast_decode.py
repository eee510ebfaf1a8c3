"""Decoding for chat, `serve` and PPO rollouts: one entry point, `decode`, with a fast path and a reference path.

`decode(model, prompts, config)` returns the new tokens of each prompt. On a CUDA device it takes the fast
path (`Decoder`) whenever the generation config asks only for what that path implements (greedy or sampled,
temperature, top-k, top-p, repetition penalty, min/max new tokens, eos ids); otherwise, or with
`fast=False`, it runs transformers' `generate`, the reference that the tests compare the fast path with.

The fast path, built for batch-1 latency and batched throughput alike:
- `SlotCache`: one fixed [B, H, K, D] key and value buffer per layer and a write position per row, so
  prompts of different lengths need no padding, each row's positions are its own, and a row can be
  refilled while the others decode (the shape a continuous-batching scheduler needs);
- prefill: the model's ordinary forward (SDPA's flash path when the rows have one length), its keys and
  values then copied into the SlotCache;
- a decoding step: the model forward for one token per row (through `torch.compile`, which fuses RMSNorm,
  rotary and the small element-wise kernels), then the logits rules, sampling and eos bookkeeping, all
  on the device with static buffers. On CUDA the whole step is captured once in a CUDA graph and replayed
  for every token, so the host issues one launch per token instead of hundreds; it reads the new tokens
  back every `sync_every` steps (to stream them and to stop when every row has ended).

Sampling follows transformers' order and formulas (repetition penalty, min-new-tokens eos ban, then
temperature, top-k, top-p) and draws with the exponential-race form of multinomial sampling
(argmax p_i / E_i, E_i ~ Exp(1)), which needs no host sync and is graph-safe.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
from transformers.cache_utils import DynamicCache
from transformers.generation.streamers import BaseStreamer

from ..models.modeling_baichuan import NO_CUDNN_SDPA, sdpa_on

logger = logging.getLogger(__name__)

# Generation options the fast path does not implement: any of them away from its default takes the reference path.
CHECKED_OPTIONS = (
    "num_beams", "num_beam_groups", "num_return_sequences", "penalty_alpha", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "force_words_ids", "constraints", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "sequence_bias", "guidance_scale", "min_p", "top_h", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "watermarking_config", "renormalize_logits", "output_scores", "output_logits",
    "output_attentions", "output_hidden_states", "return_dict_in_generate", "stop_strings", "min_length",
    "max_time", "prompt_lookup_num_tokens", "assistant_early_exit", "dola_layers", "token_healing",
    "diversity_penalty", "low_memory",
)
CACHE_MIN = 256  # the shortest cache a decoder gets (see cache_length)
# SDPA's kernels for decoding. On an H200 (torch 2.11) the batch's masked bf16 decoding forward, repeated
# from one state at the Baichuan2-7B shape, gave some rows of a few hundred keys other bits in 40 of 40
# repeats with SDPA's own choice and 38 of 40 with cuDNN's attention forced, so the same greedy request
# answered differently alone twice; the memory-efficient kernel and math gave the same bits every time
# (benchmarks/bench_serve_replay.py, docs/PERFORMANCE.md "Serving under load"). Decoding leaves cuDNN out.
DECODE_SDPA = NO_CUDNN_SDPA


def reproducible_attention(backends: tuple[SDPBackend, ...] = DECODE_SDPA):
    """A context in which the model's SDPA calls run only on `backends` (by default, kernels whose forward
    is deterministic)."""
    return sdpa_on(backends)


# ----------------------------------------------------------------------------- the one entry point


def decode(model, prompts: list[list[int]], config: GenerationConfig,
           on_tokens: Callable[[list[list[int]]], bool] | None = None, fast: bool | None = None) -> list[list[int]]:
    """The new tokens of each prompt, each list up to and including its eos (if one was generated).

    `on_tokens(new)` receives, as they arrive, each row's tokens since the previous call (every step on the
    reference path, every few steps on the fast path; a row that has ended gets no more); returning True
    stops every row. `fast`: None = the fast path on CUDA when `fast_path_refusal` finds nothing against
    it; True = the fast path (also on CPU, without CUDA graphs); False = transformers' `generate`.
    """
    if not prompts or any(not p for p in prompts):
        raise ValueError("decode needs at least one prompt and no empty prompt")
    refusal = fast_path_refusal(model, config)
    if fast is None:
        fast = refusal is None and model_device(model).type == "cuda"
    elif fast and refusal is not None:
        raise ValueError(f"the fast decoding path cannot serve this request: {refusal}")
    if not fast:
        return plain_decode(model, prompts, config, on_tokens)
    decoder = cached_decoder(model, len(prompts), max(len(p) for p in prompts) + config.max_new_tokens)
    return decoder.generate(prompts, SamplingParams.from_config(config), on_tokens)


def fast_path_refusal(model, config: GenerationConfig) -> str | None:
    """Why the fast path cannot run `config` on `model` (None: it can)."""
    lm = causal_lm(model)
    if not (hasattr(lm, "model") and hasattr(lm.model, "layers") and getattr(lm.config, "model_type", "") == "baichuan"):
        return f"{type(lm).__name__} is not a Baichuan model"
    if config.max_new_tokens is None:
        return "max_new_tokens is not set"
    defaults = GenerationConfig()
    for key in CHECKED_OPTIONS:
        value, default = getattr(config, key, None), getattr(defaults, key, None)
        if value != default and not (value in (None, 0, False) and default in (None, 0, False)):
            return f"generation option {key}={value!r} is not implemented there"
    if config.use_cache is False:
        return "use_cache=False"
    return None


def causal_lm(model):
    """The BaichuanForCausalLM inside `model` (itself, or the one a PEFT wrapper holds)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def eos_ids(config: GenerationConfig) -> list[int]:
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(i) for i in eos] if isinstance(eos, (list, tuple)) else [int(eos)]


# ----------------------------------------------------------------------------- reference path


class _TokenStreamer(BaseStreamer):
    """Hands each step's tokens from `generate` to `on_tokens` (rows that ended get none) and keeps its verdict."""

    def __init__(self, on_tokens, batch: int, eos: set[int]):
        self.on_tokens, self.eos = on_tokens, eos
        self.ended = [False] * batch
        self.prompt_seen = False
        self.stop = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first pushes the prompt
            self.prompt_seen = True
            return
        new = []
        for row, token in enumerate(value.reshape(-1).tolist()):
            new.append([] if self.ended[row] else [token])
            self.ended[row] = self.ended[row] or token in self.eos
        self.stop = bool(self.on_tokens(new)) or self.stop

    def end(self):
        pass


class _StopWhen(StoppingCriteria):
    def __init__(self, predicate: Callable[[], bool]):
        self.predicate = predicate

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), bool(self.predicate()), dtype=torch.bool, device=input_ids.device)


def plain_decode(model, prompts, config, on_tokens=None) -> list[list[int]]:
    """transformers' `generate` on the left-padded prompts: the reference path."""
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    device = model_device(model)
    eos = set(eos_ids(config))
    extra = {}
    if on_tokens is not None:
        streamer = _TokenStreamer(on_tokens, len(prompts), eos)
        extra = dict(streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopWhen(lambda: streamer.stop)]))
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             **extra)
    return [_until_eos(row, eos) for row in out[:, width:].tolist()]


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in eos:
            return tokens[: i + 1]
    return tokens


# ----------------------------------------------------------------------------- sampling


@dataclasses.dataclass
class SamplingParams:
    """What one decoding request asks for (transformers' GenerationConfig fields of the same names)."""

    max_new_tokens: int  # tokens to generate at most
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0  # logits / temperature before top-k and top-p
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    repetition_penalty: float = 1.0  # CTRL's penalty on every token of the prompt and the reply so far
    min_new_tokens: int = 0  # eos is banned before this many new tokens
    eos: tuple[int, ...] = ()  # ids that end a row
    pad: int = 0  # the token a row that has ended emits

    @classmethod
    def from_config(cls, config: GenerationConfig) -> SamplingParams:
        eos = tuple(eos_ids(config))
        sample = bool(config.do_sample)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        return cls(
            max_new_tokens=int(config.max_new_tokens), do_sample=sample,
            temperature=float(config.temperature or 1.0) if sample else 1.0,
            top_k=int(config.top_k or 0) if sample else 0, top_p=float(config.top_p or 1.0) if sample else 1.0,
            repetition_penalty=float(config.repetition_penalty or 1.0), min_new_tokens=int(config.min_new_tokens or 0),
            eos=eos, pad=int(pad),
        )

    def kind(self, vocab: int) -> tuple:
        """Which captured step serves these settings: greedy, plain sampling, top-k (k candidates), or a sort."""
        if not self.do_sample:
            return ("greedy",)
        if 0 < self.top_k < vocab:
            return ("top_k", self.top_k)
        return ("sort",) if self.top_p < 1.0 else ("sample",)


def penalized(logits, seen, penalty, banned):
    """transformers' RepetitionPenaltyLogitsProcessor over the tokens seen so far ([B, V] bool), then the
    min-new-tokens eos ban ([B, V] bool)."""
    scaled = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, scaled, logits).masked_fill(banned, -math.inf)


def sample_from(logits, kind: tuple, temperature, top_k, top_p):
    """Next tokens [B] from processed logits [B, V]: the argmax, or a draw from `candidates`."""
    if kind[0] == "greedy":
        return logits.argmax(-1)
    probs, index = candidates(logits, kind, temperature, top_k, top_p)
    picked = race(probs)
    return picked if index is None else index.gather(1, picked[:, None])[:, 0]


def candidates(logits, kind: tuple, temperature, top_k, top_p):
    """transformers' temperature, top-k and top-p warpers and the softmax: (probabilities [B, N], their
    token ids [B, N], or None when N is the whole vocabulary in order). top_k [B] (0: all); temperature
    and top_p [B, 1]."""
    logits = logits / temperature
    if kind[0] == "sample":
        return logits.softmax(-1), None
    if kind[0] == "top_k":
        values, index = logits.topk(kind[1], dim=-1)  # [B, k], descending
    else:
        values, index = logits.sort(dim=-1, descending=True)
    rank = torch.arange(values.shape[-1], device=logits.device)
    values = values.masked_fill((top_k[:, None] > 0) & (rank >= top_k[:, None]), -math.inf)
    # TopPLogitsWarper: in ascending order, drop tokens whose cumulative probability is <= 1 - top_p.
    ascending = values.flip(-1).softmax(-1).cumsum(-1).flip(-1)
    drop = ascending <= 1 - top_p
    drop[:, 0] = False  # the most likely token always stays
    return values.masked_fill(drop, -math.inf).softmax(-1), index


def race(probs):
    """One draw per row from `probs` [B, N]: argmax p / E with E ~ Exp(1) (the same law as multinomial)."""
    return (probs / torch.empty_like(probs).exponential_()).argmax(-1)


# ----------------------------------------------------------------------------- the cache


class SlotCache:
    """Fixed-size keys and values ([B, H, K, D] per layer) with one write position per row.

    It speaks the cache protocol BaichuanModel uses (update / get_seq_length / get_mask_sizes /
    is_compileable): `get_seq_length()` is a [B] tensor, so each row's new tokens go to its own slots and
    get its own positions, and nothing reads a length on the host.
    """

    is_compileable = True

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, max_len: int, dtype, device):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_layers, batch, dtype=torch.long, device=device)  # tokens held, per layer and row
        self.rows = torch.arange(batch, device=device)[:, None]  # [B, 1]
        self.max_len = max_len

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        slots = self.lengths[layer_idx][:, None] + torch.arange(key_states.shape[2], device=key_states.device)  # [B, T]
        self.keys[layer_idx][self.rows, :, slots] = key_states.transpose(1, 2)  # [B, T, H, D] into [B, H, K, D]
        self.values[layer_idx][self.rows, :, slots] = value_states.transpose(1, 2)
        self.lengths[layer_idx] += key_states.shape[2]
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> torch.Tensor:
        return self.lengths[layer_idx]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.max_len, 0

    def load(self, cache: DynamicCache, lengths: torch.Tensor) -> None:
        """Take a prefill's keys and values (slots 0..T-1 of every row) and set each row's length."""
        for i, layer in enumerate(cache.layers):
            width = layer.keys.shape[2]
            self.keys[i][:, :, :width].copy_(layer.keys)
            self.values[i][:, :, :width].copy_(layer.values)
        self.lengths.copy_(lengths.to(self.lengths.device).expand_as(self.lengths))


# ----------------------------------------------------------------------------- the decoder


def cache_length(needed: int, context: int) -> int:
    """Slots for `needed` tokens: the next power of two from CACHE_MIN, within the context when it fits, so
    that requests of similar length share one decoder (one captured graph) and attention reads < 2x needed."""
    length = CACHE_MIN
    while length < needed:
        length *= 2
    return max(needed, min(length, context))


def context_of(model) -> int:
    config = causal_lm(model).config
    return int(getattr(config, "model_max_length", None) or config.max_position_embeddings)


def cached_decoder(model, batch: int, needed: int) -> Decoder:
    """The model's decoder for `batch` rows and `needed` slots (prompt + new tokens), reused across calls
    while it is at most twice the length needed and the weights are the same tensors; one is kept per
    model (a new one frees the old cache first)."""
    lm = causal_lm(model)
    decoder = lm.__dict__.get("_fast_decoder")
    if decoder is not None and decoder.fits(model, batch, needed):
        return decoder
    lm.__dict__.pop("_fast_decoder", None)
    del decoder
    lm.__dict__["_fast_decoder"] = decoder = Decoder(model, batch, cache_length(needed, context_of(model)))
    return decoder


class Decoder:
    """Prefill and per-token decoding of `batch` rows over one SlotCache of `max_len` slots.

    `generate(prompts, params)` runs a whole request. `cuda_graph` / `compile` default to on for a CUDA
    model (8-bit bitsandbytes layers sync with the host, so not for them); `sync_every` is how many steps
    pass between reads of the new tokens.
    """

    cache_class = SlotCache  # the KV cache it decodes over
    sdpa_backends = DECODE_SDPA  # SDPA's kernels for its prefills and steps

    def __init__(self, model, batch: int, max_len: int, *, cuda_graph: bool | None = None,
                 compile: bool | None = None, sync_every: int = 8):
        self.model, self.lm = model, causal_lm(model)
        config = self.lm.config
        self.device = model_device(model)
        embed = self.lm.get_input_embeddings().weight
        self.batch, self.max_len, self.vocab = batch, max_len, config.vocab_size
        int8 = any(type(m).__name__ == "Linear8bitLt" for m in self.lm.modules())
        on_cuda = self.device.type == "cuda"
        self.cuda_graph = on_cuda and not int8 if cuda_graph is None else cuda_graph
        use_compile = on_cuda and not int8 if compile is None else compile
        self.sync_every = sync_every
        self.weights = self._fingerprint(model)
        self.cache = self.cache_class(config.num_hidden_layers, batch, config.num_attention_heads, config.head_dim,
                               max_len, embed.dtype, self.device)
        self._allocate(batch, max_len, config.vocab_size)
        head = self.lm.lm_head
        self.norm_head = type(head).__name__ == "NormHead"
        # NormHead: the decoder keeps its own normalised copy, refreshed per request, at a fixed address.
        self.head_weight = torch.empty_like(head.weight) if self.norm_head else None
        self._forward = torch.compile(self._logits, dynamic=None) if use_compile else self._logits
        self._graphs: dict[tuple, torch.cuda.CUDAGraph | bool] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.cuda_graph else None

    def _allocate(self, batch, max_len, vocab):
        with torch.inference_mode():
            new = dict(device=self.device)
            self.tokens = torch.zeros(batch, 1, dtype=torch.long, **new)  # the token each row feeds next
            self.out = torch.zeros(batch, max_len, dtype=torch.long, **new)  # new tokens, by step
            self.step = torch.zeros(1, dtype=torch.long, **new)  # steps recorded so far
            self.finished = torch.zeros(batch, dtype=torch.bool, **new)
            self.seen = torch.zeros(batch, vocab, dtype=torch.bool, **new)  # tokens the repetition penalty hits
            self.is_eos = torch.zeros(vocab, dtype=torch.bool, **new)
            self.min_new = torch.zeros(batch, 1, dtype=torch.long, **new)
            self.penalty = torch.ones(batch, 1, **new)
            self.temperature = torch.ones(batch, 1, **new)
            self.top_p = torch.ones(batch, 1, **new)
            self.top_k = torch.zeros(batch, dtype=torch.long, **new)
            self.pad = torch.zeros(batch, dtype=torch.long, **new)

    @staticmethod
    def _fingerprint(model) -> tuple:
        """What a captured graph bakes in: the weights' addresses (in-place updates are seen, new tensors are
        not) and the host-side switches of adapter layers (PEFT's active adapter, disabled, merged)."""
        switches = tuple((getattr(m, "active_adapters", None), getattr(m, "disable_adapters", None), m.merged)
                         for m in model.modules() if hasattr(m, "merged") and hasattr(m, "disable_adapters"))
        return tuple(p.data_ptr() for p in model.parameters()), repr(switches)

    def fits(self, model, batch: int, needed: int) -> bool:
        return (model is self.model and batch == self.batch
                and needed <= self.max_len <= 2 * cache_length(needed, context_of(model))
                and self._fingerprint(model) == self.weights)

    # -- the step

    def _head(self, hidden):
        if self.norm_head:
            return F.linear(hidden, self.head_weight)
        return self.lm.lm_head(hidden)

    def _logits(self):
        """fp32 logits [B, V] of the token after `self.tokens`, which the cache takes in."""
        with reproducible_attention(self.sdpa_backends):
            hidden = self.lm.model(input_ids=self.tokens, cache=self.cache, use_cache=True).last_hidden_state
        return self._head(hidden[:, -1]).float()

    def _choose(self, logits, kind: tuple):
        banned = self.is_eos[None] & (self.step < self.min_new)  # [B, V]
        logits = penalized(logits, self.seen, self.penalty, banned)
        return sample_from(logits, kind, self.temperature, self.top_k, self.top_p)

    def _record(self, next_tokens):
        next_tokens = torch.where(self.finished, self.pad, next_tokens)
        self.out.index_copy_(1, self.step, next_tokens[:, None])
        self.finished |= self.is_eos[next_tokens]
        self.seen.scatter_(1, next_tokens[:, None], True)
        self.tokens.copy_(next_tokens[:, None])
        self.step += 1

    def _step(self, kind: tuple):
        self._record(self._choose(self._forward(), kind))

    def _run_step(self, kind: tuple):
        if not self.cuda_graph:
            return self._step(kind)
        graph = self._graphs.get(kind)
        if graph is None:
            graph = self._graphs[kind] = self._capture(kind)
        if graph is False:
            return self._step(kind)
        graph.replay()

    def _capture(self, kind: tuple):
        """Warm up (compiling, cuBLAS handles) on a side stream, capture one step, then restore the state
        the warm-up steps moved on. Their cache writes lie past each row's length (slots the next steps
        overwrite) and inside the buffer: a graph is captured at a request's first decoding step, so only
        when max_new_tokens >= 2, and the two warm-up writes land at most at prompt + 1 < prompt + max_new.
        Where compiling or capturing fails, say so once and decode without it (False: no graph)."""
        state = self._state()
        saved = [t.clone() for t in state]
        rng = torch.cuda.get_rng_state(self.device)  # the warm-up draws too: a seeded request must not see it
        try:
            graph = self._warm_and_capture(kind)
        except Exception as exc:  # noqa: BLE001 - a slower path still decodes correctly
            graph = self._fallback(kind, exc)
        for target, value in zip(state, saved):
            target.copy_(value)
        torch.cuda.set_rng_state(rng, self.device)
        return graph

    def _state(self) -> tuple:
        """The tensors a decoding step moves on (restored after the warm-up steps of a capture)."""
        return (self.cache.lengths, self.step, self.finished, self.seen, self.tokens)

    def _warm_and_capture(self, kind: tuple) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(kind)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(kind)
        return graph

    def _fallback(self, kind: tuple, exc: Exception):
        torch.cuda.synchronize()
        if self._forward is not self._logits:
            logger.warning("fast decoding: torch.compile failed (%s: %s); using eager kernels in the CUDA graph",
                           type(exc).__name__, exc)
            self._forward = self._logits
            try:
                return self._warm_and_capture(kind)
            except Exception as again:  # noqa: BLE001
                exc = again
        logger.warning("fast decoding: CUDA graph capture failed (%s: %s); decoding step by step",
                       type(exc).__name__, exc)
        return False

    # -- a request

    def _begin(self, prompts: list[list[int]], params: SamplingParams):
        if params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {params.max_new_tokens}")
        longest = max(len(p) for p in prompts)
        if len(prompts) != self.batch or longest + params.max_new_tokens > self.max_len:
            raise ValueError(f"this decoder takes {self.batch} prompts of at most "
                             f"{self.max_len - params.max_new_tokens} tokens")
        if params.top_k >= self.vocab:
            params = dataclasses.replace(params, top_k=0)
        self.step.zero_()
        self.finished.zero_()
        self.seen.zero_()
        for row, prompt in enumerate(prompts):
            self.seen[row, torch.tensor(prompt, device=self.device)] = True
        self.is_eos.zero_()
        if params.eos:
            self.is_eos[list(params.eos)] = True
        self.min_new.fill_(params.min_new_tokens)
        self.penalty.fill_(params.repetition_penalty)
        self.temperature.fill_(params.temperature)
        self.top_p.fill_(params.top_p)
        self.top_k.fill_(params.top_k)
        self.pad.fill_(params.pad)
        if self.norm_head:
            weight = self.lm.lm_head.weight
            self.head_weight.copy_(F.normalize(weight.detach().float(), dim=-1).to(weight.dtype))
        return params

    def _prefill(self, prompts: list[list[int]]):
        """Prompt forward through the model's ordinary path; fills the SlotCache; logits of each last token."""
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        width = int(lengths.max())
        ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(prompt, device=self.device)
        mask = None if bool((lengths == width).all()) else (torch.arange(width, device=self.device) < lengths[:, None]).long()
        cache = DynamicCache(config=self.lm.config)
        with reproducible_attention(self.sdpa_backends):
            hidden = self.lm.model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True).last_hidden_state
        self.cache.load(cache, lengths)
        last = hidden[torch.arange(len(prompts), device=self.device), lengths - 1]  # [B, hidden]
        return self._head(last).float()

    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 on_tokens: Callable[[list[list[int]]], bool] | None = None) -> list[list[int]]:
        """New tokens per prompt (up to and including eos); see `decode` for `on_tokens`."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                return self._generate(prompts, params, on_tokens)
        finally:
            self.model.train(was_training)

    def _generate(self, prompts, params, on_tokens):
        params = self._begin(prompts, params)
        kind = params.kind(self.vocab)
        self._record(self._choose(self._prefill(prompts), kind))
        rows: list[list[int]] = [[] for _ in prompts]
        ended = [False] * len(prompts)
        done, step = 0, 1
        while True:
            if step - done >= self.sync_every or step == params.max_new_tokens:
                stop = self._deliver(self.out[:, done:step].tolist(), rows, ended, set(params.eos), on_tokens)
                done = step
                if stop or all(ended) or step == params.max_new_tokens:
                    return rows
            self._run_step(kind)
            step += 1

    @staticmethod
    def _deliver(block, rows, ended, eos, on_tokens) -> bool:
        new = []
        for row, tokens in enumerate(block):
            taken = [] if ended[row] else _until_eos(tokens, eos)
            ended[row] = ended[row] or (bool(taken) and taken[-1] in eos)
            rows[row] += taken
            new.append(taken)
        return bool(on_tokens(new)) if on_tokens is not None else False


def release_decoder(model) -> None:
    """Free the fast path's cache and graphs kept on `model` (the next fast call builds them again)."""
    causal_lm(model).__dict__.pop("_fast_decoder", None)
