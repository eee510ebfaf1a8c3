"""What to train: LoRA / QLoRA adapters on PEFT, the last N layers (`freeze`), or everything (`full`).

Shared by sft, rm, dpo and ppo. Adapters are PEFT's own (`adapter_config.json` +
`adapter_model.safetensors`), so `peft.PeftModel.from_pretrained` loads them on this model.
"""

from __future__ import annotations

import torch

from ..errors import BaichuanTuneError

FINETUNING_TYPES = ("lora", "qlora", "freeze", "full")
# Every linear layer of a decoder block, by its published name.
LINEAR_MODULES = ("W_pack", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_targets(names: list[str]) -> list[str]:
    """Expand `all` and check each name is a linear layer of the model."""
    if not names or "all" in names:
        return list(LINEAR_MODULES)
    unknown = [n for n in names if n not in LINEAR_MODULES]
    if unknown:
        raise BaichuanTuneError(f"lora_target: unknown module(s) {unknown}; choose from {list(LINEAR_MODULES)} or 'all'")
    return list(names)


def attach_lora(model, target: list[str], rank: int, alpha: float, dropout: float, quantized: bool,
                keep_dtype: torch.dtype | None = None):
    """Wrap `model` in a PEFT LoRA model (after PEFT's k-bit preparation for a quantised base).

    PEFT's preparation casts every non-4-bit weight (embeddings, norms, head) to fp32. With `keep_dtype`
    (bf16 training) the frozen weights that were in that dtype go back to it: the QLoRA model then holds
    and computes them as the LoRA path does, and the fp32 copies (2 GiB for Baichuan2-7B's embeddings and
    head) and the fp32 residual stream they cause are gone."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        from ..models.quantize import keep_4bit_trainable

        keep_4bit_trainable(model)
        # Checkpointing is already on when asked for (prepare_for_training, non-reentrant as for lora/freeze/full):
        # PEFT would enable it again through transformers' deprecated name, with a FutureWarning.
        before = {n: p.dtype for n, p in model.named_parameters()}
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if keep_dtype is not None:
            for name, param in model.named_parameters():
                if before.get(name) == keep_dtype and param.dtype == torch.float32 and not param.requires_grad:
                    param.data = param.data.to(keep_dtype)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_targets(target)
    )
    return get_peft_model(model, config)


def freeze_all_but_last(model, num_layers: int) -> None:
    """`freeze`: train only the last `num_layers` decoder layers (the rest, embeddings and head stay fixed)."""
    layers = model.model.layers
    if not 1 <= num_layers <= len(layers):
        raise BaichuanTuneError(f"freeze_trainable_layers must be between 1 and {len(layers)}, got {num_layers}")
    model.requires_grad_(False)
    for layer in layers[-num_layers:]:
        layer.requires_grad_(True)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation (gradient) checkpointing, by transformers' current name when it has one (the old
    `gradient_checkpointing_enable` warns that it is deprecated)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def set_checkpoint_layers(model, count: int) -> None:
    """Checkpoint only the first `count` decoder layers of a Baichuan model (-1: all)."""
    from ..models.modeling_baichuan import BaichuanModel

    if count < -1:
        raise BaichuanTuneError(f"checkpoint_layers must be -1 (all layers) or >= 0, got {count}")
    for module in model.modules():
        if isinstance(module, BaichuanModel):
            module.checkpoint_layers = count


def prepare_for_training(model, finetuning_type: str, *, lora_target=("all",), lora_rank=8, lora_alpha=16.0,
                         lora_dropout=0.05, freeze_trainable_layers=2, gradient_checkpointing=False,
                         checkpoint_layers=-1, attention="sdpa", loss_chunk_size=0, compile=False,
                         qlora_keep_dtype: torch.dtype | None = None, sdpa_cudnn: bool = True,
                         nf4_in_graph: bool = True):
    """Set up `model` for `finetuning_type`; returns the model to train (a PeftModel for lora/qlora).

    `attention`, `loss_chunk_size`, `compile`, `sdpa_cudnn` and `nf4_in_graph` choose the fast paths
    (`modeling_baichuan.set_fast_paths`); `qlora_keep_dtype` keeps qlora's frozen embeddings/norms/head in
    that dtype (see `attach_lora`).
    `checkpoint_layers`: under `gradient_checkpointing`, how many decoder layers (the first) recompute their
    activations (-1: all); the rest keep them, trading memory for a third of their matrix products."""
    if finetuning_type not in FINETUNING_TYPES:
        raise BaichuanTuneError(f"finetuning_type must be one of {FINETUNING_TYPES}, got {finetuning_type!r}")
    if gradient_checkpointing:
        enable_checkpointing(model)
        model.config.use_cache = False
        set_checkpoint_layers(model, checkpoint_layers)
    if finetuning_type in ("lora", "qlora"):
        model = attach_lora(model, list(lora_target), lora_rank, lora_alpha, lora_dropout,
                            quantized=finetuning_type == "qlora", keep_dtype=qlora_keep_dtype)
        if gradient_checkpointing:
            # Inputs to the first checkpointed layer must require grad when the embeddings are frozen.
            model.enable_input_require_grads()
    elif finetuning_type == "freeze":
        freeze_all_but_last(model, freeze_trainable_layers)
    else:
        model.requires_grad_(True)
    from ..models.modeling_baichuan import set_fast_paths

    return set_fast_paths(model, attention=attention, loss_chunk_size=loss_chunk_size, compile=compile,
                          sdpa_cudnn=sdpa_cudnn, nf4_in_graph=nf4_in_graph)


def frozen_copy(model):
    """The reference of freeze/full training, which changes the base itself: a separate frozen copy."""
    import copy

    reference = copy.deepcopy(model).eval()
    reference.requires_grad_(False)
    return reference


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """The tensors a training checkpoint must hold: only those that train (adapter or unfrozen weights)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items() if n in names}


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights count their real element number."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total
