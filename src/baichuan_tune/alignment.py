"""Setup shared by the alignment commands (rm, dpo, ppo): loading the base to train, demo data, results."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .io_utils import atomic_write_json


def base_dtype(cfg, amp_dtype: torch.dtype | None) -> str:
    """Frozen base weights in the compute dtype; weights that train (full/freeze) stay fp32 master copies."""
    if cfg.finetuning_type in ("lora", "qlora") and amp_dtype is not None:
        return "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    return "fp32"


def load_trainable(cfg, device: torch.device, amp_dtype: torch.dtype | None):
    """(model prepared for cfg.finetuning_type, tokenizer) from cfg.model."""
    from .adapters import prepare_for_training
    from .checkpoint import load_model_and_tokenizer, resolve_model_path

    model, tokenizer = load_model_and_tokenizer(
        resolve_model_path(cfg.model), device=str(device), dtype=base_dtype(cfg, amp_dtype),
        quantize=cfg.quantization_bit if cfg.finetuning_type == "qlora" else None,
    )
    model = prepare_for_training(
        model, cfg.finetuning_type, lora_target=cfg.lora_target, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout, freeze_trainable_layers=cfg.freeze_trainable_layers,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    return model, tokenizer


def model_reference(name: str) -> str:
    """How to find cfg.model again later: 'default' stays a name, a folder becomes an absolute path."""
    from .checkpoint import resolve_model_path

    return name if name == "default" else str(resolve_model_path(name).resolve())


def write_demo_pairs(out: Path) -> str:
    """Write the built-in preference pairs into the run folder (so the run's data can be inspected)."""
    from .builtin_pref import demo_preference_records

    path = Path(out) / "demo_pairs.json"
    atomic_write_json(path, demo_preference_records())
    return str(path)


def write_results(out: Path, results: dict) -> None:
    atomic_write_json(Path(out) / "train_results.json", results)
    print(json.dumps(results, ensure_ascii=False))


def is_demo(argv: list[str]) -> bool:
    """No config file and no --dataset: the command runs its built-in demo."""
    return not argv or (argv[0].startswith("--") and not any(a.startswith("--dataset") for a in argv))

