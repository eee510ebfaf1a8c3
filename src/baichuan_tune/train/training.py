"""Pieces every training command shares (sft, rm, dpo, ppo): options, optimizer and schedule, precision,
the deterministic batch order, checkpoints that resume exactly, the NaN guard, logs, plots and TensorBoard.

The loop itself is engine.py's, the same for every command; this module holds the pieces it and the
commands call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from pathlib import Path

import torch

from ..config import save_config
from ..errors import BaichuanTuneError, CheckpointError, WriteError
from ..io_utils import atomic_dir, atomic_write_json, atomic_write_text, clear_write_errors

logger = logging.getLogger(__name__)
RESUME_ADVICE = "free some space, then run the same command again with --resume true"
from ..options import ModelOptions, TrainOptions  # noqa: F401  (the training commands' options, defined there)


class TrainingError(BaichuanTuneError):
    """Training cannot go on (a NaN loss, a checkpoint that does not match the run, ...)."""


# ----------------------------------------------------------------------------- setup


def check_options(cfg) -> None:
    """Reject ModelOptions/TrainOptions values that would fail only after the model and data are loaded."""
    from .adapters import lora_targets
    from ..config import ConfigError

    positive = ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "lora_rank",
                "freeze_trainable_layers")
    for name in (n for n in positive if getattr(cfg, n, 1) < 1):
        raise ConfigError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("save_steps", "save_total_limit", "eval_steps", "warmup_steps", "weight_decay", "max_grad_norm",
                 "loss_chunk_size"):
        if getattr(cfg, name, 0) < 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(cfg, name)}")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"learning_rate must be positive, got {cfg.learning_rate}")
    if cfg.num_train_epochs <= 0 and cfg.max_steps <= 0:
        raise ConfigError(f"num_train_epochs must be positive (or set max_steps), got {cfg.num_train_epochs}")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ConfigError(f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if not 0 <= getattr(cfg, "lora_dropout", 0) < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("choose one of bf16 and fp16")
    try:
        lora_targets(getattr(cfg, "lora_target", ["all"]))
        device = resolve_device(cfg.device)
    except (BaichuanTuneError, RuntimeError) as exc:
        raise ConfigError(str(exc)) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {cfg.device!r}: CUDA is not available on this machine (use --device cpu)")
    if hasattr(cfg, "check_data_options"):
        cfg.check_data_options()
    if getattr(cfg, "finetuning_type", None) == "freeze":
        _check_freeze_layers(cfg)


def base_config_json(cfg) -> dict:
    """The base model's config.json as a dict, read without touching the weights; {} when it cannot be read
    (loading the model then reports the missing or broken folder with its own clear error)."""
    from ..models.checkpoint import resolve_model_path

    try:
        return json.loads((Path(resolve_model_path(cfg.model)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, BaichuanTuneError):
        return {}


def _check_freeze_layers(cfg) -> None:
    """freeze_trainable_layers against the model's depth, from its config.json."""
    from ..config import ConfigError

    layers = base_config_json(cfg).get("num_hidden_layers")
    if isinstance(layers, int) and cfg.freeze_trainable_layers > layers:
        raise ConfigError(f"freeze_trainable_layers is {cfg.freeze_trainable_layers} but the model has {layers} "
                          "decoder layers")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TrainingError(f"device must be cpu, cuda, cuda:N or auto, got {name!r}") from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


RUN_MARKERS = ("trainer_log.jsonl", "train_results.json")  # files every training command writes
# Everything the training commands write into output_dir: what --overwrite_output_dir deletes (and nothing else).
RUN_OUTPUTS = (
    "checkpoint-*", ".checkpoint-*", ".final", "runs", "config.yaml", "trainer_log.jsonl", "train_results.json",
    "training_loss.png", "training_accuracy.png", "training_margin.png", "ppo_reward.png", "ppo_kl.png",
    "adapter_config.json", "adapter_model.safetensors", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json", "config.json",
    "generation_config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "chat_template.jinja", "value_head.safetensors", "reward_model.json", "critic",
    "demo_pairs.json", "demo_prompts.jsonl", "reference_logps.pt", "template.json",
)


