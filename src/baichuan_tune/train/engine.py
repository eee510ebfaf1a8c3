"""The one training loop of `sft`, `rm`, `dpo` and `ppo`.

A method (methods.py) supplies its data and its step, a function from (model, batch) to (loss, metrics);
`Engine` does the rest, the same for every method:

- batches in the deterministic order of `training.batch_order` (a permutation fixed by seed and epoch),
  each global batch shared out among the processes of a torchrun group (distributed.py), each holding the
  whole model (DDP) or, under `--parallel fsdp`, its shard of it (sharded.py: FSDP2, DCP checkpoints);
- gradient accumulation, autocast and fp16 loss scaling, clipping, the learning-rate schedule;
- the NaN policy, agreed by every process (all stop, or all skip the update);
- held-out evaluation every eval_steps (or at each epoch's end), before training when the method asks;
- logs (trainer_log.jsonl, TensorBoard, the progress bar) with tokens/s and the peak GPU memory;
- atomic checkpoints every save_steps and exact resume from the latest one.

One engine step is one optimizer update for sft/rm/dpo. A method's `plan` hook may turn a step's batch
into several updates over data it makes itself: ppo samples answers to its share of the prompts there and
returns the PPO epochs' mini-batches over that experience.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import training
from .distributed import Dist, no_sync


@dataclass
class Schedule:
    """How many steps, and how much data each takes: computed by the command for its method."""

    batch_size: int  # samples (rows, pairs, prompts) per process per micro-batch of the batch order
    batches_per_step: int  # batches of the order consumed by one step (gradient accumulation for sft/rm/dpo)
    per_epoch: int  # steps per pass over train_set
    total_steps: int
    updates_per_step: int = 1  # optimizer updates per step (the schedule's length is total x this)


def schedule_for(opts, num_samples: int, world: int) -> Schedule:
    """sft/rm/dpo: one update of gradient_accumulation_steps micro-batches per step."""
    per_epoch, total = training.total_optimizer_steps(opts, num_samples, world)
    return Schedule(opts.per_device_train_batch_size, opts.gradient_accumulation_steps, per_epoch, total)


class Engine:
    """Trains `model` with `method` under the TrainOptions `opts`, writing into `out`."""

    def __init__(self, model, method, opts, out: Path, schedule: Schedule, dist: Dist, device: torch.device,
                 amp_dtype: torch.dtype | None):
        self.model, self.method, self.opts, self.out = model, method, opts, Path(out)
        self.schedule, self.dist, self.device, self.amp_dtype = schedule, dist, device, amp_dtype
        # FSDP2 replaces the parameters by their shards: the optimizer must be built over the shards.
        self.sharded = getattr(opts, "parallel", "ddp") == "fsdp" and dist.world > 1
        if self.sharded:
            from .sharded import ShardedCheckpoints, shard_model

            shard_model(model, amp_dtype)
            self.checkpoints = ShardedCheckpoints(self.out, opts.save_total_limit, dist)
        else:
            self.checkpoints = training.Checkpoints(self.out, opts.save_total_limit)
        self.optimizer = training.make_optimizer(model, opts)
        self.scheduler = training.make_scheduler(self.optimizer, opts, schedule.total_steps * schedule.updates_per_step)
        self.scaler = training.make_grad_scaler(device, amp_dtype)
        self.full_state, self.end_checkpoint = None, None  # a sharded run's gathered weights and final state
        self.position = {"epoch": 0, "batch": 0, "skipped_steps": 0, "tokens": 0, "processes": dist.world}
        self.step, self.evals, self.log, self.trained = 0, [], training.SilentLog(), model
        self.last_ckpt, self.last_eval_step = None, -1
        self.fused_updates = 0  # updates of this run that fused their accumulation group (fuse_accumulation)
        self.resumed: dict = {"resumed_from": None}

    # ------------------------------------------------------------------ run

    def run(self, summary: str = "") -> dict:
        """Train to the last step (resuming under opts.resume); returns the run's figures for its results."""
        from . import distributed

        self._resume()
        self.trained = self.model if self.sharded else distributed.wrap(self.model, self.dist, self.device)
        if self.dist.main:
            self.log = training.RunLog(self.out, self.schedule.total_steps, start_step=self.step,
                                       tensorboard=self.opts.report_to == "tensorboard", desc=self.method.name)
        self.resumed = training.log_resume(self.log, self.checkpoints, self.step)  # {"resumed_from": path or None}
        if summary:
            self.log.write(summary + (f"; {self.dist.world} processes, global batch "
                                      f"{self.schedule.batch_size * self.dist.world}" if self.dist.world > 1 else "")
                           + (", weights sharded (FSDP2)" if self.sharded else ""))
        self.start, self.tokens_at_start = time.time(), self.position["tokens"]
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        has_val = len(self.method.val_set) > 0
        if has_val and self.method.eval_before and self.step == 0:
            self.evaluate()
        while self.step < self.schedule.total_steps:
            self._epoch()
        if has_val and self.last_eval_step != self.step:
            self.evaluate()  # the held-out numbers after the last step
        if self.sharded:
            self._gather_end_state()
        self.log.close()
        self.trained = None  # no DDP wrapper may outlive the process group
        return self.results()

    def results(self) -> dict:
        elapsed = max(time.time() - self.start, 1e-9)
        results = {"global_step": self.step, "train_runtime_s": round(elapsed, 1), "fused_updates": self.fused_updates,
                   "skipped_steps": self.position["skipped_steps"], "tokens": self.position["tokens"],
                   "tokens_per_s": round((self.position["tokens"] - self.tokens_at_start) / elapsed, 1)}
        return {**results, **self._peak_memory(), **self.resumed}

    def _peak_memory(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)}

    def _resume(self) -> None:
        saved = self.opts.resume and self.checkpoints.resume(self.model, self.optimizer, self.scheduler, self.scaler)
        if not saved:
            return
        if saved.get("processes", 1) != self.dist.world:  # the saved batch position indexes that many shards
            raise training.TrainingError(
                f"the checkpoint was written by a run of {saved.get('processes', 1)} process(es); resume it with as "
                f"many (this run has {self.dist.world})")
        self.position.update({k: v for k, v in saved.items() if k != "step"})
        self.step, self.last_ckpt = saved.get("step", 0), self.checkpoints.latest()
        self.method.load_state_dict(saved)
        if self.dist.main:  # rank 0 owns the log: the evaluations before the interruption come from it
            self.evals = training.logged_evals(self.out)
        last = self.evals[-1]["step"] if self.evals else -1
        self.last_eval_step = int(self.dist.sum([last if self.dist.main else 0], self.device)[0])

    # ------------------------------------------------------------------ epochs and steps

    def _epoch(self) -> None:
        """Steps from the saved position to the end of the epoch (or of the run)."""
        s, position = self.schedule, self.position
        epoch, world = position["epoch"], self.dist.world
        order = training.batch_order(len(self.method.train_set), s.batch_size * world, self.opts.seed, epoch,
                                     self._lengths())
        if world > 1:  # every process needs its equal part of each batch
            order = [self.dist.shard(b) for b in order if len(b) == s.batch_size * world]
        usable = s.per_epoch * s.batches_per_step  # a trailing partial accumulation group is dropped
        while position["batch"] < usable and self.step < s.total_steps:
            i = position["batch"]
            position["batch"] = i + s.batches_per_step
            self._step(order[i : i + s.batches_per_step], epoch + (i + s.batches_per_step) / usable)
        if position["batch"] >= usable:
            position["epoch"], position["batch"] = epoch + 1, 0
            if len(self.method.val_set) and not self.opts.eval_steps and self.method.eval_each_epoch:
                self.evaluate()

    def _lengths(self) -> list[int] | None:
        """Each training sample's length for group_by_length (packed rows and token-id records alike)."""
        data = self.method.train_set
        if not getattr(self.opts, "group_by_length", False):
            return None
        if hasattr(data, "lengths"):
            return data.lengths()
        return [len(data[i]["input_ids"]) for i in range(len(data))]

    def _step(self, batches: list[list[int]], epoch_progress: float) -> None:
        """One step: the method's updates, then log, evaluate and checkpoint."""
        dataset, updates = self.method.plan(self, batches)
        sums, weight, norms, tokens, skipped = {}, 0, 0.0, 0, 0
        for group in updates:
            done = self._update(dataset, group)
            if done is None:
                skipped += 1
                continue
            metrics, norm, group_tokens = done
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value * len(group)
            norms, weight, tokens = norms + norm * len(group), weight + len(group), tokens + group_tokens
        self.step += 1
        if not weight:  # every update of the step was skipped (nan_policy skip)
            self.position["skipped_steps"] += 1
            self.log.write(f"step {self.step}: non-finite loss, step skipped ({self.position['skipped_steps']} so far)")
            self.log.step(self.step, skipped=self.position["skipped_steps"])
        else:
            metrics = {k: v / weight for k, v in sums.items()}
            if len(updates) > 1:
                metrics["skipped_updates"] = float(skipped)
            self._log_step(metrics, norms / weight, tokens, epoch_progress)
        if len(self.method.val_set) and self.opts.eval_steps and self.step % self.opts.eval_steps == 0:
            self.evaluate()
        if self.opts.save_steps and self.step % self.opts.save_steps == 0 and self.step < self.schedule.total_steps:
            self.save_checkpoint()

    def _update(self, dataset, group: list[list[int]]):
        """Forward/backward over one accumulation group and an optimizer update: (metrics, grad norm, tokens),
        or None when a non-finite loss made it skip (nan_policy skip; `stop` raises)."""
        self.model.train()
        fused = self._fused_batch(dataset, group)
        if fused is not None:
            self.fused_updates += 1
            return self._fused_update(fused)
        sums, tokens = {}, 0
        for n, indices in enumerate(group):
            batch = self.method.collate(dataset, indices, self.device)
            with no_sync(self.trained, sync=n == len(group) - 1):  # DDP: gradients are averaged once per update
                with training.autocast(self.device, self.amp_dtype):
                    loss, metrics = self.method.step(self.trained, batch)
                if training.loss_is_bad(self._agreed(loss), self.step + 1, self.opts.nan_policy, self.last_ckpt):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()  # the schedule moves on as if the update had happened
                    return None
                scaled = loss / len(group)
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / len(group)
            tokens += self.method.tokens(batch)
        norm = training.optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.opts.max_grad_norm)
        return sums, norm, tokens

    def _fused_batch(self, dataset, group: list[list[int]]) -> dict | None:
        """The method's fused batch of the group when every process has one (DDP: the same all-reduces)."""
        if not getattr(self.opts, "fuse_accumulation", False):
            return None
        fused = self.method.fused_batch(dataset, group, self.device, self.opts.fuse_max_tokens)
        if self.dist.world > 1:
            agreed = self.dist.sum([float(fused is not None)], self.device)[0]
            return fused if agreed == self.dist.world else None
        return fused

    def _fused_update(self, batch: dict):
        """_update's forward/backward as one pass: the batch's loss weights already divide by the group's size."""
        with training.autocast(self.device, self.amp_dtype):
            loss, metrics = self.method.step(self.trained, batch)
        if training.loss_is_bad(self._agreed(loss), self.step + 1, self.opts.nan_policy, self.last_ckpt):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return None
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        norm = training.optimizer_step(self.model, self.optimizer, self.scheduler, self.scaler, self.opts.max_grad_norm)
        return {"loss": float(loss.detach()), **metrics}, norm, self.method.tokens(batch)

    def _agreed(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss, or NaN on every process when any process's loss is not finite: all skip or stop together."""
        if self.dist.world == 1:
            return loss
        bad = self.dist.sum([float(not torch.isfinite(loss.detach()).all())], self.device)[0]
        return loss.new_tensor(float("nan")) if bad else loss

    def _log_step(self, metrics: dict, grad_norm: float, tokens: int, epoch_progress: float) -> None:
        """Average the step's figures over the processes, then log them (rank 0)."""
        keys = sorted(metrics)
        totals = self.dist.sum([metrics[k] for k in keys] + [grad_norm, tokens], self.device)
        metrics = {k: v / self.dist.world for k, v in zip(keys, totals)}
        grad_norm, tokens = totals[-2] / self.dist.world, int(totals[-1])
        self.position["tokens"] += tokens
        tps = (self.position["tokens"] - self.tokens_at_start) / max(time.time() - self.start, 1e-9)
        lr = self.scheduler.get_last_lr()[0]
        extra = self.method.after_step(self)
        shown = {k: v for k, v in {**metrics, **extra}.items() if k in self.method.bar_keys}
        self.log.step(self.step, **shown, lr=lr, tok_s=round(tps))
        if self.step % self.opts.logging_steps == 0 or self.step == self.schedule.total_steps:
            self.log.log(self.step, **{k: round(v, 5) for k, v in metrics.items()}, **extra, lr=lr,
                         grad_norm=round(grad_norm, 4), epoch=round(epoch_progress, 4), tokens_per_s=round(tps, 1),
                         tokens=self.position["tokens"])  # RunLog adds memory_gib / max_memory_gib on a GPU

    # ------------------------------------------------------------------ evaluation and checkpoints

    def evaluate(self) -> dict:
        """Held-out metrics (`eval_*`), logged and kept for the results."""
        metrics = self.method.evaluate(self)
        if metrics is None:
            metrics = self._weighted_eval()
        self.evals.append({"step": self.step, **metrics})
        self.last_eval_step = self.step
        self.log.log(self.step, **metrics)
        return metrics

    @torch.no_grad()
    def _weighted_eval(self) -> dict:
        """Weighted means of the eval loss and metrics over the eval split, shared out among the processes."""
        model, val = self.model, self.method.val_set
        was_training = model.training
        model.eval()
        mine = list(range(self.dist.rank, len(val), self.dist.world))
        # A process with no held-out row of its own (fewer rows than processes) still computes one, with weight 0,
        # so that every process reduces the same metric names.
        counts = 1 if mine else 0
        mine = mine or [0]
        totals: dict[str, float] = {}
        count, size = 0, self.schedule.batch_size
        for k in range(0, len(mine), size):
            batch = self.method.collate(val, mine[k : k + size], self.device)
            weight = self.method.weight(batch) * counts
            with training.autocast(self.device, self.amp_dtype):
                loss, metrics = self.method.eval_step(model, batch)
            for key, value in {"loss": float(loss.detach()), **metrics}.items():
                totals[key] = totals.get(key, 0.0) + value * weight
            count += weight
        model.train(was_training)
        keys = sorted(totals)
        summed = self.dist.sum([totals.get(k, 0.0) for k in keys] + [count], self.device)
        return {f"eval_{k}": round(v / max(summed[-1], 1), 5) for k, v in zip(keys, summed)}

    def _saved_position(self) -> dict:
        position = dict(self.position)
        if position["batch"] >= self.schedule.per_epoch * self.schedule.batches_per_step:
            position["epoch"], position["batch"] = position["epoch"] + 1, 0
        position.update(self.method.state_dict())
        return position

    def keep_state(self):
        """A context for writing the run's result (rank 0): the finished state is kept as a checkpoint until the
        block succeeds, so a failed final save (a full disk) loses nothing and --resume true finishes it."""
        return training.end_state_kept(self.checkpoints, self.step, self.model, self.optimizer, self.scheduler,
                                       self.scaler, self._saved_position(), saved=self.end_checkpoint)

    def _gather_end_state(self) -> None:
        """Sharded runs, every process: the finished state as a checkpoint (kept until the result is written, as
        `keep_state` does for an unsharded run) and the whole trained weights on rank 0 for the result."""
        from .sharded import full_state_dict

        path = self.out / f"checkpoint-{self.step}"
        if (path / "trainer_state.json").is_file():  # a regular checkpoint of the last step, or a resumed end state
            self.end_checkpoint = path
        else:
            self.end_checkpoint = self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler,
                                                        self.scaler, self._saved_position(), end_of_run=True)
        self.full_state = full_state_dict(self.model, getattr(self.opts, "finetuning_type", "") in ("lora", "qlora"))

    def save_checkpoint(self) -> None:
        position = self._saved_position()
        if self.sharded:  # every process writes its shards
            self.last_ckpt = self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                                                   position)
            return
        if self.dist.main:  # the processes hold the same weights and optimizer state
            self.last_ckpt = self.checkpoints.save(self.step, self.model, self.optimizer, self.scheduler, self.scaler,
                                                   position)
        self.dist.barrier()
