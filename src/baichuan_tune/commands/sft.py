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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..builtin import DEMO_PROMPTS, SFT_DEMO_DIR
from ..config import opt, parse_config
from ..data import SFTDataOptions
from ..lazy import no_grad
from ..options import ModelOptions, TrainOptions

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs, not for --help
    import torch

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
        from ..training import check_options

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
    from ..training import base_dtype, write_results
    from ..adapters import count_parameters, prepare_for_training
    from ..checkpoint import load_model_and_tokenizer, resolve_model_path
    from ..collate import pack_examples
    from .. import distributed
    from ..training import (Checkpoints, RunLog, SilentLog, log_resume, make_grad_scaler, make_optimizer,
                            make_scheduler, precision_dtype, prepare_output_dir, resolve_device, seed_everything,
                            total_optimizer_steps)

    # ---- setup
    dist, device = distributed.setup(resolve_device(cfg.device))  # one process, or one of torchrun's
    amp_dtype = precision_dtype(cfg)
    out = prepare_output_dir(cfg) if dist.main else Path(cfg.output_dir)
    dist.barrier()
    model, tokenizer = load_model_and_tokenizer(
        resolve_model_path(cfg.model), device=str(device), dtype=base_dtype(cfg, amp_dtype),
        quantize=cfg.quantization_bit if cfg.finetuning_type == "qlora" else None,
    )
    if cfg.finetuning_type == "qlora":
        from ..quantize import keep_4bit_trainable

        keep_4bit_trainable(model)  # before the "before" answers: their eval pass would repack NF4 on a CPU
    if not dist.main:
        dist.barrier()  # rank 0 tokenises first and fills the cache; the others then read it
    train_set, val_set, data_report = _load_data(cfg, tokenizer)
    if dist.main:
        dist.barrier()
    # Steps per epoch count packed rows, not samples. Packing is deterministic, so a resumed run packs alike.
    rows = pack_examples(train_set, cfg.cutoff_len) if cfg.packing else train_set
    prompts = (cfg.demo_prompts or (DEMO_PROMPTS if demo else [])) if dist.main else []
    before = _answers(model, tokenizer, cfg.template, prompts)
    seed_everything(cfg.seed)  # here, so whatever loading drew does not shift the adapter init and dropout
    model = prepare_for_training(
        model, cfg.finetuning_type, lora_target=cfg.lora_target, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, freeze_trainable_layers=cfg.freeze_trainable_layers,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    trainable, total = count_parameters(model)
    per_epoch, total_steps = total_optimizer_steps(cfg, len(rows), dist.world)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    scaler = make_grad_scaler(device, amp_dtype)
    checkpoints = Checkpoints(out, cfg.save_total_limit)
    fresh = {"epoch": 0, "batch": 0, "skipped_steps": 0, "tokens": 0, "processes": dist.world}
    position = (cfg.resume and checkpoints.resume(model, optimizer, scheduler, scaler)) or fresh
    if position.get("processes", 1) != dist.world:  # the saved batch position indexes that many shards
        from ..training import TrainingError

        raise TrainingError(f"the checkpoint was written by a run of {position.get('processes', 1)} process(es); "
                            f"resume it with as many (this run has {dist.world})")
    model = distributed.wrap(model, dist, device)
    log = SilentLog() if not dist.main else RunLog(out, total_steps, start_step=position.get("step", 0),
                                                    tensorboard=cfg.report_to == "tensorboard", desc="sft")
    resumed = log_resume(log, checkpoints, position.get("step", 0))
    log.write(f"{data_report}" + (f"; packed into {len(rows)} rows" if cfg.packing else "") + f"; {total_steps} "
              f"optimizer steps; trainable {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters ({cfg.finetuning_type})"
              + (f"; {dist.world} processes, global batch {cfg.per_device_train_batch_size * dist.world}"
                 if dist.world > 1 else ""))

    # ---- loop
    loop = _Loop(cfg, model, optimizer, scheduler, scaler, checkpoints, log, device, amp_dtype, rows, val_set,
                 per_epoch, total_steps, position, dist)
    while loop.step < total_steps:
        loop.run_epoch()
    log.close()

    # ---- save
    from ..training import final_dtype, plot_curves, save_final

    results = loop.final_metrics()  # every process: the final evaluation is shared out among them
    model = distributed.unwrap(model)
    loop.model = None  # no DDP wrapper may outlive the process group
    distributed.shutdown(dist)
    if not dist.main:
        return 0
    save_final(model, tokenizer, out, cfg.finetuning_type, final_dtype(cfg))
    if cfg.plot_loss:
        plot_curves(out / "trainer_log.jsonl", out / "training_loss.png", title="sft loss")
    write_results(out, {**results, **data_report.counts, **resumed})
    after = _answers(model, tokenizer, cfg.template, prompts)
    for prompt, old, new in zip(prompts, before, after):
        print(f"\n> {prompt}\n  before: {old!r}\n  after:  {new!r}")
    print(f"\nDone: outputs in {out}")
    return 0


def _load_data(cfg, tokenizer):
    from .. import data

    return data.load_sft_data(list(cfg.dataset), tokenizer, **cfg.load_kwargs(cfg.seed))


@dataclass
class _Loop:
    """The training loop's state: what one optimizer step, one epoch and one evaluation need."""

    cfg: SFTConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object
    checkpoints: object
    log: object
    device: torch.device
    amp_dtype: torch.dtype | None
    rows: object  # training samples, or packed rows of them
    val_set: object
    per_epoch: int
    total_steps: int
    position: dict  # epoch, batch (index within the epoch), skipped_steps, tokens; + step once resumed
    dist: object  # distributed.Dist: this process's rank among `world` data-parallel ones

    def __post_init__(self):
        self.step = self.position.get("step", 0)
        self.start = time.time()
        self.tokens_at_start = self.position["tokens"]
        self.last_ckpt = self.checkpoints.latest()

    def run_epoch(self) -> None:
        """Optimizer steps from the saved position to the end of the epoch (or of the run)."""
        from ..training import batch_order

        cfg, accum = self.cfg, self.cfg.gradient_accumulation_steps
        epoch = self.position["epoch"]
        global_batch = cfg.per_device_train_batch_size * self.dist.world
        order = batch_order(len(self.rows), global_batch, cfg.seed, epoch)
        if self.dist.world > 1:  # every process needs its equal part of each batch
            order = [self.dist.shard(b) for b in order if len(b) == global_batch]
        usable = self.per_epoch * accum  # a trailing partial accumulation group is dropped, as in most trainers
        self.model.train()
        while self.position["batch"] < usable and self.step < self.total_steps:
            i = self.position["batch"]
            self.position["batch"] = i + accum
            self.optimizer_step(order[i : i + accum], epoch + (i + accum) / usable)
        if self.position["batch"] >= usable:
            self.position["epoch"], self.position["batch"] = epoch + 1, 0
            if self.val_set and not cfg.eval_steps:
                self.log.log(self.step, eval_loss=round(self.eval_loss(), 5))

    def optimizer_step(self, group: list[list[int]], epoch_progress: float) -> None:
        """Forward/backward over one accumulation group, then step, log, evaluate and checkpoint."""
        from ..collate import collate_padded
        from ..distributed import no_sync
        from ..training import autocast, loss_is_bad, optimizer_step

        losses, tokens = [], 0
        for n, indices in enumerate(group):
            batch = {k: v.to(self.device) for k, v in collate_padded([self.rows[j] for j in indices]).items()}
            with no_sync(self.model, sync=n == len(group) - 1):  # DDP: gradients are averaged once per step
                with autocast(self.device, self.amp_dtype):
                    loss = self.model(**batch).loss
                if loss_is_bad(self.agreed(loss), self.step + 1, self.cfg.nan_policy, self.last_ckpt):
                    return self.skip_step()
                scaled = loss / len(group)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            losses.append(loss.item())
            tokens += int(batch["attention_mask"].ne(0).sum())
        grad_norm = optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.cfg.max_grad_norm)
        loss_sum, tokens = self.dist.sum([sum(losses) / len(losses), tokens], self.device)
        self.position["tokens"] += int(tokens)
        self.step += 1
        tps = (self.position["tokens"] - self.tokens_at_start) / max(time.time() - self.start, 1e-9)
        lr, loss_value = self.scheduler.get_last_lr()[0], loss_sum / self.dist.world
        self.log.step(self.step, loss=loss_value, lr=lr, tok_s=round(tps))
        if self.step % self.cfg.logging_steps == 0 or self.step == self.total_steps:
            self.log.log(self.step, loss=round(loss_value, 5), lr=lr, grad_norm=round(grad_norm, 4),
                         epoch=round(epoch_progress, 4), tokens_per_s=round(tps, 1))
        if self.val_set and self.cfg.eval_steps and self.step % self.cfg.eval_steps == 0:
            self.log.log(self.step, eval_loss=round(self.eval_loss(), 5))
        if self.cfg.save_steps and self.step % self.cfg.save_steps == 0 and self.step < self.total_steps:
            self.save_checkpoint()

    def agreed(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NaN on every process when any process's loss is not finite: all skip or stop together."""
        import torch

        if self.dist.world == 1:
            return loss
        bad = self.dist.sum([float(not torch.isfinite(loss.detach()).all())], self.device)[0]
        return loss.new_tensor(float("nan")) if bad else loss

    def skip_step(self) -> None:
        """`nan_policy: skip`: drop this step's gradients but keep the schedule and data position moving."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.position["skipped_steps"] += 1
        self.log.write(f"step {self.step}: non-finite loss, step skipped ({self.position['skipped_steps']} so far)")
        self.log.step(self.step, skipped=self.position["skipped_steps"])

    def save_checkpoint(self) -> None:
        position = dict(self.position)
        if position["batch"] >= self.per_epoch * self.cfg.gradient_accumulation_steps:
            position["epoch"], position["batch"] = position["epoch"] + 1, 0
        from ..distributed import unwrap

        if self.dist.main:  # the processes hold the same weights and optimizer state
            self.last_ckpt = self.checkpoints.save(self.step, unwrap(self.model), self.optimizer, self.scheduler,
                                                   self.scaler, position)
        self.dist.barrier()

    @no_grad
    def eval_loss(self) -> float:
        """Token-weighted mean loss over the eval split (shared out among the processes)."""
        from ..collate import collate_padded
        from ..distributed import unwrap
        from ..training import autocast

        model = unwrap(self.model)
        was_training = model.training
        model.eval()
        mine = [self.val_set[i] for i in range(self.dist.rank, len(self.val_set), self.dist.world)]
        total, count, size = 0.0, 0, self.cfg.per_device_train_batch_size
        for k in range(0, len(mine), size):
            batch = {key: v.to(self.device) for key, v in collate_padded(mine[k : k + size]).items()}
            n = int(batch["labels"][:, 1:].ne(-100).sum())
            with autocast(self.device, self.amp_dtype):
                total += float(model(**batch).loss) * n
            count += n
        model.train(was_training)
        total, count = self.dist.sum([total, count], self.device)
        return total / max(count, 1)

    def final_metrics(self) -> dict:
        from ..training import read_log

        log = Path(self.cfg.output_dir) / "trainer_log.jsonl"
        records = [r for r in read_log(log) if "loss" in r] if self.dist.main else []  # rank 0 owns the log
        results = {"global_step": self.step, "train_runtime_s": round(time.time() - self.start, 1),
                   "train_loss_first": records[0]["loss"] if records else None,
                   "train_loss_last": records[-1]["loss"] if records else None,
                   "skipped_steps": self.position["skipped_steps"], "tokens": self.position["tokens"]}
        if self.val_set:
            results["eval_loss"] = round(self.eval_loss(), 5)
            results["eval_perplexity"] = round(math.exp(min(results["eval_loss"], 50)), 3)
        return results


@no_grad
def _answers(model, tokenizer, template: str, prompts: list[str], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to `prompts` in the training template's chat format."""
    import torch

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
