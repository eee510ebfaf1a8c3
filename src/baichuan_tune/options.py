"""The option dataclasses that several commands share: what model to train and how (sft, rm, dpo, ppo), how
to train (the loop, checkpoints, precision), and what model to load to run it (chat, serve); and how a
training command tells its built-in demo from a real run.

This module imports neither torch nor transformers, so a command's `--help` answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .config import ConfigError, opt, read_options, split_argv


@dataclass
class ModelOptions:
    model: str = opt("default", "model folder in the published layout, or 'default' for the built-in model")
    finetuning_type: Literal["lora", "qlora", "freeze", "full"] = opt("lora", "what to train: lora, qlora, freeze or full")
    lora_target: list[str] = opt(factory=lambda: ["all"], help="LoRA modules: W_pack,o_proj,gate_proj,up_proj,down_proj or all")
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: float = opt(16.0, "LoRA alpha (scale = alpha / r)")
    lora_dropout: float = opt(0.05, "dropout on the LoRA input")
    quantization_bit: Literal[4, 8] = opt(4, "qlora: 4 (NF4 + double quantisation) or 8 (int8) bit base weights")
    freeze_trainable_layers: int = opt(2, "freeze: number of last decoder layers to train")
    attention: Literal["sdpa", "flex"] = opt(
        "sdpa", "attention of padded/packed rows and ALiBi: sdpa (dense bias) or flex (FlexAttention, compiled on GPU)")
    loss_chunk_size: int = opt(
        0, "training loss through the head this many tokens at a time, no full logits (0: full logits)")
    compile: bool = opt(False, "run each decoder layer through torch.compile (one graph for all layers; GPU)")
    sdpa_cudnn: bool = opt(True, "let SDPA choose cuDNN's attention (false: flash, memory-efficient or math; "
                           "cuDNN plans anew for each row length)")
    nf4_in_graph: bool = opt(True, "with --compile: dequantise NF4 weights inside the compiled layers as torch ops "
                             "(false: bitsandbytes' op, a host call each)")
    qlora_half_frozen: bool = opt(
        True, "qlora + bf16/fp16: keep embeddings, norms and head in that dtype (not PEFT's fp32)")


@dataclass
class TrainOptions:
    output_dir: str = opt("outputs/run", "folder for checkpoints, logs, plots and the final model")
    num_train_epochs: float = opt(3.0, "passes over the training data")
    max_steps: int = opt(-1, "stop after this many optimizer steps (-1: run all epochs)")
    per_device_train_batch_size: int = opt(4, "samples per forward pass")
    gradient_accumulation_steps: int = opt(1, "forward passes per optimizer step")
    learning_rate: float = opt(3e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = opt("cosine", "learning-rate schedule after warmup")
    warmup_ratio: float = opt(0.0, "fraction of steps for linear warmup")
    warmup_steps: int = opt(0, "warmup steps (overrides warmup_ratio when > 0)")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0: no clipping)")
    optim: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"] = opt(
        "adamw_torch", "optimizer (the 8-bit and paged ones come from bitsandbytes)"
    )
    bf16: bool = opt(False, "bf16 autocast for the forward and backward passes")
    fp16: bool = opt(False, "fp16 autocast with dynamic loss scaling")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward to save memory")
    checkpoint_layers: int = opt(-1, "with gradient_checkpointing: how many decoder layers (the first ones) "
                                 "recompute activations; the rest keep them, faster for more memory (-1: all)")
    seed: int = opt(42, "random seed (data order, dropout, adapter init)")
    group_by_length: bool = opt(False, "batch samples of similar length together (less padding; deterministic)")
    logging_steps: int = opt(10, "log every N optimizer steps")
    eval_steps: int = opt(0, "evaluate every N optimizer steps (0: at the end of each epoch if there is a val split)")
    save_steps: int = opt(500, "write a checkpoint every N optimizer steps (0: none)")
    save_total_limit: int = opt(3, "keep at most this many checkpoints (0: keep all)")
    resume: bool = opt(False, "continue from the latest checkpoint in output_dir")
    overwrite_output_dir: bool = opt(False, "start afresh in an output_dir holding an earlier run (deletes that run's files)")
    save_dtype: Literal["auto", "fp32", "bf16", "fp16"] = opt(
        "auto", "dtype of the final full/freeze weights (auto: the base checkpoint's, bf16 for the published models)")
    nan_policy: Literal["stop", "skip"] = opt("stop", "on a NaN/inf loss: stop with a message, or skip the step and count it")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto")
    plot_loss: bool = opt(True, "write training_loss.png")
    report_to: Literal["tensorboard", "none"] = opt("tensorboard", "where to log besides trainer_log.jsonl")
    parallel: Literal["ddp", "fsdp"] = opt(
        "ddp", "under torchrun: ddp (every process holds the whole model) or fsdp (FSDP2: weights, gradients and "
               "optimizer states sharded across the processes)")
    fuse_accumulation: bool = opt(True, "sft: run each accumulation group as one packed forward/backward with "
                                  "per-token loss weights (the same update, fewer kernel launches)")
    fuse_max_tokens: int = opt(2048, "fuse an accumulation group only up to this many tokens (else the plain loop)")


def check_parallel(cfg) -> None:
    """--parallel fsdp only with what FSDP2 can shard (a run of one process ignores it)."""
    if getattr(cfg, "parallel", "ddp") != "fsdp":
        return
    if cfg.optim != "adamw_torch":
        raise ConfigError(f"--parallel fsdp needs --optim adamw_torch: {cfg.optim} (bitsandbytes) cannot step "
                          "sharded parameters")
    if cfg.fp16:
        raise ConfigError("--parallel fsdp does not support --fp16 (loss scaling of sharded gradients): use --bf16 "
                          "true, or --parallel ddp")
    if getattr(cfg, "finetuning_type", None) == "qlora" and cfg.quantization_bit == 8:
        raise ConfigError("--parallel fsdp shards 4-bit QLoRA only (bitsandbytes' int8 weights keep side tensors "
                          "that cannot be sharded): use --quantization_bit 4, or --parallel ddp")


# ----------------------------------------------------------------------------- the built-in demos


def is_demo(argv: list[str], own_model_allowed: bool = True) -> bool:
    """No config file and no --dataset (and, unless `own_model_allowed`, no --model other than 'default'):
    the command runs its built-in demo."""
    config_path, _ = split_argv(argv)
    if config_path is not None or _flag_value(argv, "dataset") is not None:
        return False
    return own_model_allowed or _flag_value(argv, "model") in (None, "default")


def _flag_value(argv: list[str], name: str) -> str | None:
    """The last value the command line gives option `name`, read as parse_config reads it (a bare flag: "true")."""
    values = [value for key, value in split_argv(argv)[1] if key.replace("-", "_") == name]
    return None if not values else "true" if values[-1] is None else values[-1]


def with_demo(argv: list[str], demo_settings, what: str, config_cls,
              own_model_allowed: bool = True) -> tuple[list[str], bool]:
    """(argv, is the demo): with no config file, no --dataset and no --help, a command runs its built-in
    demo. `demo_settings` is a list of flags put before the user's own (so the user's win), or a function
    of argv that returns the whole argv. The user's own options are read against `config_cls` first, so a
    mistyped option is an error, not a demo. A demo may clear its own output folder, never one the user named."""
    demo = is_demo(argv, own_model_allowed) and not any(a in ("-h", "--help") for a in argv)
    if demo:
        read_options(config_cls, argv)  # raises ConfigError naming an unknown option or a bad value
        print(f"No config file and no --dataset: running the built-in {what}.")
        user = list(argv)
        argv = demo_settings(user) if callable(demo_settings) else list(demo_settings) + user
        if _flag_value(user, "output_dir") is not None and _flag_value(user, "overwrite_output_dir") is None:
            argv += ["--overwrite_output_dir", "false"]
    return argv, demo


@dataclass
class LoadOptions:
    """The options of the commands that load a model to run it (chat, serve): what to load and how."""

    model: str = opt("default", "checkpoint folder, or 'default' for the built-in model")
    adapter: str | None = opt(None, "PEFT adapter folder applied on top of the model")
    quantization_bit: int | None = opt(None, "load the weights in 8 or 4 bits (bitsandbytes)")
    dtype: str = opt("auto", "fp32, bf16, fp16 or auto (the checkpoint's dtype)")
    device: str = opt("auto", "cpu, cuda, cuda:N or auto (the GPUs when there are any, else cpu)")
    template: Literal["baichuan2", "baichuan", "human_assistant", "base"] | None = opt(
        None, "chat format (default: the template recorded with the model or adapter, else the published Chat models')")
    allow_control_tokens: bool = opt(False, "let message text produce control tokens (<reserved_106> -> id 195); "
                                            "default: such text is encoded as plain text")

    def validate(self) -> None:
        if self.quantization_bit not in (None, 4, 8):
            raise ConfigError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")

    def load(self, path=None):
        """(model, tokenizer) from `path` (default: the `model` option) with these options; `--template`
        replaces the recorded template (with a warning when they differ)."""
        from pathlib import Path

        from .data.templates import TEMPLATE_FILE, choose_template, model_template, set_model_template
        from .models.checkpoint import load_model_and_tokenizer, resolve_model_path

        path = resolve_model_path(path or self.model)
        model, tokenizer = load_model_and_tokenizer(path, dtype=self.dtype, device=self.device,
                                                    quantize=self.quantization_bit, adapter=self.adapter)
        where = self.adapter if self.adapter and (Path(self.adapter) / TEMPLATE_FILE).is_file() else path
        set_model_template(model, choose_template(model_template(model), self.template, where))
        return model, tokenizer


@dataclass
class SamplingOptions:
    """How the online methods (ppo, grpo) sample their answers."""

    max_new_tokens: int = opt(64, "answer length limit")
    min_new_tokens: int = opt(0, "force at least this many answer tokens (= max_new_tokens: fixed length)")
    temperature: float = opt(1.0, "sampling temperature (pure sampling: no top-k/top-p, so the log-probs match)")

    def check_sampling(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("need max_new_tokens >= 1 and 0 <= min_new_tokens <= max_new_tokens")


@dataclass
class PPOOptions(SamplingOptions):
    """The PPO algorithm's settings (rollout, advantages, losses, KL penalty); `ppo`'s config holds them too."""

    rollout_batch_size: int = opt(16, "prompts (answers) per PPO step, over all processes")
    ppo_epochs: int = opt(4, "optimisation epochs over each rollout batch")
    gamma: float = opt(1.0, "discount factor")
    lam: float = opt(0.95, "GAE lambda")
    cliprange: float = opt(0.2, "policy ratio clip epsilon")
    cliprange_value: float = opt(0.2, "value clip epsilon")
    vf_coef: float = opt(0.1, "weight of the value loss")
    whiten_advantages: bool = opt(True, "normalise advantages to mean 0, std 1 per batch")
    kl_coef: float = opt(0.05, "KL penalty coefficient (initial value when adaptive)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward kl_target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "adaptive KL: target KL per answer (nats)")
    kl_horizon: float = opt(10000.0, "adaptive KL: horizon in answers")


@dataclass
class GRPOOptions(SamplingOptions):
    """The GRPO algorithm's settings (groups, rollout, clipped objective); `grpo`'s config holds them too."""

    rollout_batch_size: int = opt(8, "prompts per GRPO step, over all processes (each answered num_generations times)")
    num_generations: int = opt(4, "G: answers sampled per prompt, the group its advantages are relative to")
    grpo_epochs: int = opt(1, "optimisation passes over each step's answers (mu of the paper)")
    cliprange: float = opt(0.2, "policy ratio clip epsilon")
    beta: float = opt(0.0, "weight of the k3 KL to the reference in the loss (0: none, as DAPO and Dr. GRPO)")
    loss_normalization: Literal["sequence", "token"] = opt(
        "sequence", "sequence: mean over each answer's tokens, then answers (the paper); token: over all tokens (DAPO)")
    scale_rewards: bool = opt(True, "divide advantages by the group's reward std (false: Dr. GRPO's mean shift only)")
