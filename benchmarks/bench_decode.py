"""Decoding speed at the Baichuan2-7B shape: our fast path beside transformers' Llama and the bandwidth bound.

    python benchmarks/bench_decode.py                                          # GPU: bf16 and 4bit, 7B shape
    python benchmarks/bench_decode.py --preset tiny-baichuan2-7b --device cpu --modes fp32 --new-tokens 16
                                                                               # smoke test on a CPU

Rows, all in one process on the same device, random weights built directly on it, greedy:
- `baichuan fast`: `baichuan_tune.serve.fast_decode.decode` (static cache, compiled step in a CUDA graph), at each
  --batch-sizes (tokens/s summed over the rows);
- `baichuan generate`: our model through transformers' `generate` (dynamic cache), the reference path;
- `llama static`: transformers' `LlamaForCausalLM` of the same shape with `cache_implementation="static"`
  (generate compiles its decoding step), the baseline; `llama`: the same with the dynamic cache.
Baselines run in --baseline-modes. Each generates exactly --new-tokens tokens from a --prompt-tokens
prompt (min_new_tokens keeps eos away). Decoding speed is (n - 1) / (t(n) - t(1)), so the prefill is not
counted; each time is the median of --repeats runs after a full-length warm-up (which also compiles).
Time to first token (TTFT) is the median time of a 1-token generation from a --ttft-tokens prompt.
`4bit`/`8bit` quantise the decoder Linear layers of both models with the same bitsandbytes layers
(`baichuan_tune.models.quantize`); lm_head and the embedding stay bf16.

The bound: a decoding step reads every weight once (embedding rows aside), so batch-1 tokens/s <= copy
bandwidth / weight bytes, with the bandwidth measured here by a device-to-device copy (bytes read +
written). `--profile` adds where the time of one fast decoding step goes (kernel time by kind, from
torch.profiler over steps run without the graph). `--tokenizer FILE` (a Baichuan2 tokenizer.model) adds
a row for the chat path (`generate_text`: text streaming and stop checks on top of `decode`). The last
line starts with RESULT.
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
from baichuan_tune.serve.fast_decode import Decoder, SamplingParams, decode, release_decoder  # noqa: E402
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402
from baichuan_tune.models.quantize import stored_bytes  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "4bit": torch.bfloat16,
          "8bit": torch.float16}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASELINES = ("generate", "llama-static", "llama")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="baichuan2-7b", help="a RoPE shape (the Llama baseline needs RoPE)")
    p.add_argument("--modes", default="bf16,4bit", help="comma list of bf16, fp16, fp32, 8bit, 4bit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-sizes", default="1,16", help="batch sizes of the fast path")
    p.add_argument("--quant-batch-sizes", default="1", help="batch sizes of the fast path in 4bit/8bit")
    p.add_argument("--ttft-tokens", type=int, default=2048, help="prompt length for time to first token (0: skip)")
    p.add_argument("--baselines", default=",".join(BASELINES[:2]), help=f"comma list of {', '.join(BASELINES)}")
    p.add_argument("--baseline-modes", default=None, help="modes the baselines run in (default: the first mode)")
    p.add_argument("--profile", action="store_true", help="where the time of one fast step goes (CUDA)")
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
    return 2 * src.numel() * 4 / timed(lambda: dst.copy_(src), device, 5)


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
    """Steps/s of decoding alone: (n - 1) / (t(n) - t(1)), prefill cancelled out."""
    generate(1)
    generate(new_tokens)  # warm-up at full length: compiling, graphs, allocator, GPU clocks
    one = timed(lambda: generate(1), device, repeats)
    full = timed(lambda: generate(new_tokens), device, repeats)
    return (new_tokens - 1) / max(full - one, 1e-9)


def greedy_config(n: int):
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=2)


def fast_generate(model, prompts):
    def run(n: int):
        rows = decode(model, prompts, greedy_config(n), fast=True)
        assert all(len(r) == n for r in rows), [len(r) for r in rows]
        return rows

    return run


def plain_generate(model, prompt, **extra):
    def run(n: int):
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=2, **extra)

    return run


def chat_path_generate(model, prompt, tokenizer):
    from baichuan_tune.serve.generation import chat_generation_config, generate_text

    ids = prompt[0].tolist()

    def run(n: int):
        config = chat_generation_config(model, temperature=0, max_new_tokens=n, min_new_tokens=n)
        generate_text(model, tokenizer, ids, config, on_text=lambda text: None)

    return run


def random_prompts(batch: int, length: int, vocab: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


def free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def row(name, mode, batch, steps_per_s, nbytes, bandwidth, **extra) -> dict:
    bound = bandwidth / nbytes
    out = {"model": name, "mode": mode, "batch": batch, "tokens_per_s": steps_per_s * batch,
           "steps_per_s": steps_per_s, "weight_gb_per_token": nbytes / 1e9, "bound_tokens_per_s": bound,
           "fraction_of_bound": steps_per_s / bound, **extra}
    reads = f"{nbytes / 1e9:6.2f} GB" if nbytes > 1e8 else f"{nbytes / 1e6:6.2f} MB"
    ttft = f"   TTFT {extra['ttft_s'] * 1e3:7.1f} ms" if extra.get("ttft_s") is not None else ""
    print(f"{name:>20} {mode:>5} batch {batch:>3}: {out['tokens_per_s']:9.2f} tokens/s ({steps_per_s:7.2f} steps/s)"
          f"   reads {reads}/step   bound {bound:7.1f} steps/s   {100 * steps_per_s / bound:5.1f}% of bound{ttft}",
          flush=True)
    return out


def ttft(run_one, device: str, repeats: int) -> float:
    run_one()
    return timed(run_one, device, repeats)


def bench_ours(args, mode, bandwidth, tokenizer, baselines) -> list[dict]:
    model = build("baichuan", args.preset, mode, args.device)
    vocab, nbytes = model.config.vocab_size, weight_bytes_per_token(model)
    rows = []
    sizes = args.quant_batch_sizes if mode in ("4bit", "8bit") else args.batch_sizes
    for batch in [int(b) for b in sizes.split(",")]:
        prompts = random_prompts(batch, args.prompt_tokens, vocab).tolist()
        rate = decode_rate(fast_generate(model, prompts), args.device, args.new_tokens, args.repeats)
        extra = {}
        if batch == 1 and args.ttft_tokens:
            long = random_prompts(1, args.ttft_tokens, vocab, seed=2).tolist()
            extra["ttft_s"] = ttft(lambda m=model: decode(m, long, greedy_config(1), fast=True), args.device,
                                   args.repeats)
        rows.append(row("baichuan fast", mode, batch, rate, nbytes, bandwidth, **extra))
    release_decoder(model)
    free(args.device)
    prompt = random_prompts(1, args.prompt_tokens, vocab).to(args.device)
    if "generate" in baselines:
        rate = decode_rate(plain_generate(model, prompt), args.device, args.new_tokens, args.repeats)
        rows.append(row("baichuan generate", mode, 1, rate, nbytes, bandwidth))
        rows[-1]["agreement"] = agreement(model, prompt, args.device)
    if tokenizer is not None:
        rate = decode_rate(chat_path_generate(model, prompt, tokenizer), args.device, args.new_tokens, args.repeats)
        rows.append(row("baichuan chat path", mode, 1, rate, nbytes, bandwidth))
    if args.profile and args.device.startswith("cuda"):
        profile_step(model, prompt[0].tolist(), 1 / rows[0]["steps_per_s"], mode)
    release_decoder(model)
    del model
    free(args.device)
    return rows


def agreement(model, prompt, device, n: int = 32) -> dict:
    """Leading greedy tokens on which the fast path and generate agree, and at the first split how far apart
    generate's own logits put the two choices (bf16 rounding differs between the compiled and the eager
    kernels, and random weights give near-ties, so a split at a near-tie is expected; a bug splits anywhere)."""
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=2, output_logits=True,
                         return_dict_in_generate=True)
    plain = out.sequences[0, prompt.shape[1]:].tolist()
    fast = decode(model, prompt.tolist(), greedy_config(n), fast=True)[0]
    same = next((i for i, (a, b) in enumerate(zip(plain, fast)) if a != b), n)
    result = {"agree": same, "of": n}
    note = ""
    if same < n:
        logits = out.logits[same][0].float()
        top2 = logits.topk(2).values
        result |= {"gap": float(logits[plain[same]] - logits[fast[same]]), "top2_gap": float(top2[0] - top2[1]),
                   "logit_std": float(logits.std())}
        note = (f"; there generate's logits put the two choices {result['gap']:.4f} apart (its top two "
                f"{result['top2_gap']:.4f}; logits' std {result['logit_std']:.3f})")
    print(f"{'':>20} fast and generate agree on the first {same} of {n} greedy tokens{note}", flush=True)
    return result


def bench_llama(args, mode, bandwidth, baselines) -> list[dict]:
    model = build("llama", args.preset, mode, args.device)
    vocab, nbytes = model.config.vocab_size, weight_bytes_per_token(model)
    prompt = random_prompts(1, args.prompt_tokens, vocab).to(args.device)
    long = random_prompts(1, args.ttft_tokens, vocab, seed=2).to(args.device) if args.ttft_tokens else None
    rows = []
    for name, extra in (("llama static", {"cache_implementation": "static"}), ("llama", {})):
        if name.replace(" ", "-") not in baselines:
            continue
        rate = decode_rate(plain_generate(model, prompt, **extra), args.device, args.new_tokens, args.repeats)
        first = None if long is None else ttft(lambda m=model: plain_generate(m, long, **extra)(1), args.device,
                                               args.repeats)
        rows.append(row(name, mode, 1, rate, nbytes, bandwidth, ttft_s=first))
    del model
    free(args.device)
    return rows


def profile_step(model, prompt: list[int], graph_step_s: float, mode: str) -> None:
    """Kernel time of one decoding step by kind, from steps of the compiled forward run without the graph."""
    from torch.profiler import ProfilerActivity, profile

    decoder = Decoder(model, 1, 256, cuda_graph=False)  # the batch-1 runs' shapes: no recompile
    params = SamplingParams(max_new_tokens=40, min_new_tokens=40, eos=(2,))
    decoder.generate([prompt], params)  # compiles
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.generate([prompt], params)
    kinds: dict[str, list[float]] = {}
    for event in prof.key_averages():
        name = event.key.lower()
        kind = ("matmul" if any(k in name for k in ("gemv", "gemm", "cutlass", "sm90", "kgemm", "4bit", "nvjet"))
                else "attention" if any(k in name for k in ("fmha", "attention", "flash", "sdpa"))
                else "other")
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        entry = kinds.setdefault(kind, [0.0, 0])
        entry[0] += device_us
        entry[1] += event.count
    steps = params.max_new_tokens  # prefill included once: a small share of 40 steps
    total = sum(v[0] for v in kinds.values()) / steps
    print(f"{'':>20} profile {mode}: graph step {graph_step_s * 1e3:.3f} ms; kernels {total / 1e3:.3f} ms/step "
          + ", ".join(f"{k} {v[0] / steps / 1e3:.3f} ms ({v[1] / steps:.0f} kernels)" for k, v in sorted(kinds.items())),
          flush=True)
    top = sorted(prof.key_averages(), key=lambda e: -(getattr(e, "device_time_total", 0) or 0))[:8]
    for event in top:
        print(f"{'':>24} {(getattr(event, 'device_time_total', 0) or 0) / steps:8.1f} us/step  x{event.count / steps:5.1f}"
              f"  {event.key[:90]}", flush=True)
    del decoder


def load_tokenizer(path):
    if not path:
        return None
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer(vocab_file=str(path))


def ratios(rows: list[dict]) -> dict:
    """The issue's targets as numbers: fast / Llama static, share of bound, 4-bit / bf16, batch 16 / batch 1."""
    def pick(model, mode, batch=1):
        return next((r for r in rows if r["model"] == model and r["mode"] == mode and r["batch"] == batch), None)

    out = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        fast, llama = pick("baichuan fast", mode), pick("llama static", mode)
        if fast and llama:
            out[f"{mode} fast / llama static"] = fast["tokens_per_s"] / llama["tokens_per_s"]
        if fast:
            out[f"{mode} fast share of bound"] = fast["fraction_of_bound"]
        for r in rows:
            if fast and r["model"] == "baichuan fast" and r["mode"] == mode and r["batch"] > 1:
                out[f"{mode} fast batch {r['batch']} / batch 1"] = r["tokens_per_s"] / fast["tokens_per_s"]
    quant, bf16 = pick("baichuan fast", "4bit"), pick("baichuan fast", "bf16")
    if quant and bf16:
        out["4bit / bf16 fast batch 1"] = quant["tokens_per_s"] / bf16["tokens_per_s"]
    return out


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per call in 8-bit: floods the log
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bandwidth = copy_bandwidth(args.device, 2**30 if args.device.startswith("cuda") else 2**26)
    print(f"{where}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); torch {torch.__version__}", flush=True)
    tokenizer = load_tokenizer(args.tokenizer)
    modes = args.modes.split(",")
    baseline_modes = (args.baseline_modes or modes[0]).split(",")
    baselines = [b for b in args.baselines.split(",") if b]
    rows = []
    for mode in modes:
        if mode not in DTYPES:
            raise SystemExit(f"unknown mode {mode!r}; use one of {', '.join(DTYPES)}")
        chosen = baselines if mode in baseline_modes else []
        rows += bench_ours(args, mode, bandwidth, tokenizer, chosen)
        if any(b.startswith("llama") for b in chosen):
            rows += bench_llama(args, mode, bandwidth, chosen)
    summary = ratios(rows)
    for key, value in summary.items():
        print(f"ratio {key}: {value:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": summary}, indent=2))
    text = ", ".join(f"{r['model']} {r['mode']} b{r['batch']} {r['tokens_per_s']:.1f} tok/s" for r in rows)
    print(f"RESULT bench_decode {args.preset} on {where}: {text}; "
          + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()), flush=True)
    return rows


if __name__ == "__main__":
    main()