def _delete_run(out: Path) -> None:
    """Remove an earlier run's outputs from `out`, leaving any other file there alone."""
    for pattern in RUN_OUTPUTS:
        for path in out.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def prepare_output_dir(cfg) -> Path:
    """Create output_dir and save the config. A folder holding an earlier run (checkpoints, a log or results)
    is continued (--resume, from its last checkpoint), deleted and started afresh (--overwrite_output_dir)
    or refused, so finished work is never overwritten or mixed with a new run's by accident."""
    out = Path(cfg.output_dir)
    checkpoints = sorted(out.glob("checkpoint-*")) if out.is_dir() else []
    earlier = bool(checkpoints) or any((out / name).exists() for name in RUN_MARKERS)
    resumable = [p for p in checkpoints if (p / "trainer_state.json").is_file()]  # complete ones only
    if earlier and not (cfg.resume and resumable):
        if cfg.overwrite_output_dir:
            _delete_run(out)
        elif cfg.resume:
            raise TrainingError(f"{out} holds an earlier run but no checkpoint to resume from; pass "
                                "--overwrite_output_dir true to start again there, or another --output_dir")
        else:
            raise TrainingError(f"{out} already holds a run; pass --resume true to continue from its last checkpoint, "
                                "--overwrite_output_dir true to delete it and start again, or another --output_dir")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    return out


def start_run(opts) -> tuple:
    """(dist, device, out, amp_dtype): the opening of every training command. Joins the torchrun group when
    there is one, rank 0 prepares the output folder while the others wait for it, seeds, and picks the
    mixed-precision dtype. What --parallel fsdp cannot shard is refused first, before anything is written."""
    from ..options import check_parallel
    from . import distributed

    check_parallel(opts)
    dist, device = distributed.setup(resolve_device(opts.device))  # one process, or one of torchrun's
    out = prepare_output_dir(opts) if dist.main else Path(opts.output_dir)
    dist.barrier()
    seed_everything(opts.seed)
    return dist, device, out, precision_dtype(opts)


