"""Training on several GPUs: `baichuan-tune` under torchrun against the same command on one GPU.

    python benchmarks/bench_scaling.py --shared ../shared                       # on a machine with 2-8 GPUs
    python benchmarks/bench_scaling.py --shared ../shared --smoke               # CPU: tiny shapes, gloo, 1 and 2 processes

Random-weight checkpoints are written at the published shapes with the published config.json and tokenizer
(`<shared>/reference`), and each case runs the real command as a user does,
`torchrun --standalone --nproc_per_node N -m baichuan_tune.cli <command> ...`, on the real data in
`<shared>/data`, for N = 1 and every count in --gpus:

- sft-lora, sft-qlora: Baichuan2-7B under DDP on belle_dev1k.jsonl (packed rows of 1,024 tokens, so every
  step holds the same work and tokens/s compares across N);
- dpo-lora: Baichuan2-7B under DDP on dpo_zh_demo.json;
- ppo-lora: Baichuan2-7B under DDP, prompts from belle_dev1k.jsonl, the policy's own LoRA as reward model;
- sft-full-fsdp: Baichuan2-13B full fine-tuning under FSDP2 (--parallel fsdp), then a kill + resume: the
  same run stopped after its first checkpoint and resumed must end on the same weights.

Per case: tokens/s (all GPUs) after --warmup steps, read from trainer_log.jsonl (it logs the cumulative tokens
and rate each step), tokens/s per GPU, the scaling efficiency (per-GPU rate at N over the rate at 1) and the
peak GPU memory of rank 0 (train_results.json).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


import bench_recipes  # noqa: E402

# smoke widths of the Baichuan2 configs (hidden, heads: multiples of 64 for bitsandbytes' CPU NF4 kernels)
bench_recipes.SMOKE_WIDTH.update({"baichuan2-7b-chat": (64, 4), "baichuan2-13b-chat": (320, 5)})
COMMON = ["--logging_steps", "1", "--save_steps", "0", "--plot_loss", "false", "--report_to", "none",
          "--overwrite_output_dir", "true", "--lora_rank", "8", "--lora_target", "all"]
# case -> (command, published config folder, parallelism, fewest GPUs it fits, extra options)
# The published folder whose tokenizer.model a config's checkpoint gets (the Baichuan2 models share theirs).
TOKENIZER_OF = {"baichuan2-7b-chat": "baichuan2-13b-chat", "baichuan2-13b-chat": "baichuan2-13b-chat"}
CASES = {
    "sft-lora": ("sft", "baichuan2-7b-chat", "ddp", 1, ["--finetuning_type", "lora", "--packing", "true",
                                                        "--cutoff_len", "1024", "--dataset", "{data}/belle_dev1k.jsonl"]),
    "sft-qlora": ("sft", "baichuan2-7b-chat", "ddp", 1, ["--finetuning_type", "qlora", "--packing", "true",
                                                         "--cutoff_len", "1024", "--dataset", "{data}/belle_dev1k.jsonl"]),
    "dpo-lora": ("dpo", "baichuan2-7b-chat", "ddp", 1, ["--finetuning_type", "lora", "--cutoff_len", "1024",
                                                        "--dataset", "{data}/dpo_zh_demo.json"]),
    "ppo-lora": ("ppo", "baichuan2-7b-chat", "ddp", 1, ["--finetuning_type", "lora", "--dataset", "{data}/belle_dev1k.jsonl",
                                                        "--reward_function", "baichuan_tune.rewards:chinese_ratio",
                                                        "--max_new_tokens", "64", "--rollout_batch_size", "{rollout}"]),
    # 13B full: about 220 GiB of weights, gradients and AdamW states (docs/training.md), so 2 H200s at least
    "sft-full-fsdp": ("sft", "baichuan2-13b-chat", "fsdp", 2, ["--finetuning_type", "full", "--packing", "true",
                                                               "--cutoff_len", "1024", "--gradient_checkpointing", "true",
                                                               "--dataset", "{data}/belle_dev1k.jsonl"]),
}


def torchrun(n: int, command: str, args: list[str], timeout: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    done = subprocess.run([*launcher, "-m", "baichuan_tune.cli", command, *args], capture_output=True, text=True,
                          timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{command} on {n} processes failed:\n{done.stderr[-4000:]}")


def steady_rate(out: Path, warmup: int) -> float:
    """Tokens/s between the end of step `warmup` and the last step (the log's rate is cumulative from the start)."""
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r and r.get("tokens_per_s")]
    first, last = rows[min(warmup, len(rows) - 1) - 1] if warmup else {"tokens": 0, "tokens_per_s": 1.0}, rows[-1]
    elapsed = last["tokens"] / last["tokens_per_s"] - first["tokens"] / first["tokens_per_s"]
    return (last["tokens"] - first["tokens"]) / max(elapsed, 1e-9)


