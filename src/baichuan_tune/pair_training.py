"""The training loop shared by `rm` and `dpo`: both learn from batches of (prompt, chosen, rejected) pairs.

A command supplies `loss_fn(batch) -> (loss, metrics)`, where `batch` is `collate_pairs` output (the B
chosen rows, then the B rejected rows) plus `index`, the pairs' positions in their dataset, and `metrics`
holds floats (accuracy, margin, ...). This module runs epochs in the deterministic batch order of
`training.batch_order`, gradient accumulation, the NaN guard, logging, held-out evaluation and
checkpoints that resume exactly, all through `training.py`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from collections.abc import Callable

import torch

from .training import autocast, batch_order, logged_evals, loss_is_bad, optimizer_step

LossFn = Callable[[dict], tuple[torch.Tensor, dict]]


def pair_batch(dataset, indices: list[int], device: torch.device) -> dict:
    """collate_pairs of dataset[indices] on `device`, plus `index` ([B] positions in the dataset)."""
    from .collate import collate_pairs

    batch = {k: v.to(device) for k, v in collate_pairs([dataset[i] for i in indices]).items()}
    batch["index"] = torch.tensor(indices, device=device)
    return batch


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[2B, ...] rows of a pair batch -> ([B, ...] chosen, [B, ...] rejected)."""
    half = values.size(0) // 2
    return values[:half], values[half:]


@torch.no_grad()
def evaluate_pairs(model, dataset, loss_fn: LossFn, batch_size: int, device, amp_dtype) -> dict:
    """Pair-weighted means of the loss and every metric over `dataset`, prefixed `eval_`."""
    was_training = model.training
    model.eval()
    totals: dict[str, float] = {}
    for start in range(0, len(dataset), batch_size):
        indices = list(range(start, min(start + batch_size, len(dataset))))
        with autocast(device, amp_dtype):
            loss, metrics = loss_fn(pair_batch(dataset, indices, device))
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + value * len(indices)
    model.train(was_training)
    return {f"eval_{k}": round(v / max(len(dataset), 1), 5) for k, v in totals.items()}


@dataclass
class PairRun:
    """What the loop needs besides the model: optimiser pieces, data, logging, checkpoints and position."""

    cfg: object
    optimizer: object
    scheduler: object
    scaler: object
    checkpoints: object
    log: object
    train_set: object
    val_set: object
    device: torch.device
    amp_dtype: torch.dtype | None
    total_steps: int
    per_epoch: int
    position: dict = field(default_factory=lambda: {"epoch": 0, "batch": 0, "skipped_steps": 0, "pairs": 0})
    evals: list = field(default_factory=list)
    resumed: dict = field(default_factory=dict)  # {"resumed_from": checkpoint path or None}
    eval_loss_fn: LossFn | None = None  # for the eval split, when it differs from the training loss_fn


def start_pair_run(cfg, model, out, train_set, val_set, device, amp_dtype, desc: str,
                   eval_loss_fn: LossFn | None = None) -> PairRun:
    """Optimiser, schedule, checkpoints (the latest restored under --resume) and run log of an rm/dpo run."""
    from .training import (Checkpoints, RunLog, log_resume, make_grad_scaler, make_optimizer, make_scheduler,
                           total_optimizer_steps)

    per_epoch, total_steps = total_optimizer_steps(cfg, len(train_set))
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    checkpoints = Checkpoints(out, cfg.save_total_limit)
    run = PairRun(cfg, optimizer, scheduler, make_grad_scaler(device, amp_dtype), checkpoints, None, train_set,
                  val_set, device, amp_dtype, total_steps, per_epoch, eval_loss_fn=eval_loss_fn)
    if cfg.resume and checkpoints.latest() is not None:
        run.position = checkpoints.load(checkpoints.latest(), model, optimizer, scheduler, run.scaler)
    run.log = RunLog(out, total_steps, start_step=run.position.get("step", 0),
                     tensorboard=cfg.report_to == "tensorboard", desc=desc)
    run.resumed = log_resume(run.log, checkpoints, run.position.get("step", 0))
    if run.position.get("step", 0):
        run.evals = logged_evals(out)  # the step-0 evaluation ran before the interruption
    return run


