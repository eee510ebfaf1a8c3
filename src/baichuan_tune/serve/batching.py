"""Continuous batching for `serve`: requests join the running batch between decoding steps and leave as they end.

transformers' own continuous batching (`generate_batch`, `init_continuous_batching`) packs every request's
tokens into one row and runs them through its paged attention kernels ("paged|sdpa", flash varlen), which
a model reaches through transformers' attention-function registry; BaichuanModel runs its own attention
(the ALiBi bias of Baichuan-13B / Baichuan2-13B is an additive mask those kernels have no place for), so
the scheduler here works over the fast path's slot cache instead:

- `BatchDecoder`: `slots` rows of a `WindowSlotCache`, each row one request. `admit` prefills a newcomer
  into a free row (the model's ordinary forward, batch 1, its keys and values copied into the row) and
  picks its first token; `step` decodes one token for every row in one forward, each row with its own
  length, position, sampling settings, eos ids, repetition penalty and LoRA adapter; rows that are free
  compute along and are ignored. On CUDA each step is one CUDA graph replay (one graph per sampling kind
  and attention window), as in `fast_decode.Decoder`.
- `BatchScheduler`: the server's generation thread. Between steps it admits waiting requests into free
  rows, delivers each row's token (text deltas, stop strings, eos, max_tokens) and frees the rows of
  requests that ended or whose client went away. Requests the batched path does not implement (see
  `batch_refusal`) run one at a time through `generate_text` in the same thread, the batch pausing
  meanwhile.

The attention window: each step attends to the first W slots of every row, W the next power of two
(from 256) above the longest row, so a batch of short requests reads a short cache however long the
rows could grow. A kernel that split the keys by the window's length would round a row's logits
differently as the window changes for other rows, and in bf16 that can flip near-tied greedy tokens; at
the Baichuan2-7B shape in bf16 the memory-efficient kernel the decoders use was measured not to (cuDNN's,
which they leave out with `reproducible_attention`, was not even deterministic from call to call:
benchmarks/bench_serve_replay.py). With
`batch_invariant` attention runs over the window in blocks of 256 keys (`modeling_baichuan.block_attend`),
so a row's logits are the same bits whether the window is its own or a longer neighbour's: on a CPU and
for tiny models on a GPU. Compiled at the Baichuan2-7B shape in bf16 the step fuses the blocks
differently per window and the invariance does not hold (docs/PERFORMANCE.md), so it is experimental.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections import deque

import torch

from .fast_decode import (
    CACHE_MIN,
    Decoder,
    SamplingParams,
    SlotCache,
    causal_lm,
    fast_path_refusal,
    model_device,
    penalized,
    reproducible_attention,
    sample_from,
)
from .generation import GenerationResult, IncrementalDecoder, StopText

SPARE_SLOTS = 2  # beyond a row's longest sequence: a graph capture's two warm-up steps write there


class WindowSlotCache(SlotCache):
    """A SlotCache whose attention sees only its first `window` slots (a host int, set before each step);
    with `key_block` (0: off) in blocks of that many keys, so that a row decodes the same whatever window
    the other rows need."""

    key_block = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.window = self.max_len

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx)
        return keys[:, :, : self.window], values[:, :, : self.window]

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.window, 0

    def load_row(self, row: int, cache) -> None:
        """Take a batch-1 prefill's keys and values (a DynamicCache) into `row`."""
        for i, layer in enumerate(cache.layers):
            width = layer.keys.shape[2]
            self.keys[i][row, :, :width].copy_(layer.keys[0])
            self.values[i][row, :, :width].copy_(layer.values[0])
            self.lengths[i, row] = width


