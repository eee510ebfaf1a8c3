"""Merge a LoRA adapter into its base model and write a full checkpoint in the published layout.

    baichuan-tune export --model DIR --adapter DIR --output_dir DIR [--dtype bf16] [--shard-size 5GB] [--safetensors true]

The base is loaded unquantised in --dtype, PEFT's `merge_and_unload` folds W + (alpha/r)·B·A into each
adapted weight, and the result is written like the published checkpoints: config.json,
generation_config.json, the tokenizer files and weight shards (+ index) under the published tensor names,
into a temporary folder renamed into place. The remote-code files of a published base folder
(modeling_baichuan.py, ...) are copied along, so the authors' code loads the output as it loads the base.
A quantised base is refused: LoRA deltas added to rounded int8/NF4 weights would not give the trained model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, opt, parse_config


@dataclass
class ExportConfig:
    model: str = opt("", "base checkpoint folder the adapter was trained on, or 'default'")
    adapter: str = opt("", "PEFT adapter folder (adapter_config.json + adapter weights) to merge")
    output_dir: str = opt("", "output folder (written into a temporary folder, then renamed into place)")
    dtype: str = opt("bf16", "dtype of the merged weights: bf16, fp16, fp32 or auto (the base's)")
    shard_size: str = opt("5GB", "largest weight shard, e.g. 5GB or 500MB (several shards get an index file)")
    safetensors: bool = opt(True, "write safetensors (true) or PyTorch .bin shards as published (false)")
    device: str = opt("cpu", "where to merge: cpu or cuda (the weights are written from there shard by shard)")
    overwrite_output_dir: bool = opt(False, "replace --output_dir if it already holds files")
    quantization_bit: int | None = opt(None, "not supported: merging needs the full-precision base (see the error)")

    def validate(self) -> None:
        from ..models.checkpoint import check_shard_size, parse_dtype

        if self.quantization_bit is not None:
            raise ConfigError(
                f"export merges into a full-precision base; --quantization_bit {self.quantization_bit} is refused: LoRA deltas "
                "added to int8/NF4-rounded weights are not the trained model. Export without --quantization_bit, "
                "then load the merged model with --quantization_bit for chat/serve/eval"
            )
        for name in ("model", "adapter", "output_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        parse_dtype(self.dtype)
        check_shard_size(self.shard_size)


def refuse_quantized_base(base: Path) -> None:
    from ..models.checkpoint import read_config
    from ..errors import CheckpointError

    config = read_config(base)
    if getattr(config, "quantization_config", None):
        raise CheckpointError(
            f"{base / 'config.json'}: the base checkpoint is quantised ({config.quantization_config.get('quant_method', 'bitsandbytes')}); "
            "merging needs the full-precision base the adapter was trained on"
        )


def merge(base: Path, adapter: str, dtype: str, device: str):
    """(merged model, tokenizer): base + adapter with PEFT, then `merge_and_unload`."""
    from ..models.checkpoint import load_model_and_tokenizer
    from ..models.quantize import is_quantized

    model, tokenizer = load_model_and_tokenizer(base, dtype=dtype, device=device, adapter=adapter)
    if is_quantized(model):  # a config without quantization_config but bitsandbytes layers all the same
        raise ConfigError(f"{base}: loaded quantised; merging needs the full-precision base")
    return model.merge_and_unload(), tokenizer


def copy_remote_code(base: Path, out: Path) -> list[str]:
    """Copy the base folder's top-level .py files (the authors' remote code) as bytes; nothing is run."""
    from ..io_utils import atomic_write_bytes

    copied = []
    for file in sorted(base.glob("*.py")):
        atomic_write_bytes(out / file.name, file.read_bytes())
        copied.append(file.name)
    return copied


def main(argv: list[str]) -> int:
    cfg = parse_config(ExportConfig, argv, prog="baichuan-tune export")
    from ..extras import check_extras

    check_extras("export", cfg)  # nothing optional today (a quantised merge is refused), checked all the same
    from ..models.checkpoint import check_output_dir, find_weight_files, resolve_model_path, save_pretrained_atomic

    base = resolve_model_path(cfg.model)
    out = check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, {"--model": base, "--adapter": cfg.adapter})
    refuse_quantized_base(base)
    start = time.time()
    model, tokenizer = merge(base, cfg.adapter, cfg.dtype, cfg.device)
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    save_pretrained_atomic(model, tokenizer, out, dtype=dtype, shard_size=cfg.shard_size,
                           safe_serialization=cfg.safetensors)
    copied = copy_remote_code(base, out)
    fmt, files, _ = find_weight_files(out)
    size = sum(f.stat().st_size for f in files)
    print(f"merged {cfg.adapter} into {base} -> {out} ({len(files)} {fmt} shard(s), {size / 1e6:.1f} MB"
          + (f", remote code: {', '.join(copied)}" if copied else "") + f") in {time.time() - start:.1f}s")
    return 0
