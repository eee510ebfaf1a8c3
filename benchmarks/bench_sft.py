"""SFT step throughput and memory: our Baichuan model vs transformers' LlamaForCausalLM, with PEFT LoRA.

    python benchmarks/bench_sft.py                       # on a GPU: 7B and 13B shapes, lora and qlora
    python benchmarks/bench_sft.py --presets tiny-baichuan2-7b --device cpu --steps 2   # smoke test

Each case builds a random-weight model of the preset's shape in bf16, attaches LoRA r=8 to every linear
layer (W_pack/o_proj/gate/up/down; q/k/v/o/gate/up/down for Llama), turns on gradient checkpointing,
and times full optimizer steps (forward, backward, AdamW) on random token batches of
batch x seq (default 4 x 1024). Our model is prepared by `baichuan_tune.train.adapters.prepare_for_training`,
the function `baichuan-tune sft` uses; the baseline by PEFT's calls directly. `qlora` quantises the
decoder linears of both to NF4 with double quantisation (bitsandbytes, through `baichuan_tune.models.quantize`). The Llama baseline runs at the first preset's shape (RoPE shapes only) in the same
process, and the ratio ours/baseline is printed for tokens/s and peak memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.models import BaichuanForCausalLM  # noqa: E402
from baichuan_tune.models.presets import preset_config  # noqa: E402


LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(kind: str, preset: str, device: str, method: str, fast: dict | None = None):
    """The model ready to train. Ours goes through `adapters.prepare_for_training`, the code `sft` runs;
    the Llama baseline through PEFT's own calls. QLoRA quantises both with the same bitsandbytes NF4 layers
    (`baichuan_tune.models.quantize`, the layers `--finetuning_type qlora` loads into) from the bf16 weights."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from baichuan_tune.train.adapters import prepare_for_training
    from baichuan_tune.models.quantize import QUANTIZED_LINEARS, quantize_linears

    cfg = preset_config(preset)
    with torch.device(device):
        if kind == "llama":
            from transformers import LlamaForCausalLM

            from baichuan_tune.models.convert import baichuan_to_llama_config

            model = LlamaForCausalLM(baichuan_to_llama_config(cfg)).to(torch.bfloat16)
        else:
            model = BaichuanForCausalLM(cfg).to(torch.bfloat16)
    if method == "qlora":
        quantize_linears(model, 4, LLAMA_LINEARS if kind == "llama" else QUANTIZED_LINEARS)
        model.is_loaded_in_4bit = True  # as transformers marks a model loaded with BitsAndBytesConfig
    if kind != "llama":
        model = prepare_for_training(model, method, lora_target=["all"], lora_rank=8, lora_alpha=16,
                                     lora_dropout=0.05, gradient_checkpointing=True, **(fast or {}))
        return model, cfg.vocab_size
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=LLAMA_LINEARS))
    model.enable_input_require_grads()
    return model, cfg.vocab_size


