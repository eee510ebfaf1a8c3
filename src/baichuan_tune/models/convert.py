"""Conversion between the Baichuan layout and the LLaMA layout of transformers' `LlamaForCausalLM`.

Baichuan's RoPE models (Baichuan-7B, Baichuan2-7B) are LLaMA with two differences in the weights:
- q, k and v are one matrix `self_attn.W_pack.weight` [3*hidden, hidden] (rows q, then k, then v); LLaMA
  has `q_proj`, `k_proj`, `v_proj`. Both use the rotate-half RoPE form on the rows as stored, so the rows
  are split or concatenated with no permutation.
- Baichuan2's NormHead uses the row-normalised `lm_head.weight`; LLaMA uses its head as stored, so the
  head is normalised once on the way to LLaMA. On the way back NormHead is switched on only when the rows
  are already unit-norm, so the logits stay the same either way.
Every other tensor keeps its name. ALiBi models (Baichuan-13B, Baichuan2-13B) cannot be expressed in the
LLaMA layout: LLaMA has no ALiBi bias, so they are refused with a clear error.

The maps on names, tensors and configs are pure functions; `convert_checkpoint` reads a folder, maps it
and writes the result atomically.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import (
    CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILES, check_shard_size, load_model, parse_dtype, read_config,
    resolve_model_path, save_state_dict, write_config,
)
from ..config import ConfigError
from ..errors import CheckpointError
from ..io_utils import atomic_dir

TARGETS = ("llama", "baichuan")
_QKV = ("q_proj", "k_proj", "v_proj")
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Names (inside a decoder layer, or at the top) that are the same in both layouts.
_SHARED_LAYER = {
    "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
}
_SHARED_TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def _is_shared(name: str) -> bool:
    match = _LAYER_KEY.match(name)
    return name in _SHARED_TOP or bool(match and match.group(2) in _SHARED_LAYER)


def _is_buffer(name: str) -> bool:
    # Older checkpoints store the RoPE `inv_freq` buffer; both models recompute it from the config.
    return name.endswith("rotary_emb.inv_freq")


# ----------------------------------------------------------------------------- configs


def check_rope(config, where="") -> None:
    """Raise CheckpointError unless the model uses RoPE (only those have a LLaMA equivalent)."""
    if config.position_embedding != "rope":
        raise CheckpointError(
            f"{where or 'this model'}: is an ALiBi model (Baichuan-13B / Baichuan2-13B); LLaMA has no ALiBi "
            f"position bias, so it has no LLaMA-layout equivalent (only the RoPE models Baichuan-7B and "
            f"Baichuan2-7B convert)"
        )


def baichuan_to_llama_config(config):
    """The `LlamaConfig` of the same network as a RoPE `BaichuanConfig`."""
    from transformers import LlamaConfig

    check_rope(config)
    return LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": float(config.rope_theta)},
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"],
    )


def _llama_rope_theta(config, where: str) -> float:
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type", "default") != "default":
        raise CheckpointError(f"{where}: uses RoPE scaling {params.get('rope_type')!r}, which Baichuan models lack")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def llama_to_baichuan_config(config, norm_head: bool, where: str = "LLaMA config"):
    """The RoPE `BaichuanConfig` of a `LlamaConfig`; raise CheckpointError where Baichuan has no equivalent."""
    from . import BaichuanConfig

    heads = config.num_attention_heads
    problems = {
        "grouped-query attention (num_key_value_heads != num_attention_heads)":
            (config.num_key_value_heads or heads) != heads,
        "biases in attention or MLP": bool(getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)),
        f"activation {config.hidden_act!r} (Baichuan uses silu)": config.hidden_act != "silu",
        "head_dim != hidden_size / num_attention_heads":
            (getattr(config, "head_dim", None) or config.hidden_size // heads) * heads != config.hidden_size,
    }
    for problem, present in problems.items():
        if present:
            raise CheckpointError(f"{where}: uses {problem}, which Baichuan models lack")
    context = config.max_position_embeddings
    return BaichuanConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=heads, hidden_act="silu",
        max_position_embeddings=context, model_max_length=context, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, use_cache=config.use_cache, pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, tie_word_embeddings=False,
        position_embedding="rope", norm_head=norm_head, rope_theta=_llama_rope_theta(config, where),
        architectures=["BaichuanForCausalLM"],
    )


# ----------------------------------------------------------------------------- tensors


def normalize_rows(weight: torch.Tensor) -> torch.Tensor:
    """Row-wise L2-normalised copy in the weight's dtype, computed in fp32 as NormHead does in eval."""
    return F.normalize(weight.float(), dim=-1).to(weight.dtype)


def rows_are_unit_norm(weight: torch.Tensor, tol: float = 1e-3) -> bool:
    return bool(((weight.float().norm(dim=-1) - 1).abs() <= tol).all())


def baichuan_to_llama_state_dict(state_dict: dict, config) -> dict:
    """Baichuan names/tensors -> LLaMA names/tensors (q/k/v are views of W_pack; NormHead normalised)."""
    check_rope(config)
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith(".self_attn.W_pack.weight"):
            prefix = name[: -len("W_pack.weight")]
            # [3*hidden, hidden] -> 3 x [hidden, hidden]: rows q, then k, then v
            for part, block in zip(_QKV, tensor.chunk(3, dim=0)):
                out[f"{prefix}{part}.weight"] = block
        elif name == "lm_head.weight" and config.norm_head:
            out[name] = normalize_rows(tensor)
        elif _is_shared(name):
            out[name] = tensor
        elif not _is_buffer(name):
            raise CheckpointError(f"weight {name} has no place in the LLaMA layout")
    return out


