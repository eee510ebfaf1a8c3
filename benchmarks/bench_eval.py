"""How long a full C-Eval val pass (52 subjects, 1346 questions, 5-shot) takes at the Baichuan2-7B shape.

    python benchmarks/bench_eval.py --data ../shared/data/eval/ceval/ceval.zip          # GPU: bf16 and 4-bit
    python benchmarks/bench_eval.py --preset tiny-baichuan2-7b --device cpu --modes fp32 --max-subjects 2
                                                                                        # smoke test on a CPU

The model has random weights (a random model scores about 25%; only the time matters) and is built directly
on the device. `4bit` quantises its decoder layers to NF4 with bitsandbytes (`baichuan_tune.models.quantize`, the
authors' `model.quantize(4)`), `8bit` to LLM.int8(). The tokenizer is the published Baichuan2 one. The timed
pass is exactly `baichuan-tune eval`'s: prompt building and tokenization, batched forward passes and letter
scoring, one subject after another; `--prefix shared` reuses each subject's few-shot prefix through its KV
cache (the default of `baichuan-tune eval`), `--prefix full` runs every prompt whole. Each case runs
`--repeat` times: the first pass is cold (CUDA loads kernels on first use), the best later one is reported.
Prints seconds, questions/s, prompt tokens/s, peak GPU memory and the device name; `--json FILE` writes them.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.eval.prompts import encode_prompt
from baichuan_tune.eval.reading import load_benchmark
from baichuan_tune.eval.scoring import evaluate
from baichuan_tune.eval.summary import summarize
from baichuan_tune.eval.tasks import TASKS
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402
from baichuan_tune.serve.generation import context_length

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "eval" / "ceval" / "ceval.zip"
# Baichuan2-7B and -13B share one tokenizer; the 13B-Chat folder holds the published file.
DEFAULT_TOKENIZER = ROOT.parent / "shared" / "reference" / "baichuan2-13b-chat" / "tokenizer.model"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "4bit": torch.bfloat16,
          "8bit": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="C-Eval archive or folder as published")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="a Baichuan2 tokenizer.model")
    p.add_argument("--preset", default="baichuan2-7b", help="model shape (baichuan_tune.models.presets)")
    p.add_argument("--modes", default="bf16,4bit", help="comma list of bf16, fp16, fp32, 4bit, 8bit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--split", default="val")
    p.add_argument("--n-shot", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batch-tokens", type=int, default=65536)
    p.add_argument("--prefix", default="shared", help="comma list: shared (the few-shot prefix runs once per "
                   "subject, KV cache reused) and/or full (every prompt runs whole)")
    p.add_argument("--repeat", type=int, default=2, help="timed passes per case: the first is cold, the best "
                   "of the others is reported as the steady state")
    p.add_argument("--max-subjects", type=int, default=None, help="only the first N subjects (smoke tests)")
    p.add_argument("--max-questions", type=int, default=None, help="at most N questions per subject")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    return p.parse_args(argv)


def build_model(preset: str, mode: str, device: str, vocab_size: int):
    """A random-weight model made on `device` in the mode's dtype (no fp32 copy on the host first).

    The vocabulary is the tokenizer's (the Baichuan2 presets have it already; tiny presets get it here)."""
    config = preset_config(preset, vocab_size=vocab_size)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[mode])
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = BaichuanForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if mode in ("4bit", "8bit"):
        from baichuan_tune.models.quantize import quantize

        quantize(model, int(mode[0]))
    return model.eval()


def prompt_tokens(data, task, tokenizer, n_shot: int, max_length: int) -> int:
    return sum(len(encode_prompt(task, tokenizer, d.name, d.shots[:n_shot], q, max_length)[0])
               for d in data for q in d.questions)


def one_pass(args, model, data, task, tokenizer, share_prefix: bool):
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = evaluate(model, tokenizer, task, data, split=args.split, n_shot=args.n_shot,
                          batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                          share_prefix=share_prefix, progress=False)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, results


def time_pass(args, model, data, task, tokenizer, share_prefix: bool) -> dict:
    """`--repeat` timed passes; the first is "cold" (CUDA loads kernels lazily on their first launch, and
    every new prompt shape may need new ones), the best of the others is the steady state."""
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeat):
        seconds, results = one_pass(args, model, data, task, tokenizer, share_prefix)
        times.append(seconds)
    seconds = min(times[1:] or times)
    summary = summarize(task, results)
    questions = summary["overall"]["questions"]
    tokens = prompt_tokens(data, task, tokenizer, args.n_shot, context_length(model))
    return {
        "prefix": "shared" if share_prefix else "full", "seconds": round(seconds, 2),
        "cold_seconds": round(times[0], 2), "questions": questions,
        "questions_per_s": round(questions / seconds, 2), "prompt_tokens": tokens,
        "prompt_tokens_per_s": round(tokens / seconds), "accuracy": summary["overall"]["accuracy"],
        "shots_dropped": summary["shots_dropped"],
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
        "predictions": [p["prediction"] for r in results for p in r.predictions],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    tokenizer = BaichuanTokenizer(vocab_file=args.tokenizer)
    task = TASKS["ceval"]
    data = load_benchmark(task, args.data, args.split, max_questions=args.max_questions)[: args.max_subjects]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"C-Eval {args.split}: {len(data)} subjects, {sum(len(d.questions) for d in data)} questions, "
          f"{args.n_shot}-shot; {args.preset} random weights on {device_name}; torch {torch.__version__}")
    rows = []
    for mode in args.modes.split(","):
        start = time.perf_counter()
        model = build_model(args.preset, mode, args.device, len(tokenizer))
        print(f"{mode}: model built in {time.perf_counter() - start:.1f}s", flush=True)
        for prefix in args.prefix.split(","):
            row = {"mode": mode, "preset": args.preset, "device": device_name}
            row |= time_pass(args, model, data, task, tokenizer, share_prefix=prefix == "shared")
            rows.append(row)
            print(f"{mode:>5} {row['prefix']:>6} prefix: {row['seconds']:8.2f} s (cold {row['cold_seconds']} s)  "
                  f"{row['questions_per_s']:8.2f} questions/s  {row['prompt_tokens_per_s']:>8} prompt tokens/s  "
                  f"peak {row['peak_gib']} GiB  accuracy {row['accuracy']:.2f} (random weights)", flush=True)
        same = len({tuple(r["predictions"]) for r in rows if r["mode"] == mode})
        if same > 1:
            print(f"{mode}: the shared-prefix and full passes predicted differently (low-precision rounding)")
        del model
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        Path(args.json).write_text(json.dumps([{k: v for k, v in r.items() if k != "predictions"} for r in rows],
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
