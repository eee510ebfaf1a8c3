"""bench_serve's requests replayed in one process over the server's `BatchDecoder`: alone, then batched.

    python benchmarks/bench_serve_replay.py                       # GPU: Baichuan2-7B shape, bf16, 32 rows
    python benchmarks/bench_serve_replay.py --variant eager --requests 16
    python benchmarks/bench_serve_replay.py --preset tiny-baichuan2-7b --dtype fp32 --slots 4 --requests 8 \\
        --prompt-tokens 4,40 --new-tokens 8,24                      # smoke test on a CPU

bench_serve found every greedy answer of 32 concurrent clients unlike the same request alone. This
first runs the batch's decoding forward from one fixed state --forward-repeats times under each choice
of SDPA kernels (SDPA's default, the decoders' `reproducible_attention`, cuDNN, memory-efficient, math)
and counts the repeats whose logits differ from the first: a kernel that is not deterministic shows
here with nothing else changing. Then it replays bench_serve's requests (the same generator: random
token-id prompts and max_tokens) without HTTP, over one `BatchDecoder` as `serve` builds it: first each
request alone in row 0, twice (is alone reproducible?), then as 32 clients send them (every free row
takes the next request before each step, as `BatchScheduler._admit` does). For every request it keeps,
at each of its tokens, the two largest logits of its row, so where an answer parts from its alone run
it prints:
- `first_value_step`: the first token (0 = the prefill's) whose top logit is not the same bits alone and
  batched; the step where the row's arithmetic first differs, whether or not the token flips;
- `first_token_step`: the first token that differs, the margin (top-1 minus top-2 logit) alone there,
  the window and row it decoded in, and the step the request joined at;
so a late near-tie and a computation that differs from the first step apart. `--variant`: `serve`
(torch.compile and CUDA graphs, as served), `nograph` (compiled, no graphs) or `eager` (neither);
`--fixed-window` and `--zero-stale` rule out the attention window and the slots a row's last request
left behind. The last line starts with RESULT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import deque
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402
from baichuan_tune.serve.batching import BatchDecoder  # noqa: E402
from baichuan_tune.serve.fast_decode import DECODE_SDPA, SamplingParams, reproducible_attention  # noqa: E402
from baichuan_tune.serve.generation import chat_generation_config  # noqa: E402
from bench_serve import make_requests  # noqa: E402  (its requests, so the same ones)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARIANTS = {"serve": {}, "nograph": {"cuda_graph": False}, "eager": {"cuda_graph": False, "compile": False}}


class TopTwoDecoder(BatchDecoder):
    """A BatchDecoder that keeps each row's two largest logits of the latest step or prefill; with
    `fixed_window` every step attends to all slots, with `zero_stale` a row's slots are zeroed when it
    takes a request (the two candidate causes of a row decoding differently)."""

    fixed_window = zero_stale = False

    def _allocate(self, batch, max_len, vocab):
        super()._allocate(batch, max_len, vocab)
        self.top2 = torch.zeros(batch, 2, device=self.device)

    def _logits(self):
        logits = super()._logits()
        self.top2.copy_(logits.topk(2, dim=-1).values)
        return logits

    def admit(self, row, prompt, params, adapter=0):
        if self.zero_stale:  # slots past the prompt: zeros, not the keys of the row's last request
            for keys, values in zip(self.cache.keys, self.cache.values):
                keys[row].zero_()
                values[row].zero_()
        return super().admit(row, prompt, params, adapter)

    def window(self):
        return self.max_len if self.fixed_window else super().window()

    def _prefill_row(self, row, prompt, adapter):
        logits = super()._prefill_row(row, prompt, adapter)
        self.top2[row].copy_(logits[0].topk(2).values)
        return logits


class Answer:
    """One request's tokens, with per token the row's top-2 logits, the window and the row."""

    def __init__(self, index: int, request: dict, joined: int):
        self.index, self.request, self.joined = index, request, joined
        self.tokens, self.top2, self.windows, self.row = [], [], [], None

    def take(self, token: int, top2: list[float], window: int, eos: set[int]) -> bool:
        self.tokens.append(token)
        self.top2.append(top2)
        self.windows.append(window)
        return token in eos or len(self.tokens) >= self.request["max_tokens"]


def server_params(model, max_tokens: int) -> SamplingParams:
    """What `serve` decodes a greedy completion with: the checkpoint's settings and the chat defaults (the
    repetition penalty), temperature 0."""
    return SamplingParams.from_config(chat_generation_config(model, temperature=0, max_new_tokens=max_tokens))


def start(decoder, row: int, answer: Answer, eos: set[int]) -> bool:
    answer.row = row
    first = decoder.admit(row, answer.request["prompt"], server_params(decoder.model, answer.request["max_tokens"]))
    return answer.take(first, decoder.top2[row].tolist(), 0, eos)


def replay(decoder, requests: list[dict], clients: int, eos: set[int]) -> list[Answer]:
    """Every request answered with at most `clients` in the batch, each free row taking the next request
    before each step (one client: each request alone in row 0)."""
    todo, running, done, steps = deque(enumerate(requests)), {}, [None] * len(requests), 0
    while todo or running:
        while todo and len(running) < clients:
            i, request = todo.popleft()
            answer, row = Answer(i, request, steps), decoder.free_rows()[0]
            if start(decoder, row, answer, eos):
                decoder.release(row)
                done[i] = answer
            else:
                running[row] = answer
        if not running:
            continue
        tokens = decoder.decode_step()
        steps += 1
        top2 = decoder.top2.tolist()
        for row, answer in list(running.items()):
            if answer.take(tokens[row], top2[row], decoder.cache.window, eos):
                decoder.release(row)
                done[answer.index] = running.pop(row)
    return done


def parting(alone: Answer, other: Answer) -> dict | None:
    """Where `other` first differs from `alone` (None: same tokens and the same top logits throughout)."""
    pairs = list(zip(alone.top2, other.top2))
    value = next((k for k, (a, b) in enumerate(pairs) if a[0] != b[0]), None)
    token = next((k for k, (a, b) in enumerate(zip(alone.tokens, other.tokens)) if a != b), None)
    if token is None and len(alone.tokens) != len(other.tokens):  # one is a prefix of the other
        token = min(len(alone.tokens), len(other.tokens))
    if value is None and token is None:
        return None
    found = {"request": alone.index, "prompt_tokens": len(alone.request["prompt"]), "first_value_step": value}
    if value is not None:
        found["top_logit_alone_other"] = pairs[value][0][0], pairs[value][1][0]
    if token is not None:
        found.update(first_token_step=token, row_other=other.row, joined_at_step=other.joined)
    if token is not None and token < len(pairs):
        a = alone.top2[token]
        found.update(margin_alone=round(a[0] - a[1], 5), window_alone=alone.windows[token],
                     window_other=other.windows[token])
    return found


def forward_repeats(model, slots: int, slot_tokens: int, repeats: int) -> dict:
    """The batch's decoding forward from one state (row 0 holding 300 tokens, the next rows 50 to 250), run
    `repeats` more times under each choice of SDPA kernels: how many gave other logits than the first
    (0: deterministic), and in which rows."""
    decoder = BatchDecoder(model, slots, slot_tokens, cuda_graph=False, compile=False)
    for row, length in enumerate((300, 50, 100, 150, 200, 250)[:slots]):
        length = min(length, slot_tokens - 8)
        prompt = [3 + (7 * i + row) % (decoder.vocab - 3) for i in range(length)]
        decoder.admit(row, prompt, SamplingParams(8, eos=()))
    decoder.cache.window = min(512, decoder.max_len)
    lengths = decoder.cache.lengths.clone()

    def forward():
        decoder.cache.lengths.copy_(lengths)  # each call writes the same new keys at the same slots
        hidden = decoder.lm.model(input_ids=decoder.tokens, cache=decoder.cache, use_cache=True).last_hidden_state
        return decoder._head(hidden[:, -1]).float()

    contexts = {"sdpa_default": contextlib.nullcontext, "decoding": reproducible_attention,
                "cudnn": lambda: reproducible_attention((SDPBackend.CUDNN_ATTENTION,)),
                "efficient": lambda: reproducible_attention((SDPBackend.EFFICIENT_ATTENTION,)),
                "math": lambda: reproducible_attention((SDPBackend.MATH,))}
    found = {}
    for name, context in contexts.items():
        with torch.inference_mode(), context():
            try:
                first, rows, differ = forward(), set(), 0
            except RuntimeError as exc:  # a kernel this device or dtype lacks
                found[name] = f"unavailable: {str(exc)[:80]}"
                continue
            for _ in range(repeats):
                other = forward()
                if not torch.equal(other, first):
                    differ += 1
                    rows |= set((other != first).any(-1).nonzero().flatten().tolist())
        found[name] = {"differ": differ, "of": repeats, "rows": sorted(rows)}
    print(json.dumps({"forward_repeats": found}), flush=True)
    return found


def compare(name: str, alone: list[Answer], other: list[Answer]) -> dict:
    parts = [p for p in (parting(a, b) for a, b in zip(alone, other)) if p is not None]
    tokens_differ = [p for p in parts if "first_token_step" in p]
    out = {"compared": name, "requests": len(alone), "same_tokens": len(alone) - len(tokens_differ),
           "same_top_logits": len(alone) - len(parts), "partings": parts[:12]}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="baichuan2-7b")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--variant", default="serve", choices=list(VARIANTS))
    ap.add_argument("--attention", default="decoding", choices=["decoding", "default"],
                    help="decoding: the decoders' reproducible_attention (no cuDNN); default: SDPA's own choice")
    ap.add_argument("--fixed-window", action="store_true", help="every step attends to all slots")
    ap.add_argument("--zero-stale", action="store_true", help="zero a row's slots when it takes a request")
    ap.add_argument("--forward-repeats", type=int, default=40, help="repeats of one forward per SDPA choice (0: skip)")
    ap.add_argument("--slots", type=int, default=32, help="rows of the batch (serve's --max-batch) and clients")
    ap.add_argument("--slot-tokens", type=int, default=1024, help="serve's --slot-tokens")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-tokens", default="16,384", help="min,max prompt length (bench_serve's default)")
    ap.add_argument("--new-tokens", default="64,192", help="min,max max_tokens (bench_serve's default)")
    ap.add_argument("--prompt-vocab", type=int, default=125000, help="prompt ids below this (bench_serve's, on a GPU)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    config = preset_config(args.preset)
    with torch.device(args.device):
        model = BaichuanForCausalLM(config).to(DTYPES[args.dtype]).eval()
    eos = set(server_params(model, 1).eos)
    vocab = min(args.prompt_vocab, config.vocab_size)
    requests = make_requests(args.requests, args.prompt_tokens, args.new_tokens, vocab)
    if args.attention == "default":  # the decoders as they were before they left cuDNN's attention out
        TopTwoDecoder.sdpa_backends = DECODE_SDPA + (SDPBackend.CUDNN_ATTENTION,)
    repeated = forward_repeats(model, args.slots, args.slot_tokens, args.forward_repeats) if args.forward_repeats else {}
    decoder = TopTwoDecoder(model, args.slots, args.slot_tokens, **VARIANTS[args.variant])
    decoder.fixed_window, decoder.zero_stale = args.fixed_window, args.zero_stale
    began, timings = time.perf_counter(), {}
    runs = {}
    for name, clients in (("alone", 1), ("alone_again", 1), ("batched", args.slots)):
        runs[name] = replay(decoder, requests, clients, eos)
        timings[f"{name}_done_s"] = round(time.perf_counter() - began, 1)
        print(json.dumps({"phase": name, "done_s": timings[f"{name}_done_s"]}), flush=True)  # a cut run still tells
    compared = {"alone_again": compare("alone vs alone again", runs["alone"], runs["alone_again"]),
                "batched": compare(f"alone vs {args.slots} clients", runs["alone"], runs["batched"])}
    summary = {name: {"same_tokens": c["same_tokens"], "same_top_logits": c["same_top_logits"], "of": c["requests"]}
               for name, c in compared.items()}
    result = {"variant": args.variant, "attention": args.attention, "fixed_window": args.fixed_window,
              "zero_stale": args.zero_stale, **timings,
              "forward_repeats": {k: v if isinstance(v, str) else v["differ"] for k, v in repeated.items()}, **summary}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