def llama_to_baichuan_state_dict(state_dict: dict) -> dict:
    """LLaMA names/tensors -> Baichuan names/tensors (q/k/v rows concatenated into W_pack)."""
    out, pending = {}, {}
    for name, tensor in state_dict.items():
        match = _LAYER_KEY.match(name)
        part = match and match.group(2).removeprefix("self_attn.").removesuffix(".weight")
        if match and part in _QKV and match.group(2) == f"self_attn.{part}.weight":
            pending.setdefault(int(match.group(1)), {})[part] = tensor
        elif _is_shared(name):
            out[name] = tensor
        elif not _is_buffer(name):
            raise CheckpointError(f"weight {name} has no place in the Baichuan layout")
    for layer, parts in sorted(pending.items()):
        if set(parts) != set(_QKV):
            raise CheckpointError(f"layer {layer}: has {sorted(parts)} but needs all of q_proj, k_proj, v_proj")
        # 3 x [hidden, hidden] -> [3*hidden, hidden]
        out[f"model.layers.{layer}.self_attn.W_pack.weight"] = torch.cat([parts[p] for p in _QKV], dim=0)
    if "lm_head.weight" not in out and "model.embed_tokens.weight" in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # a tied LLaMA head becomes an untied copy
    return out


# ----------------------------------------------------------------------------- folders


def source_layout(path: Path) -> str:
    """"baichuan" or "llama" from a folder's config.json model_type; anything else is an error."""
    config_file = Path(path) / CONFIG_FILE
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; {path} is not a model checkpoint folder")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise CheckpointError(f"{config_file}: not a valid JSON object ({exc})") from None
    if model_type not in TARGETS:
        raise CheckpointError(f"{config_file}: model_type is {model_type!r}; convert reads 'baichuan' or 'llama' folders")
    return model_type


def _load_llama(path: Path):
    from transformers import LlamaForCausalLM

    try:
        return LlamaForCausalLM.from_pretrained(str(path), dtype="auto", device_map={"": "cpu"}, trust_remote_code=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: could not load the LLaMA checkpoint ({str(exc).splitlines()[0][:200]})") from exc


def _converted(src: Path, layout: str, to: str):
    """(config, state dict, source dtype) of the source folder in the target layout."""
    if layout == "baichuan":
        if to == "llama":
            check_rope(read_config(src), src / CONFIG_FILE)  # before reading any weights
        model = load_model(src, dtype="auto", device="cpu")
        if to == "baichuan":
            return model.config, model.state_dict(), model.dtype
        state = baichuan_to_llama_state_dict(model.state_dict(), model.config)
        return baichuan_to_llama_config(model.config), state, model.dtype
    model = _load_llama(src)
    llama_state = model.state_dict()
    head = llama_state.get("lm_head.weight", llama_state["model.embed_tokens.weight"])
    config = llama_to_baichuan_config(model.config, norm_head=rows_are_unit_norm(head), where=str(src / CONFIG_FILE))
    return config, llama_to_baichuan_state_dict(llama_state), model.dtype


def _copy_side_files(src: Path, dst: Path, to: str) -> None:
    """generation_config.json, template.json and the tokenizer files, as they are (the tokenizer does not change)."""
    from ..data.templates import TEMPLATE_FILE

    for name in (GENERATION_CONFIG_FILE, TEMPLATE_FILE, *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    tokenizer_config = dst / "tokenizer_config.json"
    if to == "llama" and tokenizer_config.is_file():
        data = json.loads(tokenizer_config.read_text(encoding="utf-8"))
        data.pop("auto_map", None)  # the remote-code pointer has no code beside it in a LLaMA folder
        tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_checkpoint(src, out, to: str, dtype=None, shard_size="5GB", safe_serialization=True) -> Path:
    """Convert folder `src` (Baichuan or LLaMA layout) into `out` in layout `to`, written atomically.

    dtype None/"auto" keeps the source dtype. Baichuan -> Baichuan re-saves (dtype, shards, format).
    """
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    target = parse_dtype(dtype)
    check_shard_size(shard_size)
    src = resolve_model_path(src)
    out = Path(out).expanduser()
    if out.resolve() == src.resolve():
        raise ConfigError(f"--output_dir {out} is the source folder; write the converted checkpoint elsewhere")
    layout = source_layout(src)
    if layout == "llama" and to == "llama":
        raise ConfigError(f"{src} is already in the LLaMA layout")
    config, state_dict, source_dtype = _converted(src, layout, to)
    out_dtype = source_dtype if target == "auto" else target
    with atomic_dir(out) as tmp:
        write_config(config, tmp, out_dtype)
        save_state_dict(state_dict, tmp, out_dtype, shard_size, safe_serialization)
        _copy_side_files(src, tmp, to)
    return out


__all__ = [
    "baichuan_to_llama_config", "baichuan_to_llama_state_dict", "check_rope", "convert_checkpoint",
    "llama_to_baichuan_config", "llama_to_baichuan_state_dict", "normalize_rows", "rows_are_unit_norm",
    "source_layout",
]