def precision_dtype(cfg) -> torch.dtype | None:
    if cfg.bf16 and cfg.fp16:
        raise TrainingError("choose one of bf16 and fp16")
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: torch.dtype | None):
    """fp16 needs loss scaling so small gradients do not flush to zero; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise TrainingError("nothing to train: no parameter requires a gradient")
    kwargs = dict(lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return cls(params, **kwargs)


def make_scheduler(optimizer, cfg, total_steps: int):
    from transformers import get_scheduler

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler_type, cfg.lr_scheduler_type)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def total_optimizer_steps(cfg, num_samples: int, world: int = 1) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps). With several processes a global batch holds
    per_device_train_batch_size x world samples and a short last one is dropped (every process needs a part)."""
    batch = cfg.per_device_train_batch_size * world
    if world > 1 and num_samples < batch:
        raise TrainingError(f"{num_samples} training samples (or packed rows) are fewer than one global batch of "
                            f"{batch} ({cfg.per_device_train_batch_size} per process x {world} processes)")
    batches = math.ceil(num_samples / batch) if world == 1 else num_samples // batch
    per_epoch = max(1, batches // cfg.gradient_accumulation_steps)
    total = math.ceil(per_epoch * cfg.num_train_epochs)
    return per_epoch, (min(total, cfg.max_steps) if cfg.max_steps > 0 else total)


def batch_order(num_samples: int, batch_size: int, seed: int, epoch: int, lengths=None) -> list[list[int]]:
    """The batches of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same order.

    With `lengths` (group_by_length), the permutation is cut into groups of 64 batches, each group sorted
    by length (longest first) before it is cut into batches, and the batches are shuffled again: batches
    hold samples of similar length, so little padding, and the order is still fixed by (seed, epoch)."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_samples, generator=gen).tolist()
    if lengths is not None:
        group = 64 * batch_size
        order = [i for g in range(0, num_samples, group)
                 for i in sorted(order[g : g + group], key=lambda j: (-lengths[j], j))]
    batches = [order[i : i + batch_size] for i in range(0, num_samples, batch_size)]
    if lengths is not None:
        batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
    return batches


def optimizer_step(model, optimizer, scheduler, scaler, max_grad_norm: float) -> float:
    """Unscale, clip, step, zero; returns the gradient norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def loss_is_bad(loss: torch.Tensor, step: int, policy: str, last_checkpoint: Path | None) -> bool:
    """True when the step must be skipped; raises under the `stop` policy. Checked before backward."""
    if torch.isfinite(loss).all():
        return False
    if policy == "skip":
        return True
    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
    raise TrainingError(
        f"loss is {loss.item()} at optimizer step {step}; {where}. fp16 overflow is the usual cause: "
        "try --bf16 true, a lower learning rate, or --nan_policy skip"
    )


# ----------------------------------------------------------------------------- shared command setup


def base_dtype(cfg, amp_dtype: torch.dtype | None) -> str:
    """Frozen base weights in the compute dtype; weights that train (full/freeze) stay fp32 master copies."""
    if cfg.finetuning_type in ("lora", "qlora") and amp_dtype is not None:
        return "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    return "fp32"


def load_trainable(cfg, device: torch.device, amp_dtype: torch.dtype | None):
    """(model prepared for cfg.finetuning_type, tokenizer) from cfg.model."""
    from ..models.checkpoint import load_model_and_tokenizer, resolve_model_path

    model, tokenizer = load_model_and_tokenizer(
        resolve_model_path(cfg.model), device=str(device), dtype=base_dtype(cfg, amp_dtype),
        quantize=cfg.quantization_bit if cfg.finetuning_type == "qlora" else None, sharded=cfg.parallel == "fsdp",
    )
    return prepare_from_config(model, cfg, amp_dtype), tokenizer


def prepare_from_config(model, cfg, amp_dtype: torch.dtype | None):
    """`adapters.prepare_for_training` with a training command's options."""
    from .adapters import prepare_for_training

    return prepare_for_training(
        model, cfg.finetuning_type, lora_target=cfg.lora_target, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, freeze_trainable_layers=cfg.freeze_trainable_layers,
        gradient_checkpointing=cfg.gradient_checkpointing, checkpoint_layers=cfg.checkpoint_layers,
        **fast_path_kwargs(cfg, amp_dtype),
    )


def fast_path_kwargs(cfg, amp_dtype: torch.dtype | None) -> dict:
    """The fast-path arguments of `adapters.prepare_for_training` from a command's ModelOptions."""
    keep = amp_dtype if cfg.qlora_half_frozen and amp_dtype in (torch.bfloat16, torch.float16) else None
    return dict(attention=cfg.attention, loss_chunk_size=cfg.loss_chunk_size, compile=cfg.compile,
                qlora_keep_dtype=keep, sdpa_cudnn=cfg.sdpa_cudnn,
                nf4_in_graph=cfg.nf4_in_graph)


def write_results(out: Path, results: dict) -> None:
    with clear_write_errors(Path(out) / "train_results.json", "the results"):
        atomic_write_json(Path(out) / "train_results.json", results)
    print(json.dumps(results, ensure_ascii=False))


# ----------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device's generator only: touching every visible GPU would open a context on each
        # (memory on every card, for every process of a multi-GPU run).
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # checkpoints of earlier versions: one state per device
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


class Checkpoints:
    """`output_dir/checkpoint-<step>/`: trainable weights, optimizer, scheduler, scaler, RNG and position.

    Each checkpoint is written into a temporary folder and renamed into place, so a kill mid-save leaves
    the previous checkpoint as the latest complete one.
    """

    def __init__(self, output_dir: Path, keep: int):
        self.output_dir = Path(output_dir)
        self.keep = keep
        self.resumed_from: Path | None = None  # the checkpoint `load` restored, for the log and the results

    def all(self) -> list[Path]:
        found = [p for p in self.output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    def save(self, step: int, model, optimizer, scheduler, scaler, position: dict, end_of_run: bool = False) -> Path:
        """Write checkpoint-<step>, then delete the oldest ones beyond `keep` (never the one just written; none
        for the `end_of_run` one of `end_state_kept`). A failed write (a full disk) is one WriteError naming the
        checkpoint; the earlier ones stay."""
        from safetensors.torch import save_file

        from .adapters import trainable_state_dict

        final = self.output_dir / f"checkpoint-{step}"
        latest = self.latest()
        advice = (f"the latest complete checkpoint is still {latest}; {RESUME_ADVICE}" if latest else
                  "no checkpoint was written before; free some space, then start again with --overwrite_output_dir true")
        with clear_write_errors(final, "the checkpoint", advice), atomic_dir(final) as tmp:
            save_file(trainable_state_dict(model), str(tmp / "trainable.safetensors"))
            extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}
            if scaler is not None:
                extra["scaler"] = scaler.state_dict()
            torch.save(extra, tmp / "training_state.pt")
            write_trainer_state(tmp, position, step, end_of_run)
        self.prune(end_of_run)
        return final

    def prune(self, end_of_run: bool = False) -> None:
        """Delete the oldest checkpoints beyond `keep` (none after the `end_of_run` one of `end_state_kept`)."""
        for old in self.all()[: -self.keep] if self.keep > 0 and not end_of_run else []:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, model, optimizer, scheduler, scaler) -> dict | None:
        """Restore the latest readable checkpoint and return its position; None (and a note) when there is none
        yet. A checkpoint whose files are truncated, corrupt or refused is named in a warning and the one before
        it is used; when none can be read, CheckpointError names every one."""
        found = self.all()
        if not found:
            print(f"resume: no checkpoint in {self.output_dir} yet, starting from step 0")
            return None
        if (found[-1] / "sharded").is_dir():
            saved = read_trainer_state(found[-1])
            raise TrainingError(f"{found[-1]}: a sharded checkpoint (--parallel fsdp) of "
                                f"{saved.get('sharded_processes')} processes; resume it with --parallel fsdp on as many")
        problems = []
        for path in reversed(found):
            try:
                saved = read_checkpoint(path)
            except CheckpointError as exc:
                problems.append(str(exc))
                continue
            if problems:
                logger.warning("%s; resuming from %s instead", "; ".join(problems), path.name)
            return self.restore(path, saved, model, optimizer, scheduler, scaler)
        raise CheckpointError(f"no checkpoint in {self.output_dir} can be resumed from: {'; '.join(problems)}. "
                              "Delete the broken checkpoint folders, or start again with --overwrite_output_dir true")

    def load(self, path: Path, model, optimizer, scheduler, scaler) -> dict:
        """Restore everything saved by `save`; returns the position dict (step, epoch, batch)."""
        return self.restore(path, read_checkpoint(path), model, optimizer, scheduler, scaler)

    def restore(self, path: Path, saved: tuple, model, optimizer, scheduler, scaler) -> dict:
        """Put what `read_checkpoint(path)` read into the model, optimizer, scheduler, scaler and RNGs."""
        weights, extra, position = saved
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        _check_same_trainables(path, set(weights), trainable & set(model.state_dict()))  # as trainable_state_dict
        model.load_state_dict(weights, strict=False)
        try:
            optimizer.load_state_dict(extra["optimizer"])
        except ValueError as exc:  # e.g. another optimizer or parameter grouping than the run that saved it
            raise TrainingError(f"{path}: the optimizer state does not fit this run ({exc})") from None
        scheduler.load_state_dict(extra["scheduler"])
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        _set_rng_state(extra["rng"])
        self.resumed_from = Path(path)
        return position