def eval_results(evals: list) -> dict:
    """Held-out metrics for train_results.json: the first evaluation as `*_before`, the last as they are."""
    if not evals:
        return {}
    results = {f"{k}_before": v for k, v in evals[0].items() if k.startswith("eval_")}
    results.update({k: v for k, v in evals[-1].items() if k.startswith("eval_")})
    return results


def train_pairs(model, loss_fn: LossFn, run: PairRun) -> int:
    """Train until `run.total_steps`; returns the final optimizer step."""
    step = run.position.get("step", 0)
    if run.val_set and step == 0:
        _evaluate(model, loss_fn, run, step)  # the held-out numbers before any training
    last_ckpt = run.checkpoints.latest()
    while step < run.total_steps:
        step, last_ckpt = _epoch(model, loss_fn, run, step, last_ckpt)
    if run.val_set and (not run.evals or run.evals[-1]["step"] != step):
        _evaluate(model, loss_fn, run, step)  # the held-out numbers after the last step
    return step


def _evaluate(model, loss_fn, run: PairRun, step: int) -> None:
    metrics = evaluate_pairs(model, run.val_set, run.eval_loss_fn or loss_fn, run.cfg.per_device_train_batch_size,
                             run.device, run.amp_dtype)
    run.evals.append({"step": step, **metrics})
    run.log.log(step, **metrics)


def _accumulate(model, loss_fn, run: PairRun, group: list[list[int]], step: int, last_ckpt):
    """Forward/backward over one accumulation group; returns averaged metrics, or None when skipped."""
    sums: dict[str, float] = {}
    for indices in group:
        batch = pair_batch(run.train_set, indices, run.device)
        with autocast(run.device, run.amp_dtype):
            loss, metrics = loss_fn(batch)
        if loss_is_bad(loss, step + 1, run.cfg.nan_policy, last_ckpt):
            return None
        scaled = loss / len(group)
        (run.scaler.scale(scaled) if run.scaler else scaled).backward()
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value / len(group)
        run.position["pairs"] += len(indices)
    return sums


def _epoch(model, loss_fn, run: PairRun, step: int, last_ckpt):
    """One pass over the training pairs from the saved position; returns (step, last checkpoint)."""
    cfg, position = run.cfg, run.position
    model.train()
    epoch = position["epoch"]
    batches = batch_order(len(run.train_set), cfg.per_device_train_batch_size, cfg.seed, epoch)
    accum = cfg.gradient_accumulation_steps
    usable = run.per_epoch * accum  # a trailing partial accumulation group is dropped
    i, start = position["batch"], time.time()
    while i < usable and step < run.total_steps:
        metrics = _accumulate(model, loss_fn, run, batches[i : i + accum], step, last_ckpt)
        i += accum
        position["batch"] = i
        step += 1
        if metrics is None:
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            position["skipped_steps"] += 1
            run.log.write(f"step {step}: non-finite loss, step skipped ({position['skipped_steps']} so far)")
            continue
        grad_norm = optimizer_step(model, run.optimizer, run.scheduler, run.scaler, cfg.max_grad_norm)
        run.log.step(step, loss=metrics["loss"], acc=metrics.get("accuracy", 0.0))
        if step % cfg.logging_steps == 0 or step == run.total_steps:
            run.log.log(step, **{k: round(v, 5) for k, v in metrics.items()}, lr=run.scheduler.get_last_lr()[0],
                        grad_norm=round(grad_norm, 4), epoch=round(epoch + i / max(usable, 1), 4),
                        pairs_per_s=round(accum * cfg.per_device_train_batch_size / max(time.time() - start, 1e-9), 2))
        start = time.time()
        if run.val_set and cfg.eval_steps and step % cfg.eval_steps == 0:
            _evaluate(model, loss_fn, run, step)
        if step % cfg.save_steps == 0 and step < run.total_steps:
            done = i >= usable
            saved = {**position, "epoch": epoch + 1 if done else epoch, "batch": 0 if done else i}
            last_ckpt = run.checkpoints.save(step, model, run.optimizer, run.scheduler, run.scaler, saved)
    if i >= usable:
        position["epoch"], position["batch"] = epoch + 1, 0
        if run.val_set and not cfg.eval_steps:
            _evaluate(model, loss_fn, run, step)
    return step, last_ckpt
