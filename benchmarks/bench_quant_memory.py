"""GPU memory of the Baichuan2-7B and -13B shapes in bf16, 8-bit and 4-bit, beside the published figures.

    python benchmarks/bench_quant_memory.py                                   # GPU: 7B and 13B, bf16/8bit/4bit
    python benchmarks/bench_quant_memory.py --presets tiny-baichuan2-7b --device cpu    # smoke test on a CPU

Each row builds a random-weight model of the preset's shape directly on the device in bf16 and, for 8bit
and 4bit, quantises it in place with `model.quantize(8|4)` (bitsandbytes LLM.int8() / NF4 with double
quantisation: the authors' API; `--quantization_bit` on the commands loads the same bitsandbytes layers). It then
records the memory the model holds (torch.cuda.memory_allocated after freeing the cache), the peak of a
64-token forward pass on top, and prints them beside the published figures (Baichuan2 README: 7B
14.0/8.0/5.1 GB, 13B 25.9/14.2/8.6 GB in bf16/8-bit/4-bit; they match GiB of weights, so GiB are printed).
On a CPU the number is the bytes of the model's tensors (parameters, buffers and bitsandbytes scales).
Rows that need bitsandbytes are reported as skipped when it is not installed. The last line starts
with RESULT.
"""

from __future__ import annotations

import argparse
import gc
import json
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

GIB = 2**30
# Baichuan2 README, "quantised inference" table: GB of GPU memory in bf16 / 8-bit / 4-bit.
PUBLISHED = {"baichuan2-7b": {"bf16": 14.0, "8bit": 8.0, "4bit": 5.1},
             "baichuan2-13b": {"bf16": 25.9, "8bit": 14.2, "4bit": 8.6}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="baichuan2-7b,baichuan2-13b", help="model shapes (baichuan_tune.models.presets)")
    p.add_argument("--modes", default="bf16,8bit,4bit", help="comma list of bf16, 8bit, 4bit")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    return p.parse_args(argv)


def has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def build(preset: str, mode: str, device: str):
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = BaichuanForCausalLM(preset_config(preset)).eval()
    finally:
        torch.set_default_dtype(default)
    if mode != "bf16":
        model.quantize(int(mode[0]))
    return model


def tensor_bytes(model) -> int:
    """Bytes of every parameter and buffer, plus the scales bitsandbytes keeps beside quantised weights."""
    return stored_bytes([*model.parameters(), *model.buffers()])


def measure(preset: str, mode: str, device: str) -> dict:
    gc.collect()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = build(preset, mode, device)
    built = time.perf_counter() - start
    row = {"preset": preset, "mode": mode, "device": device, "build_s": round(built, 1)}
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        row["weights_gib"] = (torch.cuda.memory_allocated() - base) / GIB
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            model(torch.randint(3, 1000, (1, 64), device=device))
        row["forward_peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
        # Held after the forward: adds NormHead's cached normalised lm_head copy (Baichuan2).
        row["after_forward_gib"] = (torch.cuda.memory_allocated() - base) / GIB
        row["gpu"] = torch.cuda.get_device_name()
    else:
        row["weights_gib"] = tensor_bytes(model) / GIB
    published = PUBLISHED.get(preset, {}).get(mode)
    row["published_gb"] = published
    del model
    return row


def size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.2f} MiB"


def line(row: dict) -> str:
    if "skipped" in row:
        return f"{row['preset']:>14} {row['mode']:>5}: skipped ({row['skipped']})"
    text = f"{row['preset']:>14} {row['mode']:>5}: weights {size(row['weights_gib']):>11}"
    if "forward_peak_gib" in row:
        text += (f"  after a 64-token forward {size(row['after_forward_gib'])}"
                 f" (peak {size(row['forward_peak_gib'])})")
    if row["published_gb"]:
        text += f"   published {row['published_gb']:.1f}   ratio {row['weights_gib'] / row['published_gb']:.3f}"
    return text


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="MatMul8bitLt")  # once per call in 8-bit: floods the log
    bnb = has_bitsandbytes()
    rows = []
    for preset in args.presets.split(","):
        for mode in args.modes.split(","):
            if mode not in ("bf16", "8bit", "4bit"):
                raise SystemExit(f"unknown mode {mode!r}; use bf16, 8bit or 4bit")
            if mode != "bf16" and not bnb:
                rows.append({"preset": preset, "mode": mode, "skipped": "bitsandbytes is not installed"})
            else:
                rows.append(measure(preset, mode, args.device))
            print(line(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    done = [r for r in rows if "skipped" not in r]
    summary = ", ".join(f"{r['preset']} {r['mode']} {size(r['weights_gib'])}"
                        + (f" (published {r['published_gb']})" if r["published_gb"] else "") for r in done)
    where = done[0].get("gpu", args.device) if done else args.device
    print(f"RESULT bench_quant_memory on {where}: {summary or 'nothing measured'}", flush=True)
    return rows


if __name__ == "__main__":
    main()
