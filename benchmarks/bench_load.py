"""Checkpoint load benchmark: `load_model` against a plain `torch.load` of every shard, on the same files.

    python benchmarks/bench_load.py                                   # Baichuan2-13B shape, bf16 (~28 GB), onto cuda
    python benchmarks/bench_load.py --device cuda,cpu                 # both devices
    python benchmarks/bench_load.py --preset tiny-baichuan2-13b --dir /tmp/bench_load --device cpu   # quick check

It writes a random-weight checkpoint of the preset's shape in the published layout (sharded
`pytorch_model-0000N-of-0000M.bin` + `pytorch_model.bin.index.json`, bf16), then measures each load in a
fresh Python process, so every peak belongs to that load alone:
- load_model: `baichuan_tune.models.checkpoint.load_model(dir, dtype, device)` (validation + transformers'
  from_pretrained: shards memory-mapped, each tensor placed on the device in the target dtype);
- torch_load (baseline): `torch.load(shard, weights_only=True)` of every shard into one state dict, then
  `load_state_dict(assign=True)` into a model built on the meta device and `.to(device)`;
- llama (baseline, RoPE presets only): transformers' `LlamaForCausalLM.from_pretrained` of the same weights
  converted to the LLaMA layout.
Reported for the load itself: wall time, peak resident memory (VmHWM: includes memory-mapped file pages,
which the kernel can drop), peak private memory (RssAnon, sampled every 5 ms), peak GPU memory allocated;
then the time of a first 3-token forward (on CPU, weights that stay memory-mapped are read from the page
cache there), and the checkpoint size on disk. The page cache is warm for every load (the files were just
written or read).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GB = 1e9
MARKER = "bench_load.json"


def fmt(nbytes: float) -> str:
    return f"{nbytes / GB:.2f}GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f}MB"


# ----------------------------------------------------------------------------- memory probes


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class AnonSampler(threading.Thread):
    """Largest RssAnon seen (private memory, without mapped file pages), sampled every few ms."""

    def __init__(self, every_s: float = 0.005):
        super().__init__(daemon=True)
        self.every_s, self.peak, self._done = every_s, 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, (_status_kb("RssAnon") or 0) * 1024)
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, (_status_kb("RssAnon") or 0) * 1024)


# ----------------------------------------------------------------------------- the checkpoint


def write_checkpoint(preset: str, folder: Path, shard_size: str) -> dict:
    """Random bf16 weights of `preset` in the published .bin layout, generated one shard at a time."""
    import torch

    from baichuan_tune.models.checkpoint import expected_weights, write_config, write_shards
    from baichuan_tune.models.presets import preset_config

    meta = {"preset": preset, "shard_size": shard_size, "dtype": "bfloat16"}
    if (folder / MARKER).is_file() and json.loads((folder / MARKER).read_text()) == meta:
        return meta  # the same checkpoint from an earlier run
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = preset_config(preset)
    specs = {name: (shape, torch.bfloat16) for name, shape in expected_weights(config).items()}

    def random_tensor(name):
        shape = specs[name][0]
        if len(shape) == 1:  # RMSNorm gains
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).uniform_(-0.02, 0.02)

    start = time.time()
    write_config(config, folder, torch.bfloat16)
    write_shards(specs, random_tensor, folder, shard_size=shard_size, safe_serialization=False)
    (folder / MARKER).write_text(json.dumps(meta))
    print(f"wrote {folder} in {time.time() - start:.0f}s", flush=True)
    return meta


def weight_files(folder: Path) -> list[Path]:
    from baichuan_tune.models.checkpoint import find_weight_files

    return find_weight_files(folder)[1]


# ----------------------------------------------------------------------------- one measured load (child process)


def _load_model(folder: Path, device: str, dtype: str):
    from baichuan_tune.models.checkpoint import load_model

    return load_model(folder, dtype=dtype, device=device)


def _torch_load(folder: Path, device: str, dtype: str):
    import torch

    from baichuan_tune.models.checkpoint import parse_dtype, read_config
    from baichuan_tune.models import BaichuanForCausalLM, alibi_slopes

    state = {}
    for shard in weight_files(folder):
        state.update(torch.load(shard, map_location="cpu", weights_only=True))
    with torch.device("meta"):
        model = BaichuanForCausalLM(read_config(folder))
    model.load_state_dict(state, assign=True)
    del state
    # Non-persistent buffers are not in the files; rebuild them off the meta device.
    if model.model.rotary_emb is not None:
        model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    else:
        model.model.alibi_slopes = alibi_slopes(model.config.num_attention_heads)
    return model.to(device=device, dtype=parse_dtype(dtype)).eval()


def _llama(folder: Path, device: str, dtype: str):
    import torch
    from transformers import LlamaForCausalLM

    from baichuan_tune.models.checkpoint import parse_dtype

    device_map = {"": torch.device(device if device != "cuda" else "cuda:0")}
    return LlamaForCausalLM.from_pretrained(folder, dtype=parse_dtype(dtype), device_map=device_map)


LOADERS = {"load_model": _load_model, "torch_load": _torch_load, "llama": _llama}


def measure(kind: str, folder: Path, device: str, dtype: str) -> dict:
    import torch

    import baichuan_tune  # noqa: F401  (imports are not part of the load time)

    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    rss_before = (_status_kb("VmRSS") or 0) * 1024
    sampler = AnonSampler()
    sampler.start()
    start = time.perf_counter()
    model = LOADERS[kind](folder, device, dtype)
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_anon, peak_rss = sampler.stop(), peak_rss_bytes()
    peak_gpu = torch.cuda.max_memory_allocated() if on_cuda else 0
    # One short forward: the model works, and on CPU it pays for pages still mapped but not yet read.
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]], device=model.device)).logits
    if on_cuda:
        torch.cuda.synchronize()
    return {
        "kind": kind, "device": device, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "seconds": seconds, "peak_rss": peak_rss, "peak_anon": peak_anon, "rss_before": rss_before,
        "peak_gpu": peak_gpu, "first_forward": time.perf_counter() - start, "finite": bool(logits.isfinite().all()),
    }


def run_child(kind: str, folder: Path, device: str, dtype: str) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--dir", str(folder), "--device", device, "--dtype", dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"{kind} on {device} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


# ----------------------------------------------------------------------------- report


def describe(r: dict) -> str:
    return (f"{r['kind']:<10} device={r['device']} dtype={r['dtype']} time={r['seconds']:.1f}s "
            f"peak_rss={fmt(r['peak_rss'])} peak_anon={fmt(r['peak_anon'])} (before load {fmt(r['rss_before'])}) "
            f"peak_gpu={fmt(r['peak_gpu'])} first_forward={r['first_forward']:.1f}s finite={r['finite']}")


def summary(preset: str, size: int, ours: dict, base: dict) -> str:
    return (f"RESULT preset={preset} device={ours['device']} dtype={ours['dtype']} size_on_disk={fmt(size)} | "
            f"load_model {ours['seconds']:.1f}s peak_anon {fmt(ours['peak_anon'])} peak_rss {fmt(ours['peak_rss'])} "
            f"peak_gpu {fmt(ours['peak_gpu'])} first_forward {ours['first_forward']:.1f}s | "
            f"torch_load {base['seconds']:.1f}s peak_anon {fmt(base['peak_anon'])} peak_rss {fmt(base['peak_rss'])} | "
            f"ratio time {ours['seconds'] / base['seconds']:.2f}x "
            f"peak_anon {ours['peak_anon'] / max(base['peak_anon'], 1):.2f}x")


def llama_copy(folder: Path) -> Path | None:
    """The same weights in the LLaMA layout (safetensors), for RoPE presets; None for ALiBi ones."""
    from baichuan_tune.models.checkpoint import read_config
    from baichuan_tune.models.convert import convert_checkpoint

    if read_config(folder).position_embedding != "rope":
        return None
    out = folder.parent / (folder.name + "-llama")
    if not (out / "config.json").is_file():
        convert_checkpoint(folder, out, "llama")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="baichuan2-13b", help="model shape (baichuan_tune.models.presets)")
    parser.add_argument("--dir", default=None, help="checkpoint folder (default: a folder in the temp dir)")
    parser.add_argument("--device", default=None, help="cuda, cpu or both as cuda,cpu (default: cuda if present)")
    parser.add_argument("--dtype", default="bf16", help="dtype to load in")
    parser.add_argument("--shard-size", default="10GB", help="shard size of the written checkpoint")
    parser.add_argument("--no-llama", action="store_true", help="skip the LLaMA-layout baseline (RoPE presets)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one load in this process
    args = parser.parse_args(argv)
    folder = Path(args.dir or Path(tempfile.gettempdir()) / f"baichuan_tune_bench_{args.preset}")
    if args.measure:
        print("RESULT " + json.dumps(measure(args.measure, folder, args.device, args.dtype)), flush=True)
        return 0
    import torch

    devices = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(",")
    write_checkpoint(args.preset, folder, args.shard_size)
    files = weight_files(folder)
    size = sum(f.stat().st_size for f in files)
    print(f"checkpoint preset={args.preset} {len(files)} file(s) {files[0].name}... bf16 size_on_disk={fmt(size)} "
          f"at {folder}", flush=True)
    llama_dir = None if args.no_llama else llama_copy(folder)
    try:
        for device in devices:
            base = run_child("torch_load", folder, device, args.dtype)
            print(describe(base), flush=True)
            ours = run_child("load_model", folder, device, args.dtype)
            print(describe(ours), flush=True)
            if llama_dir is not None:
                print(describe(run_child("llama", llama_dir, device, args.dtype)), flush=True)
            print(summary(args.preset, size, ours, base), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            if llama_dir is not None:
                shutil.rmtree(llama_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
