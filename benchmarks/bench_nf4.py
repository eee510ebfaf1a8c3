"""NF4 dequantisation: bitsandbytes' op against `quantize.nf4_dequantize` compiled, at the published shapes.

    python benchmarks/bench_nf4.py                         # on a GPU: Baichuan-13B's and Baichuan2-7B's linears
    python benchmarks/bench_nf4.py --device cpu --shapes 256x512 --repeats 3   # smoke test

Each weight is quantised to NF4 with double-quantised scales (as QLoRA), then dequantised to fp16/bf16 by
bitsandbytes' `dequantize_4bit` (the baseline, what its Linear4bit runs before each matrix product) and by
`nf4_dequantize` under torch.compile (what `--nf4_in_graph true` puts inside the compiled decoder layers).
It prints, per shape, the GPU time a call (CUDA events, median of --repeats after warm-up), the host
time a call, the effective bandwidth (bytes read + written) and the ratio, and whether the two agree bit
for bit (on a CPU they do; on a GPU a few values in 100,000 round one unit apart). Inside a compiled
layer inductor fuses the dequantisation differently; a profile of a training step (bench_recipes.py
--profile) gives the in-graph kernel times.
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

from baichuan_tune.models.quantize import _state_args, import_bitsandbytes, nf4_dequantize  # noqa: E402

# [out, in] of W_pack, o_proj, gate/up_proj and down_proj
SHAPES = {"baichuan-13b": ["15360x5120", "5120x5120", "13696x5120", "5120x13696"],
          "baichuan2-7b": ["12288x4096", "4096x4096", "11008x4096", "4096x11008"]}


def timed(fn, repeats: int, device: str) -> tuple[float, float]:
    """(GPU ms a call, host us a call): medians over `repeats` after two warm-up calls."""
    for _ in range(2):
        fn()
    gpu, host = [], []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        if device.startswith("cuda"):
            end.record()
            torch.cuda.synchronize()
            gpu.append(start.elapsed_time(end))
    return (statistics.median(gpu) if gpu else float("nan")), statistics.median(host)


def run_shape(shape: str, dtype, device: str, repeats: int) -> dict:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    out_f, in_f = map(int, shape.split("x"))
    weight = torch.randn(out_f, in_f, dtype=dtype, device=device) * 0.02
    packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    args = _state_args(state)
    ours = torch.compile(lambda p: nf4_dequantize(p, *args))
    same = torch.equal(ours(packed), dequantize_4bit(packed, state))
    base_gpu, base_host = timed(lambda: dequantize_4bit(packed, state), repeats, device)
    ours_gpu, ours_host = timed(lambda: ours(packed), repeats, device)
    moved = out_f * in_f * (0.5 + torch.finfo(dtype).bits / 8)  # packed codes in, the weight out (GB/s below)
    return dict(shape=shape, dtype=str(dtype).removeprefix("torch."), equal=same,
                bnb_gpu_ms=round(base_gpu, 4), ours_gpu_ms=round(ours_gpu, 4),
                bnb_host_us=round(base_host, 1), ours_host_us=round(ours_host, 1),
                bnb_gb_s=round(moved / base_gpu / 1e6, 1), ours_gb_s=round(moved / ours_gpu / 1e6, 1),
                gpu_time_ours_over_bnb=round(ours_gpu / base_gpu, 3))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="baichuan-13b,baichuan2-7b")
    ap.add_argument("--shapes", default="", help="out x in, comma-separated (instead of --models)")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    bnb = import_bitsandbytes()
    shapes = args.shapes.split(",") if args.shapes else [s for m in args.models.split(",") for s in SHAPES[m]]
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  bitsandbytes {bnb.__version__}")
    results = []
    for dtype in args.dtypes.split(","):
        for shape in shapes:
            results.append(run_shape(shape, getattr(torch, dtype), args.device, args.repeats))
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
