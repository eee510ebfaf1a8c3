"""The shipped SFT recipes on the real data: `baichuan-tune sft` against the recipes as their authors ran them.

    python benchmarks/bench_recipes.py --shared ../shared                 # on a GPU: both recipes, full shapes
    python benchmarks/bench_recipes.py --shared ../shared --smoke         # CPU: tiny shapes, a few steps

For each recipe in examples/ (Baichuan-7B QLoRA on BELLE data, Baichuan-13B-Chat 4-bit LoRA on W_pack on
alpaca data) a random-weight checkpoint is written with the published config.json and tokenizer
(`<shared>/reference`), and trained on the real data file (`<shared>/data`):
- ours: `baichuan_tune.commands.sft.main` on the recipe YAML, unpacked as shipped and with --packing,
  with the fast-path options given by --fast (default: the shipped defaults; repeat --fast to run
  several variants on one checkpoint, e.g. `--fast "" --fast "--compile true"`);
- baseline, in the same process: transformers `Trainer` + PEFT + bitsandbytes on the same tokenised
  samples, on transformers' `LlamaForCausalLM` with the converted weights (`models.convert`) for the RoPE
  recipe and on our model with PEFT's own preparation for the ALiBi recipe.
Tokens/s and seconds per optimizer step are measured after --warmup steps (compilation and the allocator
settle there); the peak is the GPU memory allocated during training. --profile adds a torch.profiler
summary of two more steps of our unpacked run. --smoke turns the recipes' fp16/bf16 off (CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import baichuan_tune  # noqa: E402,F401
from baichuan_tune.commands import sft  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# recipe name -> (YAML, published config folder, tokenizer folder, data file)
RECIPES = {
    "7b-qlora-belle": ("sft_baichuan7b_qlora_belle.yaml", "baichuan-7b", "baichuan-7b", "belle_dev1k.jsonl"),
    "13b-lora-wpack": ("sft_baichuan13b_chat_lora_wpack.yaml", "baichuan-13b-chat", "baichuan-13b-base",
                       "alpaca_zh_demo.json"),
}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
SMOKE_SHAPE = {"num_hidden_layers": 2, "intermediate_size": 192}
# hidden, heads: multiples of 64 for bitsandbytes' CPU NF4 kernels; 13B keeps a head count not a power of 2
SMOKE_WIDTH = {"baichuan-7b": (64, 4), "baichuan-13b-chat": (320, 5)}
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_checkpoint(reference: Path, config_dir: str, tokenizer_dir: str, folder: Path, smoke: bool, device) -> Path:
    """Random weights at the published config's shapes (smoke: shrunk), the published config.json and tokenizer."""
    from baichuan_tune.models import BaichuanConfig, BaichuanForCausalLM

    published = json.loads((reference / config_dir / "config.json").read_text())
    if smoke:
        published |= SMOKE_SHAPE | dict(zip(("hidden_size", "num_attention_heads"), SMOKE_WIDTH[config_dir]))
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16, the published dtype: no fp32 copy of 13B weights
    try:
        with torch.device(device):
            model = BaichuanForCausalLM(BaichuanConfig(**published))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(str(folder), max_shard_size="5GB")
    del model
    gc.collect()
    (folder / "config.json").write_text(json.dumps(published, indent=2))  # the published file, as it ships
    for name in TOKENIZER_FILES:
        shutil.copy(reference / tokenizer_dir / name, folder / name)
    return folder


def recipe_argv(recipe: str, model: Path, data: Path, out: Path, steps: int, smoke: bool, extra: list[str]) -> list[str]:
    argv = [str(EXAMPLES / RECIPES[recipe][0]), "--model", str(model), "--dataset", str(data), "--output_dir",
            str(out), "--max_steps", str(steps), "--save_steps", "0", "--logging_steps", "1", "--plot_loss", "false",
            "--report_to", "none", "--overwrite_output_dir", "true", "--cache_dir", "none"]
    if smoke:
        argv += ["--fp16", "false", "--bf16", "false", "--max_samples", "16", "--device", "cpu"]
    return argv + extra


def steady(times: list[float], tokens: list[int], warmup: int) -> tuple[float, float, int]:
    """(tokens/s, s/step, tokens) between the end of step `warmup` and the last step (from the start when
    the run has no step past the warmup: a smoke run's few packed rows)."""
    warmup = warmup if len(times) > warmup else 0
    steps = len(times) - warmup
    dt = times[-1] - times[warmup - 1] if warmup else times[-1]
    dn = tokens[-1] - (tokens[warmup - 1] if warmup else 0)
    return dn / dt, dt / steps, dn


