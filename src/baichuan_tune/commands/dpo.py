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
from typing import TYPE_CHECKING, Literal

from ..config import ConfigError, opt, parse_config
from ..data.loading import DataOptions
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
    from ..train.reference import Reference
    from ..train.training import start_run, load_trainable, plot_curves, final_dtype, save_final, write_results

    # ---- setup
    dist, device, out, amp_dtype = start_run(cfg)
    files = cfg.dataset or [distributed.main_first(  # rank 0 writes the demo pairs; the others then read them
        dist, lambda: write_demo_pairs(out) if dist.main else str(out / "demo_pairs.json"))]
    model, tokenizer = load_trainable(cfg, device, amp_dtype)
    train_set, val_set, report = distributed.main_first(  # rank 0 tokenises first and fills the cache
        dist, lambda: load_pair_data(files, tokenizer, **cfg.load_kwargs(cfg.seed)))
    reference = Reference(model, needed=cfg.loss_type in ("sigmoid", "ipo"), adapter_off=cfg.finetuning_type in (
        "lora", "qlora"), out=out, datasets={"train": train_set, "eval": val_set}, model_name=cfg.model,
        batch_size=cfg.per_device_train_batch_size, device=device, amp_dtype=amp_dtype, dist=dist)
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
