"""Supervised fine-tuning (instruction tuning) with LoRA, QLoRA, freeze or full training; no options: a demo.

    baichuan-tune sft                                  # built-in demo: tiny default model, CPU, minutes
    baichuan-tune sft examples/sft_baichuan7b_qlora_belle.yaml --model /path/to/Baichuan-7B --dataset data.jsonl
    baichuan-tune sft --help                           # every option with its default
    torchrun --nproc_per_node 4 -m baichuan_tune.cli sft CONFIG.yaml   # data-parallel on 4 GPUs of one node

Reads alpaca/BELLE, Baichuan2 `conversations` and OpenAI `messages` JSON/JSONL files; writes into
output_dir: the adapter (PEFT format) or full weights (published layout), checkpoints every save_steps
(resumable with --resume true), trainer_log.jsonl, training_loss.png, TensorBoard events, and
train_results.json. With no config file and no --dataset, runs the built-in demo and prints answers to a
few prompts before and after training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..builtin import DEMO_PROMPTS, SFT_DEMO_DIR
from ..config import opt, parse_config
from ..data.loading import SFTDataOptions
from ..options import ModelOptions, TrainOptions

# Settings of the built-in demo: a full fine-tune of the tiny default model on the demo data.
DEMO_OVERRIDES = [
    "--model", "default", "--dataset", "demo", "--finetuning_type", "full", "--output_dir", str(SFT_DEMO_DIR), "--num_train_epochs", "3",
    "--learning_rate", "1e-3", "--warmup_ratio", "0.05", "--per_device_train_batch_size", "8", "--logging_steps", "5",
    "--save_steps", "100", "--val_size", "0.05", "--eval_steps", "50", "--cutoff_len", "128", "--device", "cpu",
    "--overwrite_output_dir", "true",
]


@dataclass
class SFTConfig(ModelOptions, SFTDataOptions, TrainOptions):
    demo_prompts: list[str] = opt(factory=list, help="prompts answered before and after training (chat format)")

    def validate(self) -> None:
        from ..config import ConfigError
        from ..train.training import check_options

        if not self.dataset:
            raise ConfigError("no --dataset given (data files in JSON/JSONL, comma separated; with no options at "
                              "all, `baichuan-tune sft` runs the built-in demo)")
        check_options(self)


def main(argv: list[str]) -> int:
    from ..options import with_demo

    # A user's own --model without --dataset is a mistake to report, not a reason to run the demo on it.
    argv, demo = with_demo(argv, DEMO_OVERRIDES, "demo (tiny default model, demo data, CPU)", SFTConfig,
                           own_model_allowed=False)
    cfg = parse_config(SFTConfig, argv, prog="baichuan-tune sft")
    from ..train.training import base_dtype, write_results
    from ..extras import check_extras

    check_extras("sft", cfg)  # a missing matplotlib must not wait for the end of the run
    from ..train.adapters import count_parameters
    from ..models.checkpoint import load_model_and_tokenizer, resolve_model_path
    from ..data.collate import pack_examples
    from ..train import distributed
    from ..train.engine import Engine, schedule_for
    from ..train.methods import SFTMethod
    from ..train.training import start_run, prepare_from_config, seed_everything
    from ..serve.generation import greedy_answers

    # ---- setup
    dist, device, out, amp_dtype = start_run(cfg)
    model, tokenizer = load_model_and_tokenizer(
        resolve_model_path(cfg.model), device=str(device), dtype=base_dtype(cfg, amp_dtype),
        quantize=cfg.quantization_bit if cfg.finetuning_type == "qlora" else None, sharded=cfg.parallel == "fsdp",
    )
    if cfg.finetuning_type == "qlora":
        from ..models.quantize import keep_4bit_trainable

        keep_4bit_trainable(model)  # before the "before" answers: their eval pass would repack NF4 on a CPU
    if not dist.main:
        dist.barrier()  # rank 0 tokenises first and fills the cache; the others then read it
    train_set, val_set, data_report = _load_data(cfg, tokenizer)
    if dist.main:
        dist.barrier()
    # Steps per epoch count packed rows, not samples. Packing is deterministic, so a resumed run packs alike.
    rows = pack_examples(train_set, cfg.cutoff_len) if cfg.packing else train_set
    prompts = (cfg.demo_prompts or (DEMO_PROMPTS if demo else [])) if dist.main else []
    before = greedy_answers(model, tokenizer, cfg.template, prompts)
    seed_everything(cfg.seed)  # here, so whatever loading drew does not shift the adapter init and dropout
    model = prepare_from_config(model, cfg, amp_dtype)
    trainable, total = count_parameters(model)
    schedule = schedule_for(cfg, len(rows), dist.world)
    method = SFTMethod(rows, val_set, z_loss=bool(getattr(model.config, "z_loss_weight", 0)))
    engine = Engine(model, method, cfg, out, schedule, dist, device, amp_dtype)

    # ---- train
    summary = (f"{data_report}" + (f"; packed into {len(rows)} rows" if cfg.packing else "")
               + f"; {schedule.total_steps} optimizer steps; trainable {trainable / 1e6:.2f}M of {total / 1e6:.2f}M "
               f"parameters ({cfg.finetuning_type})")
    results = engine.run(summary)
    distributed.shutdown(dist)

    # ---- save
    from ..train.training import final_dtype, plot_curves, read_log, save_final

    if not dist.main:
        return 0
    losses = [r["loss"] for r in read_log(out / "trainer_log.jsonl") if "loss" in r]
    results.update(train_loss_first=losses[0] if losses else None, train_loss_last=losses[-1] if losses else None)
    if engine.evals:
        results["eval_loss"] = engine.evals[-1]["eval_loss"]
        results["eval_perplexity"] = round(math.exp(min(results["eval_loss"], 50)), 3)
    with engine.keep_state():  # the trained state stays on disk until the result is written
        save_final(model, tokenizer, out, cfg.finetuning_type, final_dtype(cfg), cfg.template,
                   state_dict=engine.full_state)
        if cfg.plot_loss:
            plot_curves(out / "trainer_log.jsonl", out / "training_loss.png", title="sft loss")
        write_results(out, {**results, **data_report.counts})
    # A sharded model computes only with every process, and the others have left: no answers after training.
    after = [] if engine.sharded else greedy_answers(model, tokenizer, cfg.template, prompts)
    for prompt, old, new in zip(prompts, before, after):
        print(f"\n> {prompt}\n  before: {old!r}\n  after:  {new!r}")
    print(f"\nDone: outputs in {out}")
    return 0


def _load_data(cfg, tokenizer):
    from ..data import loading as data

    return data.load_sft_data(list(cfg.dataset), tokenizer, **cfg.load_kwargs(cfg.seed))