def run_ours(recipe, model, data, workdir, steps, warmup, smoke, extra, profile_steps=0) -> dict:
    out = workdir / f"ours-{recipe}"
    from torch._dynamo.utils import counters

    # Each variant compiles afresh: a compiled layer keeps the SDPA kernel it was traced with, so a later
    # variant with other kernels (--sdpa_cudnn) would otherwise reuse the earlier variant's graphs.
    torch._dynamo.reset()
    # and the previous run's model goes before this one loads: with NF4 in the compiled graphs it was
    # measured to outlive the run until a collection (5.7 GiB more in the next run's peak)
    gc.collect()
    prof = _profiling(profile_steps, steps) if profile_steps else None
    graphs = counters["stats"]["unique_graphs"]
    sft.main(recipe_argv(recipe, model, data, out, steps + profile_steps, smoke, extra))
    graphs = counters["stats"]["unique_graphs"] - graphs  # compiled by torch.compile during the run
    records = [r for r in map(json.loads, (out / "trainer_log.jsonl").read_text().splitlines()) if "loss" in r]
    records = records[:steps]
    elapsed = [r["elapsed"] for r in records]
    tps, sps, timed = steady(elapsed, [r["tokens"] for r in records], warmup)
    peaks = [r["max_memory_gib"] for r in records if "max_memory_gib" in r]  # training's peak (reset after loading)
    result = dict(tokens_per_s=round(tps, 1), s_per_step=round(sps, 4), timed_tokens=timed,
                  step_s=[round(b - a, 3) for a, b in zip(elapsed[warmup - 1:], elapsed[warmup:])] if warmup else [],
                  peak_gib=max(peaks) if peaks else None,
                  loss_last=records[-1]["loss"], graphs_compiled=graphs)
    if prof is not None:
        result["profile"] = prof.summary()
    shutil.rmtree(out, ignore_errors=True)
    return result


class _Profile:
    """A torch.profiler over the optimizer steps after the measured ones (the training engine's step is
    patched to step it)."""

    def __init__(self, skip: int, active: int):
        from torch.profiler import ProfilerActivity, profile, schedule

        from baichuan_tune.train.engine import Engine

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, schedule=schedule(wait=skip, warmup=0, active=active, repeat=1))
        self.engine, self.original = Engine, Engine._step
        self.active, self.wall = active, 0.0
        profiler, bench = self.prof, self

        def optimizer_step(engine, batches, progress):
            t0 = time.perf_counter()
            bench.original(engine, batches, progress)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if profiler.current_action.name == "RECORD" or profiler.current_action.name == "RECORD_AND_SAVE":
                bench.wall += time.perf_counter() - t0
            profiler.step()

        Engine._step = optimizer_step
        self.prof.start()

    def summary(self) -> str:
        self.prof.stop()
        self.engine._step = self.original
        events = self.prof.key_averages()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        kernels = sum(e.self_device_time_total for e in events  # kernels only, not the step ranges
                      if e.device_type.name == "CUDA" and not e.key.startswith("ProfilerStep")) / 1e6
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        head = (f"profiled {self.active} steps: wall {self.wall:.3f} s, GPU kernel time {kernels:.3f} s "
                f"({100 * kernels / max(self.wall, 1e-9):.0f}% busy), {launches / self.active:.0f} kernel launches/step\n")
        # The host side: which calls the CPU time goes to, inclusive (a compiled region, a backward node,
        # bitsandbytes' ops) and self. The profiler's own overhead inflates these; their shares are the point.
        host = (f"\nhost time by call, inclusive (wall {self.wall:.3f} s):\n"
                + events.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=70)
                + "\nhost time by call, self:\n"
                + events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70))
        return head + events.table(sort_by=sort, row_limit=15, max_name_column_width=60) + host


def _profiling(active: int, skip: int) -> _Profile:
    return _Profile(skip, active)