class BatchDecoder(Decoder):
    """`slots` rows decoding together, each holding one request of at most `slot_tokens` tokens.

    `lora`: a `MultiLoRA` over the model (several adapters, one per row), or None. `batch_invariant`:
    attention in blocks of CACHE_MIN keys (every window is a multiple of it), so each row's logits are the
    same bits whoever shares the batch (experimental: not so when compiled at the published shapes in bf16).
    """

    cache_class = WindowSlotCache

    def __init__(self, model, slots: int, slot_tokens: int, lora=None, batch_invariant: bool = False, **kwargs):
        self.slot_tokens = slot_tokens
        super().__init__(model, slots, slot_tokens + SPARE_SLOTS, **kwargs)
        self.cache.key_block = CACHE_MIN if batch_invariant else 0
        self.lora = lora
        self.held = [0] * slots  # tokens in each row's cache (host copy: the window needs no sync)
        self.params: list[SamplingParams | None] = [None] * slots
        if self.norm_head:  # serving never changes the weights: normalised once
            weight = self.lm.lm_head.weight
            self.head_weight.copy_(torch.nn.functional.normalize(weight.detach().float(), dim=-1).to(weight.dtype))

    def _allocate(self, batch, max_len, vocab):
        super()._allocate(batch, max_len, vocab)
        with torch.inference_mode():
            new = dict(device=self.device)
            self.is_eos = torch.zeros(batch, vocab, dtype=torch.bool, **new)  # each row's eos ids
            self.generated = torch.zeros(batch, 1, dtype=torch.long, **new)  # tokens each row has generated
            self.sample = torch.zeros(batch, dtype=torch.bool, **new)  # False: the row decodes greedily
            self.active = torch.zeros(batch, dtype=torch.long, **new)  # 1: the row holds a request
            self.next = torch.zeros(batch, dtype=torch.long, **new)  # the step's new token per row
            self.adapters = torch.zeros(batch, dtype=torch.long, **new)  # each row's LoRA adapter (0: the base)

    def _state(self) -> tuple:
        return (self.cache.lengths, self.generated, self.seen, self.tokens, self.next)

    # -- the step (captured in a CUDA graph per kind and window)

    def _rows(self, adapters):
        """Each row's LoRA adapter for the forwards inside (a graph captured there keeps this tensor)."""
        return contextlib.nullcontext() if self.lora is None else self.lora.rows(adapters)

    def _choose(self, logits, kind: tuple):
        banned = self.is_eos & (self.generated < self.min_new)  # [B, V]
        logits = penalized(logits, self.seen, self.penalty, banned)
        greedy = logits.argmax(-1)
        if kind[0] == "greedy":
            return greedy
        return torch.where(self.sample, sample_from(logits, kind, self.temperature, self.top_k, self.top_p), greedy)

    def _record(self, next_tokens):
        self.next.copy_(next_tokens)
        self.tokens.copy_(next_tokens[:, None])
        self.seen.scatter_(1, next_tokens[:, None], True)
        self.generated += 1

    def _step(self, kind: tuple):
        self.cache.lengths.mul_(self.active[None])  # a free row writes at slot 0 and is never read
        self._record(self._choose(self._forward(), kind))

    def _kind(self) -> tuple:
        """The captured step the active rows need: greedy, top-k over the largest k (a power of two), or a sort."""
        sampled = [p for p in self.params if p is not None and p.do_sample]
        if not sampled:
            return ("greedy",)
        if all(0 < p.top_k < self.vocab for p in sampled):
            k = 1
            while k < max(p.top_k for p in sampled):
                k *= 2
            return ("top_k", min(k, self.vocab))
        return ("sort",)

    def window(self) -> int:
        """The slots the next step attends to: the next power of two (from CACHE_MIN) above the longest row."""
        needed = max(h for h, p in zip(self.held, self.params) if p is not None) + 1
        window = CACHE_MIN
        while window < needed:
            window *= 2
        return min(window, self.max_len)

    def decode_step(self) -> list[int]:
        """One token for every row (the active rows' are the ones that count)."""
        self.cache.window = self.window()
        with torch.inference_mode(), self._rows(self.adapters):
            self._run_step(self._kind() + (self.cache.window,))
            tokens = self.next.tolist()
        for row, p in enumerate(self.params):
            if p is not None:
                self.held[row] += 1
        return tokens

    # -- rows

    def admit(self, row: int, prompt: list[int], params: SamplingParams, adapter: int = 0) -> int:
        """Prefill `prompt` into free row `row` and return its first token."""
        if params.top_k >= self.vocab:
            params = dataclasses.replace(params, top_k=0)
        with torch.inference_mode():
            self._settings(row, prompt, params, adapter)
            logits = self._prefill_row(row, prompt, adapter)
            one = slice(row, row + 1)
            banned = self.is_eos[one] & (self.generated[one] < self.min_new[one])
            logits = penalized(logits, self.seen[one], self.penalty[one], banned)
            first = sample_from(logits, params.kind(self.vocab), self.temperature[one], self.top_k[one], self.top_p[one])
            self._record_row(row, first)
            self.active[row] = 1
        self.params[row], self.held[row] = params, len(prompt)
        return int(first)

    def _settings(self, row: int, prompt: list[int], params: SamplingParams, adapter: int) -> None:
        self.seen[row].zero_()
        self.seen[row, torch.tensor(prompt, device=self.device)] = True
        self.is_eos[row].zero_()
        if params.eos:
            self.is_eos[row, list(params.eos)] = True
        self.generated[row] = 0
        self.min_new[row] = params.min_new_tokens
        self.penalty[row] = params.repetition_penalty
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.sample[row] = params.do_sample
        self.adapters[row] = adapter

    def _prefill_row(self, row: int, prompt: list[int], adapter: int):
        from transformers.cache_utils import DynamicCache

        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.lm.config)
        with self._rows(self.adapters[row : row + 1]), reproducible_attention(self.sdpa_backends):
            hidden = self.lm.model(input_ids=ids, cache=cache, use_cache=True).last_hidden_state
        self.cache.load_row(row, cache)
        return self._head(hidden[:, -1]).float()

    def _record_row(self, row: int, token) -> None:
        self.next[row] = token[0]
        self.tokens[row, 0] = token[0]
        self.seen[row, token[0]] = True
        self.generated[row] = 1

    def release(self, row: int) -> None:
        self.params[row] = None
        self.held[row] = 0
        with torch.inference_mode():
            self.active[row] = 0

    def free_rows(self) -> list[int]:
        return [row for row, p in enumerate(self.params) if p is None]


