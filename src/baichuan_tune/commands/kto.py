"""KTO: align from answers labelled good or bad (unpaired feedback), against a frozen reference.

    baichuan-tune kto                                  # built-in demo: tiny default model, demo pairs split up, CPU
    baichuan-tune kto CONFIG.yaml --model DIR --dataset feedback.jsonl --beta 0.1
    baichuan-tune kto --model DIR --dataset pairs.json --desirable_weight 1.0 --undesirable_weight 1.33
    torchrun --nproc_per_node 4 -m baichuan_tune.cli kto CONFIG.yaml   # data-parallel on 4 GPUs of one node

Kahneman-Tversky optimisation (Ethayarajh et al. 2024): each answer's implicit reward
r = log pi(y|x) - log ref(y|x) is pushed above (desirable) or below (undesirable) a reference point z0,
a batch estimate of KL(pi || ref) from mismatched prompt/answer pairs. Data: `messages` or
`conversations` records with a boolean `label` (or `kto_tag`), or preference pairs, each split into its
chosen (desirable) and rejected (undesirable) answer (see data/unpaired.py). The reference is as in
`dpo`: the base with the adapter off (LoRA/QLoRA), or log-probabilities computed once before training
(freeze/full, output_dir/reference_logps.pt). Logged on the eval split, before and after training:
`accuracy` (share of answers whose implicit reward has the sign of their label), `margin` (mean reward
of the desirable answers minus that of the undesirable ones), `kl` (z0) and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import ConfigError, opt, parse_config
from ..data.loading import DataOptions
from ..lazy import no_grad
from ..options import ModelOptions, TrainOptions
from ..train.methods import Method

if TYPE_CHECKING:  # annotations only: torch is imported when the command runs, not for --help
    import torch

# The built-in demo: KTO with LoRA on the tiny default model; the demo pairs give 640 training answers.
DEMO_OVERRIDES = [
    "--model", "default", "--finetuning_type", "lora", "--lora_rank", "16", "--lora_alpha", "32",
    "--output_dir", "outputs/kto-demo", "--num_train_epochs", "1", "--learning_rate", "2e-3", "--beta", "0.1",
    "--per_device_train_batch_size", "8", "--logging_steps", "5", "--save_steps", "100", "--val_size", "80",
    "--eval_steps", "40", "--cutoff_len", "64", "--device", "cpu", "--overwrite_output_dir", "true",
]


@dataclass
class KTOConfig(ModelOptions, DataOptions, TrainOptions):
    output_dir: str = opt("outputs/kto", "folder for the policy, checkpoints, logs and plots")
    learning_rate: float = opt(5e-5, "peak learning rate")
    num_train_epochs: float = opt(1.0, "passes over the training answers")
    beta: float = opt(0.1, "KL strength beta: scale of the implicit reward inside the sigmoid")
    desirable_weight: float = opt(1.0, "lambda_D, weight of desirable answers' losses")
    undesirable_weight: float = opt(1.0, "lambda_U, weight of undesirable answers' losses")

    def validate(self) -> None:
        from ..options import check_parallel

        check_parallel(self)
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


def main(argv: list[str]) -> int:
    from ..options import with_demo

    argv, _ = with_demo(argv, DEMO_OVERRIDES, "KTO demo (tiny default model, CPU)", KTOConfig)
    cfg = parse_config(KTOConfig, argv, prog="baichuan-tune kto")
    from ..extras import check_extras

    check_extras("kto", cfg)
    from ..data.unpaired import load_unpaired_data
    from ..train import distributed
    from ..train.adapters import count_parameters
    from ..train.alignment import write_demo_pairs
    from ..train.engine import Engine, schedule_for
    from ..train.methods import eval_results
    from ..train.training import (final_dtype, load_trainable, plot_curves, precision_dtype, prepare_output_dir,
                                  resolve_device, save_final, seed_everything, write_results)
    from .dpo import Reference

    # ---- setup
    dist, device = distributed.setup(resolve_device(cfg.device))  # one process, or one of torchrun's
    out = prepare_output_dir(cfg) if dist.main else Path(cfg.output_dir)
    files = cfg.dataset or [write_demo_pairs(out) if dist.main else str(out / "demo_pairs.json")]
    dist.barrier()
    seed_everything(cfg.seed)
    amp_dtype = precision_dtype(cfg)
    model, tokenizer = load_trainable(cfg, device, amp_dtype)
    train_set, val_set, report = distributed.main_first(
        dist, lambda: load_unpaired_data(files, tokenizer, **cfg.load_kwargs(cfg.seed)))
    reference = Reference(cfg, model, out, {"train": train_set, "eval": val_set}, device, amp_dtype, dist, needed=True)
    method = KTOMethod(cfg, train_set, val_set, reference, dist, device, amp_dtype)
    schedule = schedule_for(cfg, len(train_set), dist.world)
    engine = Engine(model, method, cfg, out, schedule, dist, device, amp_dtype)
    trainable, total = count_parameters(model)

    # ---- train
    results = engine.run(f"{report}; {weight_note(cfg, report.counts)}reference: {reference.describe()}; "
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
            plot_curves(out / "trainer_log.jsonl", out / "training_loss.png", ("loss", "eval_loss"), "KTO loss")
            plot_curves(out / "trainer_log.jsonl", out / "training_accuracy.png", ("accuracy", "eval_accuracy"),
                        "share of answers rewarded with their label's sign")
            plot_curves(out / "trainer_log.jsonl", out / "training_margin.png", ("eval_margin",),
                        "desirable minus undesirable reward")
        write_results(out, {**results, **report.counts, **eval_results(engine.evals)})
    print(f"Done: policy in {out}")
    return 0


def weight_note(cfg, counts: dict) -> str:
    """The paper's advice (sec. 4.2): lambda_D n_D / (lambda_U n_U) in [1, 4/3]; say so when the data is outside."""
    if not counts.get("undesirable") or not counts.get("desirable"):
        return ""
    ratio = cfg.desirable_weight * counts["desirable"] / (cfg.undesirable_weight * counts["undesirable"])
    hint = "" if 1.0 <= ratio <= 4 / 3 + 1e-9 else " (outside the paper's advised 1 to 1.33: adjust the weights)"
    return f"lambda_D n_D / lambda_U n_U = {ratio:.2f}{hint}; "