def peak_breakdown(snapshot: dict, rows: int = 12) -> str:
    """What was live at the peak of a `torch.cuda.memory._snapshot()` taken while recording one step:
    the trace is replayed, and the blocks live at its maximum are grouped by the innermost Python frame
    outside torch (the code that asked for them)."""
    events = [e for trace in snapshot["device_traces"] for e in trace]
    live, current, peak, peak_at = {}, 0, 0, -1
    for i, e in enumerate(events):
        if e["action"] == "alloc":
            live[e["addr"]] = e["size"]
            current += e["size"]
            if current > peak:
                peak, peak_at = current, i
        elif e["action"] in ("free_requested", "free_completed") and e["addr"] in live:
            current -= live.pop(e["addr"])
    live = {}
    for e in events[: peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
        elif e["action"] in ("free_requested", "free_completed"):
            live.pop(e["addr"], None)
    groups: dict[str, list[int]] = {}
    for e in live.values():
        frames = [f for f in e.get("frames", []) if "/torch/" not in f["filename"] and f["line"] > 0]
        where = f"{Path(frames[0]['filename']).name}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"
        groups.setdefault(where, []).append(e["size"])
    lines = [f"allocated during the step and live at its peak: {peak / 2**30:.3f} GiB"]
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        lines.append(f"  {sum(sizes) / 2**30:7.3f} GiB  {len(sizes):4d} blocks  {where}")
    return "\n".join(lines)


def _train_step(model, ids, autocast, opt):
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def _phase_peaks(model, ids, autocast, opt) -> dict:
    """GiB allocated before a step, the forward's peak, what the forward leaves for backward, the step's peak."""
    gib = lambda n: round(n / 2**30, 3)  # noqa: E731
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with autocast:
        loss = model(input_ids=ids, labels=ids).loss
    forward_peak, kept = torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated()
    loss.backward()
    backward_peak = torch.cuda.max_memory_allocated()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return dict(before=gib(before), forward_peak=gib(forward_peak), kept_for_backward=gib(kept - before),
                step_peak=gib(max(backward_peak, torch.cuda.max_memory_allocated())))


def _profile(model, ids, autocast, opt, steps: int = 2) -> str:
    """Where two more steps' time goes: wall time, GPU kernel time, launches, the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            _train_step(model, ids, autocast, opt)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA") / 1e6
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    head = (f"profiled {steps} steps: wall {wall:.3f} s, GPU kernel time {kernels:.3f} s "
            f"({100 * kernels / wall:.0f}% busy), {launches / steps:.0f} kernel launches/step\n")
    return head + events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)


def run_case(kind, preset, method, device, batch, seq, steps, warmup, fast=None, breakdown=False, profile=False):
    torch.manual_seed(0)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, vocab = build(kind, preset, device, method, fast)
    if device.startswith("cuda"):
        # Measure the training peak only: the bf16 copy that `qlora` quantises from is gone by now,
        # as it is when a real QLoRA run quantises shard by shard while loading.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, vocab, (batch, seq), device=device)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = _train_step(model, ids, autocast, opt)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    from torch._dynamo.utils import counters  # graphs compiled so far in this process (--compile)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    result = dict(model=kind, preset=preset, method=method, fast=_describe(fast) if kind != "llama" else None,
                  step_s=round(step, 4),
                  tokens_per_s=round(batch * seq / step, 1), weights_gib=round(resident, 2), peak_gib=round(peak, 2),
                  loss=round(float(loss.detach()), 4), compiled_graphs=counters["stats"]["unique_graphs"])
    if profile and device.startswith("cuda"):
        result["profile"] = _profile(model, ids, autocast, opt)
    if breakdown and device.startswith("cuda"):  # more steps: what the peak holds
        result["phases_gib"] = _phase_peaks(model, ids, autocast, opt)
        base = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        try:
            _train_step(model, ids, autocast, opt)
            result["breakdown"] = f"held before the step: {base / 2**30:.3f} GiB\n" + peak_breakdown(
                torch.cuda.memory._snapshot())
        except Exception as exc:  # noqa: BLE001 - the measured figures above stand without it
            result["breakdown"] = f"no breakdown: {type(exc).__name__}: {exc}"
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    del model, opt, loss
    gc.collect()
    return result


def _describe(fast: dict | None) -> dict | None:
    if not fast:
        return None
    return {k: str(v).replace("torch.", "") if isinstance(v, torch.dtype) else v for k, v in fast.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", default="baichuan2-7b,baichuan2-13b")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="")
    # The fast paths of our model (the `sft` options of the same names); defaults are sft's.
    ap.add_argument("--attention", default="sdpa", choices=["sdpa", "flex"])
    ap.add_argument("--loss-chunk-size", type=int, default=0)
    ap.add_argument("--qlora-half-frozen", default="true", choices=["true", "false"])
    ap.add_argument("--compile", default="false", choices=["true", "false"])
    ap.add_argument("--sdpa-cudnn", default="true", choices=["true", "false"])
    ap.add_argument("--nf4-in-graph", default="true", choices=["true", "false"],
                    help="with --compile true: NF4 dequantised as torch ops inside the compiled layers")
    ap.add_argument("--checkpoint-layers", type=int, default=-1,
                    help="ours: how many decoder layers recompute their activations (-1: all, as the baseline)")
    ap.add_argument("--no-baseline", action="store_true", help="our model only")
    ap.add_argument("--profile", action="store_true", help="profile two more steps of each case (GPU)")
    ap.add_argument("--memory-breakdown", action="store_true",
                    help="record one more step of ours and print what the peak holds, by the code that allocated it")
    args = ap.parse_args()
    fast = dict(attention=args.attention, loss_chunk_size=args.loss_chunk_size, compile=args.compile == "true",
                qlora_keep_dtype=torch.bfloat16 if args.qlora_half_frozen == "true" else None,
                checkpoint_layers=args.checkpoint_layers, sdpa_cudnn=args.sdpa_cudnn == "true",
                nf4_in_graph=args.nf4_in_graph == "true")
    presets, methods = args.presets.split(","), args.methods.split(",")
    if args.device.startswith("cuda"):
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    results = []
    for method in methods:
        for preset in presets:
            results.append(run_case("baichuan", preset, method, args.device, args.batch, args.seq, args.steps,
                                    args.warmup, fast, args.memory_breakdown, args.profile))
            breakdown, profile = results[-1].pop("breakdown", None), results[-1].pop("profile", None)
            print(json.dumps(results[-1]), flush=True)
            if profile:
                print(f"PROFILE {preset} {method}\n{profile}", flush=True)
            if breakdown:
                print(f"MEMORY {preset} {method}\n{breakdown}", flush=True)
        if args.no_baseline:
            continue
        base = run_case("llama", presets[0], method, args.device, args.batch, args.seq, args.steps, args.warmup,
                        profile=args.profile)
        profile = base.pop("profile", None)
        results.append(base)
        print(json.dumps(base), flush=True)
        if profile:
            print(f"PROFILE llama {presets[0]} {method}\n{profile}", flush=True)
        ours = next(r for r in results if r["preset"] == presets[0] and r["method"] == method and r["model"] == "baichuan")
        print(f"RATIO {method} {presets[0]}: tokens/s ours/llama = {ours['tokens_per_s'] / base['tokens_per_s']:.3f}, "
              f"peak memory ours/llama = {ours['peak_gib'] / base['peak_gib']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