def cache_bytes(model, slots: int, slot_tokens: int) -> int:
    """Bytes of the batch's KV cache: keys and values of every layer, for every slot of every row."""
    lm = causal_lm(model)
    config, dtype = lm.config, lm.get_input_embeddings().weight.dtype
    per_token = 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * dtype.itemsize
    return slots * (slot_tokens + SPARE_SLOTS) * per_token


def check_cache_memory(model, slots: int, slot_tokens: int) -> None:
    """A ConfigError before allocating when the batch's cache cannot fit in the GPU's free memory."""
    device = model_device(model)
    if device.type != "cuda":
        return
    need, (free, _) = cache_bytes(model, slots, slot_tokens), torch.cuda.mem_get_info(device)
    if need > 0.9 * free:  # the rest: activations, the captured graphs, the one-at-a-time path's cache
        from ..config import ConfigError

        raise ConfigError(f"the batch's KV cache needs {need / 2**30:.1f} GiB ({slots} rows x {slot_tokens} tokens) "
                          f"and {device} has {free / 2**30:.1f} GiB free: lower --max-batch or --slot-tokens")


# ----------------------------------------------------------------------------- requests in the batch


def batch_refusal(job, model, slot_tokens: int) -> str | None:
    """Why `job` must take the one-at-a-time path (None: it can join the batch)."""
    settings = job.settings
    if not job.generate or job.score_prompt or settings.logprobs is not None:
        return "log-probabilities or echo scoring"
    if job.n != 1 or (job.best_of or 1) > 1:
        return "several choices per prompt"
    if settings.seed is not None:
        return "a seed (reproducible only one request at a time)"
    if settings.frequency_penalty or settings.presence_penalty:
        return "frequency or presence penalty"
    refusal = fast_path_refusal(model, settings.config)
    if refusal is not None:
        return refusal
    if max(len(p) for p in job.prompts) + settings.config.max_new_tokens > slot_tokens:
        return "longer than a batch slot"
    return None


class Sequence:
    """One prompt of a batched job, in a row: its tokens so far, text decoding and stop strings."""

    def __init__(self, job, index: int, prompt: list[int], tokenizer):
        self.job, self.index, self.prompt = job, index, prompt
        self.params = SamplingParams.from_config(job.settings.config)
        self.eos = set(self.params.eos)
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = StopText(list(job.settings.stop))
        self.tokens: list[int] = []
        self.row: int | None = None

    def _deliver(self, delta: str) -> None:
        out = self.stop.feed(delta)
        if out:
            self.job.send("text", (self.index, out))

    def accept(self, token: int) -> bool:
        """Take the row's next token; True when the sequence has ended (eos, a stop string, max_tokens)."""
        self.tokens.append(token)
        if token in self.eos:
            return True
        text = self.decoder.push([token])
        if text:
            self._deliver(text)
        return self.stop.stopped or len(self.tokens) >= self.params.max_new_tokens

    def result(self) -> GenerationResult:
        """The finished choice, as `generate_text` reports one."""
        tail = self.decoder.flush()
        if tail:
            self._deliver(tail)
        tail = self.stop.feed("", final=True)
        if tail:
            self.job.send("text", (self.index, tail))
        ids = self.tokens
        ended = self.stop.stopped or (ids and ids[-1] in self.eos) or len(ids) < self.params.max_new_tokens
        if ids and ids[-1] in self.eos:
            ids = ids[:-1]
        return GenerationResult(self.stop.text, ids, len(self.prompt), "stop" if ended else "length")


# ----------------------------------------------------------------------------- the scheduler


