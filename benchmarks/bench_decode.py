"""Batch-1 decoding speed at the Baichuan2-7B shape, beside transformers' Llama and the memory-bandwidth bound.

    python benchmarks/bench_decode.py                                          # GPU: bf16 and 4bit, 7B shape
    python benchmarks/bench_decode.py --preset tiny-baichuan2-7b --device cpu --modes fp32 --new-tokens 16
                                                                               # smoke test on a CPU

For each mode, our BaichuanForCausalLM and transformers' LlamaForCausalLM of the same shape (random
weights, built directly on the device) generate greedily from a --prompt-tokens prompt with
`model.generate`, exactly --new-tokens tokens (min_new_tokens keeps eos from ending early). Decoding speed
is (new_tokens - 1) / (time(new_tokens) - time(1)), so the prompt's prefill is not counted; each time is
the median of --repeats runs after a full-length warm-up. `4bit`/`8bit` quantise the decoder Linear layers of both
models with the same bitsandbytes layers (`baichuan_tune.models.quantize`); lm_head and the embedding stay bf16.

The bound: a decoding step reads every weight once (embedding rows aside), so tokens/s <= copy
bandwidth / weight bytes, with the bandwidth measured here by a device-to-device copy (bytes read +
written). `--tokenizer FILE` (a Baichuan2 tokenizer.model) adds a row for our chat path (`generate_text`:
streaming text decoding and stop checks on top of generate). The last line starts with RESULT.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402
from baichuan_tune.models.quantize import stored_bytes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "4bit": torch.bfloat16,
          "8bit": torch.float16}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="baichuan2-7b", help="a RoPE shape (the Llama baseline needs RoPE)")
    p.add_argument("--modes", default="bf16,4bit", help="comma list of bf16, fp16, fp32, 8bit, 4bit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-llama", action="store_true", help="skip the transformers Llama baseline")
    p.add_argument("--tokenizer", default=None, help="Baichuan2 tokenizer.model: also time the chat path")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build(kind: str, preset: str, mode: str, device: str):
    config = preset_config(preset)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[mode])
    try:
        with torch.device(device):
            torch.manual_seed(0)
            if kind == "llama":
                from transformers import LlamaForCausalLM

                from baichuan_tune.models.convert import baichuan_to_llama_config

                model = LlamaForCausalLM(baichuan_to_llama_config(config))
            else:
                model = BaichuanForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if mode in ("4bit", "8bit"):
        from baichuan_tune.models.quantize import QUANTIZED_LINEARS, quantize_linears

        quantize_linears(model, int(mode[0]), LLAMA_LINEARS if kind == "llama" else QUANTIZED_LINEARS)
    return model.eval()


def weight_bytes_per_token(model) -> int:
    """Bytes a decoding step reads: every weight (with bitsandbytes scales) except the embedding table."""
    embed = model.get_input_embeddings().weight
    return stored_bytes(p for p in model.parameters() if p is not embed)


def copy_bandwidth(device: str, nbytes: int = 2**30) -> float:
    """Bytes/s of a device-to-device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times)


def timed(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(generate, device: str, new_tokens: int, repeats: int) -> float:
    """Tokens/s of decoding alone: (n - 1) / (t(n) - t(1)), prefill cancelled out."""
    generate(1)
    generate(new_tokens)  # warm-up at full length: kernels, allocator, GPU clocks
    one = timed(lambda: generate(1), device, repeats)
    full = timed(lambda: generate(new_tokens), device, repeats)
    return (new_tokens - 1) / max(full - one, 1e-9)


def plain_generate(model, prompt):
    def run(n: int):
        model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                       max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=2)

    return run


def chat_path_generate(model, prompt, tokenizer):
    from baichuan_tune.serve.generation import chat_generation_config, generate_text

    ids = prompt[0].tolist()

    def run(n: int):
        config = chat_generation_config(model, temperature=0, max_new_tokens=n, min_new_tokens=n)
        generate_text(model, tokenizer, ids, config, on_text=lambda text: None)

    return run


def bench_mode(args, mode: str, bandwidth: float, tokenizer) -> list[dict]:
    rows = []
    kinds = ["baichuan"] + ([] if args.no_llama else ["llama"])
    for kind in kinds:
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        model = build(kind, args.preset, mode, args.device)
        gen = torch.Generator().manual_seed(1)
        prompt = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=gen).to(args.device)
        nbytes = weight_bytes_per_token(model)
        runs = [(kind, plain_generate(model, prompt))]
        if kind == "baichuan" and tokenizer is not None:
            runs.append(("baichuan chat path", chat_path_generate(model, prompt, tokenizer)))
        for name, run in runs:
            rate = decode_rate(run, args.device, args.new_tokens, args.repeats)
            bound = bandwidth / nbytes
            rows.append({"model": name, "mode": mode, "tokens_per_s": rate, "weight_gb_per_token": nbytes / 1e9,
                         "bound_tokens_per_s": bound, "fraction_of_bound": rate / bound})
            reads = f"{nbytes / 1e9:6.2f} GB" if nbytes > 1e8 else f"{nbytes / 1e6:6.2f} MB"
            print(f"{name:>20} {mode:>5}: {rate:8.2f} tokens/s   reads {reads}/token   "
                  f"bound {bound:8.1f} tokens/s   {100 * rate / bound:5.1f}% of bound", flush=True)
        del model, runs
    return rows


def load_tokenizer(path):
    if not path:
        return None
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer(vocab_file=str(path))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per call in 8-bit: floods the log
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bandwidth = copy_bandwidth(args.device, 2**30 if args.device.startswith("cuda") else 2**26)
    print(f"{where}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); torch {torch.__version__}", flush=True)
    tokenizer = load_tokenizer(args.tokenizer)
    rows = []
    for mode in args.modes.split(","):
        if mode not in DTYPES:
            raise SystemExit(f"unknown mode {mode!r}; use one of {', '.join(DTYPES)}")
        rows += bench_mode(args, mode, bandwidth, tokenizer)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    summary = ", ".join(f"{r['model']} {r['mode']} {r['tokens_per_s']:.1f} tok/s ({100 * r['fraction_of_bound']:.0f}% "
                        f"of {r['bound_tokens_per_s']:.0f})" for r in rows)
    print(f"RESULT bench_decode {args.preset} batch 1 on {where}: {summary}", flush=True)
    return rows


if __name__ == "__main__":
    main()
