"""Supervised fine-tuning (instruction tuning) with LoRA, QLoRA, freeze or full training.

    baichuan-tune sft                                  # built-in demo: tiny default model, CPU, minutes
    baichuan-tune sft examples/sft_baichuan7b_qlora.yaml --model /path/to/Baichuan-7B --dataset data.jsonl
    baichuan-tune sft --help                           # every option with its default

Reads alpaca/BELLE, Baichuan2 `conversations` and OpenAI `messages` JSON/JSONL files; writes into
output_dir: the adapter (PEFT format) or full weights (published layout), checkpoints every save_steps
(resumable with --resume true), trainer_log.jsonl, training_loss.png, TensorBoard events, and
train_results.json. With no config file and no --dataset, runs the built-in demo and prints answers to a
few prompts before and after training.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
import torch

from ..config import opt, parse_config
from ..data import DataOptions
from ..training import ModelOptions, TrainOptions

# Settings of the built-in demo: a full fine-tune of the tiny default model on the demo data.
DEMO_OVERRIDES = [
    "--model", "default", "--finetuning_type", "full", "--output_dir", "outputs/sft-demo", "--num_train_epochs", "3",
    "--learning_rate", "1e-3", "--warmup_ratio", "0.05", "--per_device_train_batch_size", "8", "--logging_steps", "5",
    "--save_steps", "100", "--val_size", "0.05", "--eval_steps", "50", "--cutoff_len", "128", "--device", "cpu",
]


@dataclass
class SFTConfig(ModelOptions, DataOptions, TrainOptions):
    demo_prompts: list[str] = opt(factory=list, help="prompts answered before and after training (chat format)")


def main(argv: list[str]) -> int:
    demo = not argv or (argv[0].startswith("--") and not any(a.startswith("--dataset") for a in argv))
    if demo and not any(a in ("-h", "--help") for a in argv):
        print("No config file and no --dataset: running the built-in demo (tiny default model, demo data, CPU).")
        argv = DEMO_OVERRIDES + list(argv)
    cfg = parse_config(SFTConfig, argv, prog="baichuan-tune sft")
    from .. import builtin
    from ..adapters import count_parameters, prepare_for_training
    from ..checkpoint import load_model_and_tokenizer, resolve_model_path
    from ..training import (Checkpoints, RunLog, make_grad_scaler, make_optimizer, make_scheduler, precision_dtype,
                            prepare_output_dir, resolve_device, seed_everything, total_optimizer_steps)

    # ---- setup
    out = prepare_output_dir(cfg)
    seed_everything(cfg.seed)
    device, amp_dtype = resolve_device(cfg.device), precision_dtype(cfg)
    model, tokenizer = load_model_and_tokenizer(
        resolve_model_path(cfg.model), device=str(device), dtype=_base_dtype(cfg, amp_dtype),
        quantize=cfg.quantization_bit if cfg.finetuning_type == "qlora" else None,
    )
    train_set, val_set, data_report = _load_data(cfg, tokenizer, out, demo)
    prompts = cfg.demo_prompts or (builtin.DEMO_PROMPTS if demo else [])
    before = _answers(model, tokenizer, cfg.template, prompts)
    model = prepare_for_training(
        model, cfg.finetuning_type, lora_target=cfg.lora_target, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, freeze_trainable_layers=cfg.freeze_trainable_layers,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    trainable, total = count_parameters(model)
    per_epoch, total_steps = total_optimizer_steps(cfg, len(train_set))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    scaler = make_grad_scaler(device, amp_dtype)
    checkpoints = Checkpoints(out, cfg.save_total_limit)
    position = {"epoch": 0, "batch": 0, "skipped_steps": 0, "tokens": 0}
    if cfg.resume and checkpoints.latest() is not None:
        position = checkpoints.load(checkpoints.latest(), model, optimizer, scheduler, scaler)
    log = RunLog(out, total_steps, start_step=position.get("step", 0), tensorboard=cfg.report_to == "tensorboard",
                 desc="sft")
    log.write(f"{data_report}; {len(train_set)} train / {len(val_set)} eval samples; {total_steps} optimizer steps; "
              f"trainable {trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters ({cfg.finetuning_type})")

    # ---- loop
    step = position.get("step", 0)
    start = time.time()
    tokens_at_start = position["tokens"]
    last_ckpt = checkpoints.latest()
    while step < total_steps:
        step, last_ckpt = _run_epoch(cfg, model, train_set, val_set, optimizer, scheduler, scaler, checkpoints, log,
                                     position, step, total_steps, per_epoch, device, amp_dtype, start,
                                     tokens_at_start, last_ckpt)
    log.close()

    # ---- save
    from ..training import plot_curves, save_final

    save_final(model, tokenizer, out, cfg.finetuning_type)
    if cfg.plot_loss:
        plot_curves(out / "trainer_log.jsonl", out / "training_loss.png", title="sft loss")
    results = _final_metrics(cfg, model, val_set, device, amp_dtype, position, step, start)
    (out / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results))
    after = _answers(model, tokenizer, cfg.template, prompts)
    for prompt, old, new in zip(prompts, before, after):
        print(f"\n> {prompt}\n  before: {old!r}\n  after:  {new!r}")
    print(f"\nDone: outputs in {out}")
    return 0


def _base_dtype(cfg, amp_dtype) -> str:
    """Frozen base weights in the compute dtype; trained full/freeze weights stay fp32 (master copy)."""
    if cfg.finetuning_type in ("lora", "qlora") and amp_dtype is not None:
        return "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    return "fp32"


def _load_data(cfg, tokenizer, out: Path, demo: bool):
    from .. import data

    files = list(cfg.dataset) or ([data.DEMO_DATASET] if demo else [])
    if not files:
        from ..errors import DataError

        raise DataError("no --dataset given (data files in JSON/JSONL, comma separated)")
    return data.load_sft_data(files, tokenizer, **cfg.load_kwargs(cfg.seed))


def _batches(cfg, dataset, epoch: int):
    from ..collate import collate_padded, pack_examples
    from ..training import batch_order

    if cfg.packing:
        rows = pack_examples(dataset, cfg.cutoff_len)
        return [collate_padded([rows[i] for i in b]) for b in batch_order(len(rows), cfg.per_device_train_batch_size,
                                                                           cfg.seed, epoch)]
    return [collate_padded([dataset[i] for i in b])
            for b in batch_order(len(dataset), cfg.per_device_train_batch_size, cfg.seed, epoch)]


def _run_epoch(cfg, model, train_set, val_set, optimizer, scheduler, scaler, checkpoints, log, position, step,
               total_steps, per_epoch, device, amp_dtype, start, tokens_at_start, last_ckpt):
    """One pass over the data from the saved position; returns (step, last checkpoint)."""
    from ..training import autocast, loss_is_bad, optimizer_step

    model.train()
    epoch = position["epoch"]
    batches = _batches(cfg, train_set, epoch)
    accum = cfg.gradient_accumulation_steps
    usable = per_epoch * accum  # a trailing partial accumulation group is dropped, as in most trainers
    i = position["batch"]
    while i < usable and step < total_steps:
        group = batches[i : i + accum]
        losses = []
        skipped = False
        for batch in group:
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, amp_dtype):
                loss = model(**batch).loss
            if loss_is_bad(loss, step + 1, cfg.nan_policy, last_ckpt):
                skipped = True
                break
            (scaler.scale(loss / len(group)) if scaler else loss / len(group)).backward()
            losses.append(loss.item())
            position["tokens"] += int(batch["attention_mask"].ne(0).sum())
        i += accum
        position["batch"] = i
        if skipped:
            optimizer.zero_grad(set_to_none=True)
            position["skipped_steps"] += 1
            scheduler.step()
            step += 1
            log.write(f"step {step}: non-finite loss, step skipped ({position['skipped_steps']} so far)")
            continue
        grad_norm = optimizer_step(model, optimizer, scheduler, scaler, cfg.max_grad_norm)
        step += 1
        elapsed = time.time() - start
        tps = (position["tokens"] - tokens_at_start) / max(elapsed, 1e-9)
        lr = scheduler.get_last_lr()[0]
        loss_value = sum(losses) / len(losses)
        log.step(step, loss=loss_value, lr=lr, tok_s=round(tps))
        if step % cfg.logging_steps == 0 or step == total_steps:
            log.log(step, loss=round(loss_value, 5), lr=lr, grad_norm=round(grad_norm, 4),
                    epoch=round(epoch + i / max(usable, 1), 4), tokens_per_s=round(tps, 1))
        if val_set and cfg.eval_steps and step % cfg.eval_steps == 0:
            log.log(step, eval_loss=round(_eval_loss(cfg, model, val_set, device, amp_dtype), 5))
            model.train()
        if step % cfg.save_steps == 0 and step < total_steps:
            position_to_save = {**position, "epoch": epoch if i < usable else epoch + 1,
                                "batch": i if i < usable else 0}
            last_ckpt = checkpoints.save(step, model, optimizer, scheduler, scaler, position_to_save)
    if i >= usable:
        position["epoch"], position["batch"] = epoch + 1, 0
        if val_set and not cfg.eval_steps:
            log.log(step, eval_loss=round(_eval_loss(cfg, model, val_set, device, amp_dtype), 5))
    return step, last_ckpt


@torch.no_grad()
def _eval_loss(cfg, model, val_set, device, amp_dtype) -> float:
    """Token-weighted mean loss over the eval split."""
    from ..collate import collate_padded
    from ..training import autocast

    model.eval()
    total, count = 0.0, 0
    for k in range(0, len(val_set), cfg.per_device_train_batch_size):
        batch = collate_padded(val_set[k : k + cfg.per_device_train_batch_size])
        batch = {key: v.to(device) for key, v in batch.items()}
        n = int(batch["labels"][:, 1:].ne(-100).sum())
        with autocast(device, amp_dtype):
            total += float(model(**batch).loss) * n
        count += n
    return total / max(count, 1)


def _final_metrics(cfg, model, val_set, device, amp_dtype, position, step, start) -> dict:
    from ..training import read_log

    records = [r for r in read_log(Path(cfg.output_dir) / "trainer_log.jsonl") if "loss" in r]
    results = {"global_step": step, "train_runtime_s": round(time.time() - start, 1),
               "train_loss_first": records[0]["loss"] if records else None,
               "train_loss_last": records[-1]["loss"] if records else None,
               "skipped_steps": position["skipped_steps"], "tokens": position["tokens"]}
    if val_set:
        results["eval_loss"] = round(_eval_loss(cfg, model, val_set, device, amp_dtype), 5)
        results["eval_perplexity"] = round(math.exp(min(results["eval_loss"], 50)), 3)
    return results


@torch.no_grad()
def _answers(model, tokenizer, template: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to `prompts` in the training template's chat format."""
    from ..templates import get_template

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    answers = []
    for prompt in prompts:
        ids = get_template(template).encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
        input_ids = torch.tensor([ids], device=model.device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    model.train(was_training)
    return answers