def case_args(case: str, model: Path, data: Path, out: Path, n: int, args) -> tuple[str, list[str]]:
    command, _, parallel, _, extra = CASES[case]
    fill = {"data": str(data), "model": str(model), "rollout": str(args.batch * n)}
    extra = [e.format(**fill) for e in extra]
    precision = [] if args.smoke else ["--bf16", "true"]
    steps = ["--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch)]
    device = ["--device", "cpu"] if args.smoke else []
    return command, ["--model", str(model), "--output_dir", str(out), "--parallel", parallel, *COMMON, *precision,
                     *steps, *device, *extra]


def run_case(case: str, model: Path, data: Path, work: Path, n: int, args) -> dict:
    out = work / f"{case}-{n}"
    command, argv = case_args(case, model, data, out, n, args)
    torchrun(n, command, argv, args.timeout)
    results = json.loads((out / "train_results.json").read_text())
    rate = steady_rate(out, args.warmup)
    return {"case": case, "gpus": n, "tokens_per_s": round(rate, 1), "per_gpu": round(rate / n, 1),
            "peak_gib": results.get("peak_gpu_memory_gib")}


def kill_and_resume(model: Path, data: Path, work: Path, n: int, args) -> dict:
    """The FSDP2 run killed (SIGKILL to every process) once its first checkpoint is on disk, then resumed with
    --resume, against the uninterrupted run: the largest weight difference of the two final models."""
    import signal
    import time

    from safetensors.torch import load_file

    half = max(args.steps // 2, 1)
    whole, cut = work / "sft-full-fsdp-whole", work / "sft-full-fsdp-cut"
    _, argv = case_args("sft-full-fsdp", model, data, whole, n, args)
    torchrun(n, "sft", argv + ["--save_steps", str(half)], args.timeout)
    _, argv = case_args("sft-full-fsdp", model, data, cut, n, args)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    run = subprocess.Popen([*launcher, "-m", "baichuan_tune.cli", "sft", *argv, "--save_steps", str(half)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + args.timeout
    while not (cut / f"checkpoint-{half}" / "trainer_state.json").is_file():  # renamed into place when complete
        if run.poll() is not None or time.time() > deadline:
            raise RuntimeError("the run to be killed ended or stalled before its first checkpoint")
        time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    torchrun(n, "sft", argv + ["--save_steps", str(half), "--resume", "true", "--overwrite_output_dir", "false"],
             args.timeout)
    diff = 0.0
    for file in sorted(whole.glob("*.safetensors")):
        a, b = load_file(file), load_file(cut / file.name)
        diff = max([diff] + [float((a[k].float() - b[k].float()).abs().max()) for k in a])
    return {"case": "sft-full-fsdp kill+resume", "gpus": n, "killed_after_step": half, "max_weight_difference": diff}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--gpus", default="", help="process counts beside 1 (default: every visible GPU, and 2, 4 below it)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2, help="samples (packed rows, pairs, prompts) per GPU per step")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    visible = 2 if args.smoke else torch.cuda.device_count()
    counts = [int(c) for c in args.gpus.split(",") if c] or [c for c in (2, 4, 8) if c <= visible]
    shared = Path(args.shared)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work, models = Path(tmp), {}
        for case in args.cases.split(","):
            config_dir = CASES[case][1]
            if config_dir not in models:
                device = "cpu" if args.smoke else "cuda"
                models[config_dir] = bench_recipes.write_checkpoint(shared / "reference", config_dir,
                                                                    TOKENIZER_OF[config_dir], work / config_dir,
                                                                    args.smoke, device)
            fewest = 1 if args.smoke else CASES[case][3]
            for n in sorted({fewest, *counts} - set(range(fewest))):
                row = run_case(case, models[config_dir], shared / "data", work, n, args)
                base = next((r for r in rows if r["case"] == case), row)  # per-GPU rate against the fewest GPUs
                row["efficiency"] = round(row["per_gpu"] / base["per_gpu"], 3)
                rows.append(row)
                print(json.dumps(row), flush=True)
            if case == "sft-full-fsdp":
                rows.append(kill_and_resume(models[config_dir], shared / "data", work, max(counts), args))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
