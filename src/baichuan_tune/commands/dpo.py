"""Direct preference optimisation: DPO (sigmoid), IPO, and the reference-free ORPO and SimPO losses.

    baichuan-tune dpo                                  # built-in demo: tiny default model, demo pairs, CPU
    baichuan-tune dpo CONFIG.yaml --model DIR --dataset pairs.json --loss_type sigmoid --beta 0.1
    torchrun --nproc_per_node 4 -m baichuan_tune.cli dpo CONFIG.yaml   # data-parallel on 4 GPUs of one node
    baichuan-tune dpo --model DIR --dataset pairs.json --loss_type simpo --beta 2.0 --simpo_gamma 0.5

The policy trains with LoRA, QLoRA, freeze or full. DPO and IPO compare it with a frozen reference: with
LoRA/QLoRA the reference is the same base with the adapter switched off (no second copy of the model);
with freeze/full the reference log-probabilities are computed once before training and kept in
output_dir/reference_logps.pt. ORPO and SimPO need no reference. Data and outputs as `baichuan-tune rm`
(preference records; adapter or full weights, checkpoints, trainer_log.jsonl, plots, TensorBoard,
train_results.json). Logged on the eval split, before and during training: `accuracy` (share of pairs
whose implicit reward of the chosen answer beats the rejected one), `margin` (mean reward difference),
and `logp_accuracy` (share of pairs where the policy itself gives the chosen answer the higher
per-token log-probability, which needs no reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..config import ConfigError, opt, parse_config
from ..data.loading import DataOptions
from ..lazy import no_grad
from ..options import ModelOptions, TrainOptions

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs, not for --help
    import torch

# The built-in demo: DPO with LoRA on the tiny default model, scored on held-out pairs before and after.
DEMO_OVERRIDES = [
    "--model", "default", "--finetuning_type", "lora", "--lora_rank", "16", "--lora_alpha", "32",
    "--output_dir", "outputs/dpo-demo", "--num_train_epochs", "2", "--learning_rate", "2e-3", "--beta", "0.1",
    "--per_device_train_batch_size", "8", "--logging_steps", "5", "--save_steps", "100", "--val_size", "80",
    "--eval_steps", "20", "--cutoff_len", "64", "--device", "cpu",
    "--overwrite_output_dir", "true",
]
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPOConfig(ModelOptions, DataOptions, TrainOptions):
    output_dir: str = opt("outputs/dpo", "folder for the policy, checkpoints, logs and plots")
    learning_rate: float = opt(5e-5, "peak learning rate")
    num_train_epochs: float = opt(1.0, "passes over the training pairs")
    loss_type: Literal["sigmoid", "ipo", "orpo", "simpo"] = opt("sigmoid", "sigmoid (DPO), ipo, orpo or simpo")
    beta: float | None = opt(None, "DPO/IPO: KL strength (IPO's tau), default 0.1; SimPO: reward scale, default 2.0 "
                                   "(its paper uses 2.0-2.5)")
    label_smoothing: float = opt(0.0, "sigmoid loss: assumed share of flipped labels (cDPO), in [0, 0.5)")
    simpo_gamma: float = opt(0.5, "SimPO: target reward margin gamma")
    orpo_lambda: float = opt(0.1, "ORPO: weight lambda of the odds-ratio term next to the NLL")

    def validate(self) -> None:
        from ..options import check_parallel

        check_parallel(self)
        if self.beta is None:  # SimPO's beta scales an average log-prob, on another scale than DPO's KL weight
            self.beta = 2.0 if self.loss_type == "simpo" else 0.1
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError(f"label_smoothing applies to loss_type sigmoid only, not {self.loss_type}")


def main(argv: list[str]) -> int:
    from ..options import with_demo

    argv, demo = with_demo(argv, DEMO_OVERRIDES, "DPO demo (tiny default model, CPU)", DPOConfig)
    cfg = parse_config(DPOConfig, argv, prog="baichuan-tune dpo")
    from ..extras import check_extras

    check_extras("dpo", cfg)
    from ..train import distributed
    from ..train.adapters import count_parameters
    from ..train.alignment import write_demo_pairs
    from ..data.loading import load_pair_data
    from ..train.engine import Engine, schedule_for
    from ..train.methods import PairMethod, eval_results
    from ..train.training import (load_trainable, plot_curves, precision_dtype, prepare_output_dir, resolve_device,
                                  final_dtype, save_final, seed_everything, write_results)

    # ---- setup
    dist, device = distributed.setup(resolve_device(cfg.device))  # one process, or one of torchrun's
    out = prepare_output_dir(cfg) if dist.main else Path(cfg.output_dir)
    files = cfg.dataset or [write_demo_pairs(out) if dist.main else str(out / "demo_pairs.json")]
    dist.barrier()
    seed_everything(cfg.seed)
    amp_dtype = precision_dtype(cfg)
    model, tokenizer = load_trainable(cfg, device, amp_dtype)
    train_set, val_set, report = distributed.main_first(  # rank 0 tokenises first and fills the cache
        dist, lambda: load_pair_data(files, tokenizer, **cfg.load_kwargs(cfg.seed)))
    reference = Reference(cfg, model, out, {"train": train_set, "eval": val_set}, device, amp_dtype, dist)
    trainable, total = count_parameters(model)
    method = PairMethod(cfg.loss_type, train_set, val_set,
                        lambda policy, batch: preference_loss(cfg, policy, batch, reference, "train"),
                        lambda policy, batch: preference_loss(cfg, policy, batch, reference, "eval"))
    schedule = schedule_for(cfg, len(train_set), dist.world)
    engine = Engine(model, method, cfg, out, schedule, dist, device, amp_dtype)

    # ---- train
    results = engine.run(f"{report}; {cfg.loss_type} loss, reference: {reference.describe()}; "
                         f"{schedule.total_steps} optimizer steps; trainable {trainable / 1e6:.2f}M of "
                         f"{total / 1e6:.1f}M parameters ({cfg.finetuning_type})")
    distributed.shutdown(dist)

    # ---- save
    if not dist.main:
        return 0
    with engine.keep_state():  # the trained state stays on disk until the result is written
        save_final(model, tokenizer, out, cfg.finetuning_type, final_dtype(cfg), cfg.template,
                   state_dict=engine.full_state)
        if cfg.plot_loss:
            plot_curves(out / "trainer_log.jsonl", out / "training_loss.png", ("loss", "eval_loss"),
                        f"{cfg.loss_type} loss")
            plot_curves(out / "trainer_log.jsonl", out / "training_accuracy.png",
                        ("accuracy", "eval_accuracy", "eval_logp_accuracy"), "preference accuracy")
            plot_curves(out / "trainer_log.jsonl", out / "training_margin.png", ("margin", "eval_margin"), "reward margin")
        write_results(out, {**results, "loss_type": cfg.loss_type, **report.counts, **eval_results(engine.evals)})
    print(f"Done: policy in {out}")
    return 0


def preference_loss(cfg, model, batch: dict, reference, split: str) -> tuple[torch.Tensor, dict]:
    """The configured preference loss on one pair batch, with rewards, accuracy and margin for the log."""
    from ..train.losses import dpo_loss, ipo_loss, orpo_loss, sequence_logps, simpo_loss
    from ..train.methods import split_pairs

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [2B, T, V]
    total = sequence_logps(logits, batch["labels"])  # [2B]
    average = sequence_logps(logits, batch["labels"], average=True)  # [2B]
    chosen_avg, rejected_avg = split_pairs(average)
    if cfg.loss_type == "orpo":
        out = orpo_loss(chosen_avg, rejected_avg, lam=cfg.orpo_lambda)
    elif cfg.loss_type == "simpo":
        out = simpo_loss(chosen_avg, rejected_avg, beta=cfg.beta, gamma=cfg.simpo_gamma)
    else:
        # IPO on length-averaged log-probabilities, as its authors recommend; DPO on sums (eq. 7).
        policy = average if cfg.loss_type == "ipo" else total
        ref_chosen, ref_rejected = reference.logps(batch, split, average=cfg.loss_type == "ipo")
        if cfg.loss_type == "ipo":
            out = ipo_loss(*split_pairs(policy), ref_chosen, ref_rejected, beta=cfg.beta)
        else:
            out = dpo_loss(*split_pairs(policy), ref_chosen, ref_rejected, beta=cfg.beta,
                           label_smoothing=cfg.label_smoothing)
    chosen_logp, rejected_logp = split_pairs(total.detach())
    metrics = {
        "accuracy": float((out.chosen_rewards > out.rejected_rewards).float().mean()),
        "margin": float((out.chosen_rewards - out.rejected_rewards).mean()),
        "chosen_reward": float(out.chosen_rewards.mean()), "rejected_reward": float(out.rejected_rewards.mean()),
        "logp_accuracy": float((chosen_avg > rejected_avg).float().mean()),
        "chosen_logp": float(chosen_logp.mean()), "rejected_logp": float(rejected_logp.mean()),
    }
    return out.loss, metrics


class Reference:
    """Log-probabilities of the frozen reference policy for a pair batch.

    LoRA/QLoRA: the policy's own base with the adapter disabled, computed per batch. Freeze/full: the
    weights change in place, so the initial model's log-probabilities of every pair are computed once,
    before training, and saved with the run (a resumed run reads them back).
    """

    def __init__(self, cfg, model, out: Path, datasets: dict, device, amp_dtype, dist=None, needed: bool | None = None):
        self.needed = cfg.loss_type in ("sigmoid", "ipo") if needed is None else needed  # kto passes True
        self.adapter_off = cfg.finetuning_type in ("lora", "qlora")
        self.model, self.table = model, None
        if self.needed and not self.adapter_off:
            # Under torchrun every process starts from the same weights and needs the rows of its own pairs,
            # which change every epoch: rank 0 computes the whole table once, the others read it back.
            from ..train.distributed import Dist, main_first

            self.table = main_first(dist or Dist(), lambda: self._precomputed(
                out / REFERENCE_FILE, datasets, _fingerprint(cfg, datasets), cfg.per_device_train_batch_size,
                device, amp_dtype))

    def describe(self) -> str:
        if not self.needed:
            return "none (reference-free)"
        return "the base with the adapter off" if self.adapter_off else "log-probs precomputed before training"

    @no_grad
    def logps(self, batch: dict, split: str, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """([B] chosen, [B] rejected) reference log-probabilities (sums, or per-token means)."""
        from ..train.losses import sequence_logps
        from ..train.methods import split_pairs

        if self.table is not None:
            kind = "avg" if average else "sum"
            index = batch["index"].cpu()
            return (self.table[f"{split}_chosen_{kind}"][index].to(batch["index"].device),
                    self.table[f"{split}_rejected_{kind}"][index].to(batch["index"].device))
        with self.model.disable_adapter():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return split_pairs(sequence_logps(logits, batch["labels"], average=average))

    def _precomputed(self, path: Path, datasets: dict, fingerprint: str, batch_size: int, device, amp_dtype) -> dict:
        import torch

        from ..io_utils import atomic_write_bytes

        if path.is_file():
            # Reused only for the same model and the same tokenised pairs: a table left by an earlier run on
            # other data (--overwrite_output_dir keeps it, a run without checkpoints is not refused) would
            # silently give every pair another pair's reference.
            table = torch.load(path, weights_only=True, map_location="cpu")
            if table.get("fingerprint") == fingerprint:
                return table
            print(f"{path}: written for another model or other pairs; computing the reference again")
        table = {"fingerprint": fingerprint}
        for split, dataset in datasets.items():
            table.update(_reference_table(self.model, dataset, split, batch_size, device, amp_dtype))
        import io

        buffer = io.BytesIO()
        torch.save(table, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        return table


def _fingerprint(cfg, datasets: dict) -> str:
    """sha256 of the reference model's name and every split's token ids, identifying a reference table."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256(str(cfg.model).encode())
    for split, dataset in sorted(datasets.items()):
        digest.update(f"|{split}:{len(dataset)}".encode())
        for i in range(len(dataset)):
            for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
                ids = np.asarray(dataset[i][key], dtype=np.int64)
                digest.update(len(ids).to_bytes(8, "little") + ids.tobytes())
    return digest.hexdigest()


@no_grad
def _reference_table(model, dataset, split: str, batch_size: int, device, amp_dtype) -> dict:
    """Sum and per-token-mean log-probabilities of every chosen/rejected answer of `dataset` ([N] each)."""
    import torch

    from ..train.losses import sequence_logps
    from ..train.methods import pair_batch, split_pairs
    from ..train.training import autocast

    was_training = model.training
    model.eval()
    keys = [f"{split}_{side}_{kind}" for side in ("chosen", "rejected") for kind in ("sum", "avg")]
    parts: dict[str, list] = {key: [] for key in keys}
    for start in range(0, len(dataset), batch_size):
        batch = pair_batch(dataset, list(range(start, min(start + batch_size, len(dataset)))), device)
        with autocast(device, amp_dtype):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for kind, average in (("sum", False), ("avg", True)):
            chosen, rejected = split_pairs(sequence_logps(logits, batch["labels"], average=average).cpu())
            parts[f"{split}_chosen_{kind}"].append(chosen)
            parts[f"{split}_rejected_{kind}"].append(rejected)
    model.train(was_training)
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}