def write_trainer_state(folder: Path, position: dict, step: int, end_of_run: bool = False, **extra) -> None:
    """trainer_state.json, written last into a checkpoint folder: a folder without it is incomplete."""
    state = {**position, "step": step, **extra}  # after the position: a resumed position holds an older step
    state.pop("end_of_run", None)
    atomic_write_json(folder / "trainer_state.json", {**state, "end_of_run": True} if end_of_run else state)


def read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(trainable weights, training state, position) of checkpoint-N, every file read completely first, so a
    truncated or refused one (CheckpointError naming it) leaves the model and optimizer untouched."""
    from ..models.checkpoint import load_safetensors_file, load_torch_file

    weights = load_safetensors_file(path / "trainable.safetensors")
    extra = load_torch_file(path / "training_state.pt")
    missing = [k for k in ("optimizer", "scheduler", "rng") if not isinstance(extra, dict) or k not in extra]
    if missing:
        raise CheckpointError(f"{path / 'training_state.pt'}: not a training state (no {', '.join(missing)})")
    return weights, extra, read_trainer_state(path)


def read_trainer_state(path: Path) -> dict:
    """The position in checkpoint `path`'s trainer_state.json (CheckpointError naming it when unreadable)."""
    try:
        position = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path / 'trainer_state.json'}: unreadable ({exc})") from None
    if not isinstance(position, dict) or not isinstance(position.get("step"), int):
        raise CheckpointError(f"{path / 'trainer_state.json'}: has no step")
    return position


