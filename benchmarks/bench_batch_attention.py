"""The batching server's decoding step with its attention in key blocks (`block_attend`) against SDPA.

    python benchmarks/bench_batch_attention.py                  # GPU: Baichuan2-7B shape, bf16, 32 rows
    python benchmarks/bench_batch_attention.py --preset tiny-baichuan2-7b --dtype fp32 --slots 4 --steps 4
                                                                # smoke test on a CPU

`serve` decodes every running request in one `BatchDecoder` step over a cache window sized by the longest
row. With SDPA (the default, the baseline here) a row's logits change with that window, so in bf16 a
request's greedy answer can depend on who shares its batch; block attention (`serve --batch_invariant
true`) makes them independent of it. For each attention (--kernels) this prints:
- `identical`: whether row 0's logits at each of --steps steps are the same bits alone (window 256) as
  beside neighbours whose prompts make the window 512 and 1024, and the largest difference;
- `row_position`: the same for the request alone in row 1, the middle and the last row, in row 0 after a
  longer request left it, in row 0 while others join between its steps (their prefills run then), and
  for a 300-token prompt alone and beside a 700-token one;
  `serve` puts a request in the first free row, so alone it always decodes in row 0;
- the step time with every row active, at windows 256, 512 and 1024 (median of --repeats steps, CUDA
  graphs and torch.compile as in `serve`), and ours / baseline;
- the seconds each phase took from the start (the first step at each window compiles and captures it).
Random weights built on the device.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402
from baichuan_tune.serve.batching import BatchDecoder  # noqa: E402
from baichuan_tune.serve.fast_decode import SamplingParams  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class RecordingDecoder(BatchDecoder):
    """A BatchDecoder that keeps each step's logits in a buffer (inside the captured graph too)."""

    def _allocate(self, batch, max_len, vocab):
        super()._allocate(batch, max_len, vocab)
        self.kept = torch.zeros(batch, vocab, device=self.device)

    def _logits(self):
        logits = super()._logits()
        self.kept.copy_(logits)
        return logits


def fill(decoder, prompts: dict[int, list[int]], new_tokens: int) -> None:
    """Each row in `prompts` takes its prompt, every row that was held before is released (one decoder serves
    every case, as in `serve`: its graphs, one per window, are compiled and captured once)."""
    for row in range(len(decoder.params)):
        if decoder.params[row] is not None:
            decoder.release(row)
    for row, prompt in prompts.items():
        decoder.admit(row, prompt, SamplingParams(new_tokens, eos=()))


def prompt(vocab: int, length: int, stride: int = 7, offset: int = 0) -> list[int]:
    """A deterministic prompt of `length` ordinary tokens (ids from 3: clear of the special ones)."""
    return [(stride * i + offset) % (vocab - 3) + 3 for i in range(length)]


def compared(expected: torch.Tensor, got: torch.Tensor) -> dict:
    return {"identical": torch.equal(expected, got), "max_difference": float((expected - got).abs().max())}


def row_logits(decoder, neighbours: list[int], steps: int, row: int = 0, length: int = 20) -> torch.Tensor:
    """The logits ([steps, V]) of a `length`-token prompt in row `row`, with the rows after it holding prompts
    of `neighbours` lengths (the rows before it free)."""
    prompts = {row: prompt(decoder.vocab, length)}
    for other, n in enumerate(neighbours, start=row + 1):
        prompts[other] = prompt(decoder.vocab, n, stride=11, offset=other)
    fill(decoder, prompts, steps + 1)
    kept = []
    for _ in range(steps):
        decoder.decode_step()
        kept.append(decoder.kept[row].clone())
    return torch.stack(kept)


def row_position(decoder, alone: torch.Tensor, steps: int) -> dict:
    """Whether the same request decodes the same bits in another row (alone there, and after a longer
    request left that row, so its slots past the prompt hold the other request's keys)."""
    last = len(decoder.params) - 1
    cases = {f"row_{row}_alone": row_logits(decoder, [], steps, row=row) for row in sorted({1, last // 2, last})}
    fill(decoder, {0: [3 + i % 50 for i in range(600)]}, 4)
    for _ in range(2):
        decoder.decode_step()
    cases["row0_after_longer"] = row_logits(decoder, [], steps)
    cases["row0_others_join"] = joined_logits(decoder, steps)
    found = {name: compared(alone, got) for name, got in cases.items()}
    long_alone = row_logits(decoder, [], steps, length=300)  # window 512 alone, 1024 beside a 700-token row
    found["300_token_prompt_beside"] = compared(long_alone, row_logits(decoder, [700], steps, length=300))
    return found


def joined_logits(decoder, steps: int) -> torch.Tensor:
    """Row 0's logits while requests join between its steps (each prefilled then, as in `serve`): a
    300-token prompt after a quarter of the steps, a 600-token one after half."""
    fill(decoder, {0: prompt(decoder.vocab, 20)}, steps + 1)
    kept = []
    for step in range(steps):
        for row, n in ((1, 300), (2, 600)):
            if step == row * steps // 4:
                decoder.admit(row, prompt(decoder.vocab, n, stride=11, offset=row), SamplingParams(steps, eos=()))
        decoder.decode_step()
        kept.append(decoder.kept[0].clone())
    return torch.stack(kept)


def step_time(decoder, length: int, repeats: int) -> float:
    """Median seconds of one step with every row active and holding about `length` tokens."""
    rows = len(decoder.params)
    fill(decoder, {row: [3 + (row + i) % 100 for i in range(length)] for row in range(rows)}, repeats + 8)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        decoder.decode_step()  # reads the tokens back: the step is finished when it returns
        if i >= 3:  # the first ones compile and capture
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="baichuan2-7b")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--kernels", default="sdpa,blocks", help="which attention to run: sdpa, blocks or both")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = BaichuanForCausalLM(preset_config(args.preset)).to(DTYPES[args.dtype]).eval()
    slot_tokens = 1000  # windows 256, 512 and 1024 (1,002 slots)
    results, start = {}, time.perf_counter()
    clock = lambda: round(time.perf_counter() - start, 1)  # noqa: E731
    for name in args.kernels.split(","):
        torch._dynamo.reset()  # the attention is chosen when the step is traced
        decoder = RecordingDecoder(model, args.slots, slot_tokens, batch_invariant=name == "blocks")
        alone = row_logits(decoder, [], args.steps)
        result = {"alone_done_s": clock()}
        shared = []
        for window, lengths in ((512, [300]), (1024, [40, 600])):
            shared.append(row_logits(decoder, lengths, args.steps))
            result[f"window_{window}_done_s"] = clock()
        result.update(identical=all(torch.equal(alone, s) for s in shared),
                      max_difference=max(float((alone - s).abs().max()) for s in shared),
                      row_position=row_position(decoder, alone, args.steps))
        for length in (200, 400, 800):
            result[f"step_s_{length}"] = step_time(decoder, length, args.repeats)
        results[name] = result
        print(name, json.dumps(result), flush=True)
        del decoder
    if len(results) == 2:
        for length in (200, 400, 800):
            ratio = results["blocks"][f"step_s_{length}"] / results["sdpa"][f"step_s_{length}"]
            print(f"RATIO step time blocks / sdpa, rows of {length} tokens: {ratio:.3f}", flush=True)
    return results


if __name__ == "__main__":
    main()