def run_baseline(recipe, model_dir, data, workdir, steps, warmup, smoke) -> dict:
    """transformers Trainer + PEFT + bitsandbytes, as the recipe's own tool ran it."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from baichuan_tune.config import parse_config
    from baichuan_tune.data.collate import collate_padded
    from baichuan_tune.models.checkpoint import load_model, load_tokenizer
    from baichuan_tune.models.quantize import bnb_config

    cfg = parse_config(sft.SFTConfig, recipe_argv(recipe, model_dir, data, workdir / "unused", steps, smoke, []))
    train_set, _, _ = sft._load_data(cfg, load_tokenizer(model_dir))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else torch.float32
    device = "cpu" if smoke else "cuda"
    if recipe.startswith("7b"):
        from baichuan_tune.models.convert import convert_checkpoint
        from transformers import LlamaForCausalLM

        llama_dir = convert_checkpoint(model_dir, workdir / "llama", to="llama")
        model = LlamaForCausalLM.from_pretrained(str(llama_dir), dtype=dtype, device_map={"": device}, quantization_config=bnb_config(4, dtype))
        targets = LLAMA_LINEARS
    else:
        model = load_model(model_dir, dtype={torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32"),
                           device=device, quantize=4)
        targets = list(cfg.lora_target)
    if smoke:
        from baichuan_tune.models.quantize import keep_4bit_trainable

        keep_4bit_trainable(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout, target_modules=targets))
    seen = {"tokens": 0}

    times, tokens = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter())
            tokens.append(seen["tokens"])

    args = TrainingArguments(
        output_dir=str(workdir / "trainer"), per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type, max_steps=steps, bf16=cfg.bf16, fp16=cfg.fp16,
        gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        use_cpu=smoke, seed=cfg.seed, disable_tqdm=True,
    )
    from baichuan_tune.train.training import batch_order

    # Our engine's sample order, read in sequence: both runs see the same samples at every step (the cost
    # of a step barely depends on its length, so tokens/s is only comparable over the same samples).
    order = [i for batch in batch_order(len(train_set), cfg.per_device_train_batch_size, cfg.seed, 0) for i in batch]
    rows = [{k: list(map(int, v)) for k, v in train_set[i].items()} for i in order]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, *args, **kwargs):  # counted here: the loader reads one batch ahead
            seen["tokens"] += int(inputs["attention_mask"].ne(0).sum())
            return super().training_step(model, inputs, *args, **kwargs)

    trainer = InOrder(model=model, args=args, train_dataset=rows, data_collator=collate_padded, callbacks=[Clock()])
    trainer.train()
    times = [t - start for t in times]
    tps, sps, timed = steady(times, tokens, warmup)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 3) if torch.cuda.is_available() else None
    loss = next((r["loss"] for r in reversed(trainer.state.log_history) if "loss" in r), float("nan"))
    del trainer, model
    gc.collect()
    return dict(tokens_per_s=round(tps, 1), s_per_step=round(sps, 4), timed_tokens=timed, peak_gib=peak,
                loss_last=loss)


def save(path: str, results: list[dict]) -> None:
    if path:  # after every run, so a run cut short still leaves what it measured
        Path(path).write_text(json.dumps(results, indent=2))


def print_ratio(recipe: str, ours: dict, base: dict) -> None:
    mem = f"{ours['peak_gib'] / base['peak_gib']:.3f}" if ours["peak_gib"] and base["peak_gib"] else "n/a"
    print(f"RATIO {recipe} {ours['run']} {ours['fast']!r}/baseline: tokens/s {ours['tokens_per_s'] / base['tokens_per_s']:.3f}, "
          f"s/step {ours['s_per_step'] / base['s_per_step']:.3f}, peak memory {mem}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first --warmup not timed)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--fast", action="append", default=None,
                    help="extra sft options for our runs, e.g. '--attention flex'; repeat it to run each in turn")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-packing", action="store_true")
    ap.add_argument("--no-ours", action="store_true", help="the baseline only (e.g. in a second process)")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep the random checkpoints in --workdir and reuse those already there")
    ap.add_argument("--profile", action="store_true", help="profile two more steps of our unpacked runs")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, few samples")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_recipes-"))
    results = []
    for recipe in args.recipes.split(","):
        _, config_dir, tokenizer_dir, data_file = RECIPES[recipe]
        t0 = time.perf_counter()
        model = workdir / recipe
        if not (args.keep_checkpoints and (model / "config.json").is_file()):
            write_checkpoint(shared / "reference", config_dir, tokenizer_dir, model, args.smoke, device)
            print(f"{recipe}: checkpoint written in {time.perf_counter() - t0:.0f} s", flush=True)
        data = shared / "data" / data_file
        base = None
        if not args.no_baseline:  # first: a long run of our variants cannot leave the ratios without it
            base = dict(recipe=recipe, run="baseline",
                        **run_baseline(recipe, model, data, workdir, args.steps, args.warmup, args.smoke))
            results.append(base)
            print(json.dumps(base), flush=True)
            save(args.json, results)
        cases = [("ours", []), ("ours+packing", ["--packing", "true"])][: 1 if args.no_packing else 2]
        cases = [] if args.no_ours else [(name, fast, extra) for fast in args.fast or [""] for name, extra in cases]
        for name, fast, extra in cases:
            try:
                row = run_ours(recipe, model, data, workdir, args.steps, args.warmup, args.smoke,
                               fast.split() + extra, profile_steps=2 if args.profile and name == "ours" else 0)
            except Exception as exc:  # noqa: BLE001 - report the case and go on with the others
                if args.smoke:
                    raise
                print(f"FAILED {recipe} {name} {fast!r}: {type(exc).__name__}: {exc}", flush=True)
                continue
            profile = row.pop("profile", None)
            results.append(dict(recipe=recipe, run=name, fast=fast, **row))
            print(json.dumps(results[-1]), flush=True)
            save(args.json, results)
            if profile:
                print(f"PROFILE {recipe} {name} {fast!r}\n{profile}", flush=True)
            if base is not None:
                print_ratio(recipe, results[-1], base)
        if not args.keep_checkpoints:
            shutil.rmtree(workdir / recipe, ignore_errors=True)
        shutil.rmtree(workdir / "llama", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
