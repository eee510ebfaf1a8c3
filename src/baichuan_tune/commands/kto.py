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

from ..config import ConfigError, opt, parse_config
from ..data.loading import DataOptions
from ..options import ModelOptions, TrainOptions


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
    from ..train.training import start_run, final_dtype, load_trainable, plot_curves, save_final, write_results
    from ..train.kto import KTOMethod
    from ..train.reference import Reference

    # ---- setup
    dist, device, out, amp_dtype = start_run(cfg)
    files = cfg.dataset or [distributed.main_first(  # rank 0 writes the demo pairs; the others then read them
        dist, lambda: write_demo_pairs(out) if dist.main else str(out / "demo_pairs.json"))]
    model, tokenizer = load_trainable(cfg, device, amp_dtype)
    train_set, val_set, report = distributed.main_first(
        dist, lambda: load_unpaired_data(files, tokenizer, **cfg.load_kwargs(cfg.seed)))
    reference = Reference(model, needed=True, adapter_off=cfg.finetuning_type in ("lora", "qlora"), out=out,
                          datasets={"train": train_set, "eval": val_set}, model_name=cfg.model,
                          batch_size=cfg.per_device_train_batch_size, device=device, amp_dtype=amp_dtype, dist=dist)
    method = KTOMethod(train_set, val_set, reference, dist, device, amp_dtype, beta=cfg.beta,
                       desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
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