class BatchScheduler:
    """The generation thread of a batching server: `submit(job)`, `start()`, `stop()` as GenerationWorker.

    Waiting jobs sit in a queue of at most `max_queue` (a full queue is answered 429 by `submit`); the
    scheduler takes the next one as soon as the batch has a free row for it (a job of several prompts
    takes one row per prompt, as rows free up). `lora`: a MultiLoRA when several adapters are served.
    """

    def __init__(self, model, tokenizer, max_queue: int, slots: int, slot_tokens: int, lora=None,
                 batch_invariant: bool = False):
        from .server import GenerationWorker

        self.serial = GenerationWorker(model, tokenizer, max_queue)  # its queue and its one-at-a-time path
        self.jobs, self.max_queue = self.serial.jobs, max_queue
        self.model, self.tokenizer, self.lora = model, tokenizer, lora
        self.slot_tokens = slot_tokens
        self.decoder = BatchDecoder(model, slots, slot_tokens, lora=lora, batch_invariant=batch_invariant)
        self.backlog: deque[Sequence] = deque()  # prompts of the job taken last, waiting for a row
        self.running: dict[int, Sequence] = {}  # row -> its sequence
        self.left: dict[int, int] = {}  # id(job) -> its sequences not finished yet
        self.serial._thread = threading.Thread(target=self._run, name="batch-scheduler", daemon=True)

    def start(self) -> None:
        self.serial.start()

    def stop(self, timeout: float = 10.0) -> None:
        self.serial.stop(timeout)

    def submit(self, job) -> None:
        self.serial.submit(job)

    @property
    def busy(self) -> int:
        """Requests in the batch now."""
        return len({id(s.job) for s in list(self.running.values())})  # list(): read from the HTTP thread

    # -- the loop

    def _run(self) -> None:
        self.model.eval()
        stopping = self.serial._stopping
        while not stopping.is_set():
            try:
                self._drop_cancelled()
                self._admit(block=not self.running)
                if self.running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - those requests fail; the server keeps serving
                self._fail_all(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
        self._fail_all(503, "server shutting down", "server_error", code="shutting_down")

    def _take(self, block: bool):
        try:
            return self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
        except queue.Empty:
            return None

    def _admit(self, block: bool) -> None:
        """Fill free rows from the backlog, then from the queue; a job the batch cannot take runs now, alone."""
        while True:
            free = self.decoder.free_rows()
            if not free:  # a job stays in the queue until a row is free: the queue bound counts every waiting job
                return
            if not self.backlog:
                job = self._take(block and not self.running)
                if job is None:
                    return
                if job.cancelled.is_set():
                    continue
                if batch_refusal(job, self.model, self.slot_tokens) is not None:
                    self._serial(job)
                    continue
                self.left[id(job)] = len(job.prompts)
                self.backlog.extend(Sequence(job, i, p, self.tokenizer) for i, p in enumerate(job.prompts))
            self._start(self.backlog.popleft(), free[0])

    def _start(self, seq: Sequence, row: int) -> None:
        if seq.job.cancelled.is_set():
            self.left.pop(id(seq.job), None)
            return
        seq.row = row
        self.running[row] = seq
        first = self.decoder.admit(row, seq.prompt, seq.params, seq.job.adapter)
        if seq.accept(first):
            self._finish(seq)

    def _serial(self, job) -> None:
        if self.lora is None:
            return self.serial._generate(job)
        with self.lora.serving(job.adapter):
            self.serial._generate(job)

    def _step(self) -> None:
        tokens = self.decoder.decode_step()
        for row, seq in list(self.running.items()):
            if seq.accept(tokens[row]):
                self._finish(seq)

    # -- leaving the batch

    def _finish(self, seq: Sequence) -> None:
        from .server import Choice

        self._release(seq)
        seq.job.send("choice", Choice(seq.index, seq.index, seq.result()))
        self.left[id(seq.job)] -= 1
        if self.left[id(seq.job)] == 0:
            del self.left[id(seq.job)]
            seq.job.send("done", None)

    def _release(self, seq: Sequence) -> None:
        self.decoder.release(seq.row)
        del self.running[seq.row]

    def _drop_cancelled(self) -> None:
        """Free the rows (and forget the backlog) of requests whose client has gone."""
        for seq in [s for s in self.running.values() if s.job.cancelled.is_set()]:
            self._release(seq)
            self.left.pop(id(seq.job), None)
        if any(s.job.cancelled.is_set() for s in self.backlog):
            self.backlog = deque(s for s in self.backlog if not s.job.cancelled.is_set())

    def _fail_all(self, status: int, message: str, kind: str, code: str | None = None) -> None:
        from .openai_api import APIError

        jobs = {id(s.job): s.job for s in [*self.running.values(), *self.backlog]}
        for seq in list(self.running.values()):
            self._release(seq)
        self.backlog.clear()
        self.left.clear()
        for job in jobs.values():
            job.send("error", APIError(status, message, kind, code=code))