@contextlib.contextmanager
def end_state_kept(checkpoints: Checkpoints, step: int, model, optimizer, scheduler, scaler, position: dict,
                   saved: Path | None = None):
    """Keep the finished run's state as checkpoint-<step> while its result is written, then remove it.

    Nothing else holds the trained weights while the final save runs (with --save_steps 0, nothing at all):
    when that save fails (a full disk), the run is not lost; `--resume true` restores this checkpoint, trains
    no further step and writes the result again. Older checkpoints are not rotated out by it, and a regular
    checkpoint of that step (an earlier run's) is kept as it is. `saved`: that state already written (a sharded
    run writes it with every process, before rank 0 alone writes the result).
    """
    path = checkpoints.output_dir / f"checkpoint-{step}"
    try:
        regular = not json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("end_of_run")
    except (OSError, ValueError, AttributeError):
        regular = False
    if regular or saved is not None:
        kept = path
    else:
        kept = checkpoints.save(step, model, optimizer, scheduler, scaler, position, end_of_run=True)
    try:
        yield kept
    except WriteError as exc:
        raise WriteError(f"{exc}. The trained state is kept in {kept}: {RESUME_ADVICE} to write the result") from None
    if not regular:
        shutil.rmtree(kept, ignore_errors=True)


def log_resume(log, checkpoints: Checkpoints, step: int) -> dict:
    """Say which checkpoint a resumed run continues from, in the run's output; returns {"resumed_from": its path,
    or None for a fresh run} for train_results.json. (trainer_log.jsonl stays as a straight run writes it.)"""
    path = checkpoints.resumed_from
    if path is not None:
        log.write(f"resumed from {path} (step {step})")
    return {"resumed_from": None if path is None else str(path)}


def _check_same_trainables(path: Path, saved: set[str], trainable: set[str]) -> None:
    """A resumed run must train exactly the tensors the checkpoint holds (same method, targets, layers)."""
    if saved == trainable:
        return
    extra, missing = sorted(saved - trainable), sorted(trainable - saved)
    raise TrainingError(
        f"{path}: the checkpoint does not match this run's trainable weights "
        f"(in the checkpoint only: {extra[:3]}{' ...' if len(extra) > 3 else ''}; "
        f"in this run only: {missing[:3]}{' ...' if len(missing) > 3 else ''}); "
        "resume with the settings of the run that wrote it (see config.yaml)"
    )


# ----------------------------------------------------------------------------- logging