class KTOMethod(Method):
    """KTO on the engine: batches of labelled answers, each with its mismatched answer for z0."""

    name = "kto"
    eval_before = True
    bar_keys = ("loss", "accuracy", "kl")

    def __init__(self, cfg, train_set, val_set, reference, dist, device, amp_dtype):
        super().__init__(train_set, val_set)
        self.cfg, self.reference, self.dist, self.device, self.amp_dtype = cfg, reference, dist, device, amp_dtype

    def collate(self, dataset, indices, device):
        import torch

        from ..train.methods import pair_batch

        batch = pair_batch(dataset, indices, device)  # rows: B prompt + answer, then B prompt + mismatched answer
        batch["desirable"] = torch.tensor([bool(dataset[i]["label"]) for i in indices], device=device)
        return batch

    def weight(self, batch):
        return int(batch["index"].numel())

    def step(self, model, batch):
        out = kto_forward(self.cfg, model, batch, self.reference, "train", self.dist)
        return out.loss, {"accuracy": float(sign_agreement(out.rewards, batch["desirable"]).float().mean()),
                          "kl": float(out.kl)}

    @no_grad
    def evaluate(self, engine) -> dict:
        """Exact held-out figures (shared out among the processes): loss, accuracy, margin, mean rewards, z0."""
        from ..train.training import autocast

        model, val, dist = engine.model, self.val_set, self.dist
        was_training = model.training
        model.eval()
        mine, size = list(range(dist.rank, len(val), dist.world)), engine.schedule.batch_size
        sums = [0.0] * 8  # loss, answers, right, desirable reward sum and count, undesirable ditto, z0 x answers
        for k in range(0, len(mine), size):
            batch = self.collate(val, mine[k : k + size], self.device)
            with autocast(self.device, self.amp_dtype):
                out = kto_forward(self.cfg, model, batch, self.reference, "eval", None)
            good, n = batch["desirable"], batch["index"].numel()
            parts = [float(out.loss) * n, n, float(sign_agreement(out.rewards, good).sum()),
                     float(out.rewards[good].sum()), float(good.sum()), float(out.rewards[~good].sum()),
                     float((~good).sum()), float(out.kl) * n]
            sums = [a + b for a, b in zip(sums, parts)]
        model.train(was_training)
        loss, n, right, good_sum, good_n, bad_sum, bad_n, kl = dist.sum(sums, self.device)
        good_mean, bad_mean = good_sum / max(good_n, 1), bad_sum / max(bad_n, 1)
        return {"eval_loss": round(loss / max(n, 1), 5), "eval_accuracy": round(right / max(n, 1), 5),
                "eval_margin": round(good_mean - bad_mean, 5), "eval_desirable_reward": round(good_mean, 5),
                "eval_undesirable_reward": round(bad_mean, 5), "eval_kl": round(kl / max(n, 1), 5)}


def sign_agreement(rewards: torch.Tensor, desirable: torch.Tensor) -> torch.Tensor:
    """[B] bool: the implicit reward is > 0 for a desirable answer, < 0 for an undesirable one (0 counts as wrong)."""
    return (rewards > 0) & desirable | (rewards < 0) & ~desirable


def kto_forward(cfg, model, batch: dict, reference, split: str, dist):
    """KTOLoss of one batch: the policy's log-probs of its answers (with gradient) and of the mismatched answers
    (without), the reference's of both, z0 averaged over the processes when `dist` has several."""
    import torch

    from ..train.losses import kto_kl_estimate, kto_loss, sequence_logps

    n = batch["index"].numel()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    with torch.no_grad():  # z0 takes no gradient (sec. 4.1); before the graded forward, for DDP's bookkeeping
        mismatched = sequence_logps(model(input_ids=ids[n:], attention_mask=mask[n:]).logits, labels[n:])
    logits = model(input_ids=ids[:n], attention_mask=mask[:n]).logits
    policy = sequence_logps(logits, labels[:n])
    ref, ref_mismatched = reference.logps(batch, split, average=False)
    z0 = kto_kl_estimate(mismatched, ref_mismatched)
    if dist is not None and dist.world > 1:  # the global batch's estimate (equal shares): clamp the mean of means
        mean = dist.sum([float((mismatched - ref_mismatched).float().mean())], z0.device)[0] / dist.world
        z0 = z0.new_tensor(max(mean, 0.0))
    return kto_loss(policy, ref, batch["desirable"], z0, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                    undesirable_weight=cfg.undesirable_weight)