class SilentLog:
    """What the processes other than rank 0 of a multi-process run log: nothing (rank 0 logs for all)."""

    def step(self, step: int, **postfix) -> None:
        pass

    def log(self, step: int, **values) -> None:
        pass

    def write(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class RunLog:
    """Progress bar, `trainer_log.jsonl`, TensorBoard events and the loss plot of one run."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int = 0, tensorboard: bool = True,
                 desc: str = "train"):
        from tqdm.auto import tqdm

        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "trainer_log.jsonl"
        self._drop_records_after(start_step)
        self.total_steps = total_steps
        self.start = time.time()
        self.start_step = start_step
        self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.output_dir / "runs"))
            except ImportError:  # tensorboard is an optional extra
                self.bar.write("tensorboard is not installed: skipping TensorBoard logs (pip install tensorboard)")

    def _drop_records_after(self, step: int) -> None:
        """A resumed run logs again the steps after its checkpoint, and a fresh run starts a new log."""
        if not self.path.is_file():
            return
        kept = [r for r in read_log(self.path) if step > 0 and r.get("step", 0) <= step]
        with clear_write_errors(self.path, "the training log", RESUME_ADVICE):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def step(self, step: int, **postfix) -> None:
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                             refresh=False)
        self.bar.update(step - self.bar.n)

    def log(self, step: int, **values) -> None:
        if not any(key.startswith("eval_") for key in values):
            values.update(gpu_memory())
        record = {"step": step, **values, "elapsed": round(time.time() - self.start, 2)}
        with clear_write_errors(self.path, "the training log", f"the run stopped at step {step}; {RESUME_ADVICE} "
                                "(it continues from the latest checkpoint; with none yet, --overwrite_output_dir true)"):
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "epoch":
                    self.writer.add_scalar(key.replace("_", "/", 1) if key.startswith("eval_") else f"train/{key}",
                                           value, step)

    def write(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def gpu_memory() -> dict:
    """This process's GPU memory in GiB: held by tensors now and at most so far (none on a CPU run)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"memory_gib": round(torch.cuda.memory_allocated() / 2**30, 3),
            "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}


def read_log(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def logged_evals(output_dir: Path) -> list[dict]:
    """The evaluations already in a run's trainer_log.jsonl: a resumed run's `*_before` numbers come from here."""
    return [r for r in read_log(Path(output_dir) / "trainer_log.jsonl") if any(k.startswith("eval_") for k in r)]


def plot_curves(log_path: Path, png_path: Path, keys: tuple[str, ...] = ("loss", "eval_loss"), title: str = "") -> bool:
    """Plot the given keys of trainer_log.jsonl against step into a PNG; False when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    plotted = False
    for key in keys:
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="o" if key.startswith("eval") else None, markersize=3, label=key)
            plotted = True
    if plotted:
        ax.set_xlabel("step")
        ax.set_title(title or ", ".join(keys))
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with clear_write_errors(png_path, "the plot"):
            fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return plotted


def final_dtype(cfg) -> str:
    """cfg.save_dtype, with auto resolved to the base checkpoint's torch_dtype (fp32 when it names none).

    Full and freeze runs train fp32 master weights; the published files are bf16, and so are ours by default."""
    if cfg.save_dtype != "auto":
        return cfg.save_dtype
    config = base_config_json(cfg)
    named = config.get("torch_dtype") or config.get("dtype")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(named, "fp32")


def save_final(model, tokenizer, out: Path, finetuning_type: str, dtype: str | None = None,
               template: str | None = None, state_dict: dict | None = None) -> Path:
    """The run's result beside its logs: a PEFT adapter for lora/qlora, or full weights in the published layout
    (in `dtype`: None keeps the model's), with `template.json` recording the chat `template` it was trained in.

    Everything is written into a hidden folder first and then renamed file by file into `out`, so an
    interrupted save never leaves a half-written adapter or shard under its final name. `state_dict`: the
    model's whole state dict to save from instead of its own (a sharded run's, gathered on rank 0).
    """
    import os

    from ..data.templates import set_model_template, write_template_record

    out = Path(out)
    staging = out / ".final"
    set_model_template(model, template)  # a full save writes it into generation_config.json and template.json
    what = "the adapter" if finetuning_type in ("lora", "qlora") else "the model"
    with clear_write_errors(out, what):  # weights, tokenizer files and PEFT's model card (README.md)
        if finetuning_type in ("lora", "qlora"):
            with atomic_dir(staging) as tmp:
                model.save_pretrained(str(tmp), state_dict=state_dict)
                tokenizer.save_pretrained(str(tmp))
                if template is not None:
                    write_template_record(tmp, template)
        else:
            from ..models.checkpoint import save_pretrained_atomic

            save_pretrained_atomic(model, tokenizer, staging, dtype=dtype, state_dict=state_dict)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
        staging.rmdir()
    return out
