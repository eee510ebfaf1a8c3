"""Convert a checkpoint between the Baichuan layout and transformers' LLaMA layout (RoPE models).

    baichuan-tune convert --model DIR --output_dir DIR --to llama|baichuan [--dtype fp32|bf16|fp16] [--shard-size 5GB] [--safetensors true] [--overwrite_output_dir true]

--to llama: Baichuan-7B / Baichuan2-7B -> a folder `LlamaForCausalLM.from_pretrained` loads (q/k/v split from
W_pack, Baichuan2's NormHead normalised once). ALiBi models (the 13B ones) have no LLaMA equivalent.
--to baichuan: a LLaMA folder -> the published Baichuan layout; or a Baichuan folder re-saved with another
dtype, shard size or format (--safetensors false writes pytorch_model-0000i-of-0000n.bin + index).
--output_dir must be new or empty: the result replaces the whole folder, so an existing one needs --overwrite_output_dir true.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from ..config import ConfigError, opt, parse_config


@dataclass
class ConvertConfig:
    model: str = opt("", "source checkpoint folder (Baichuan or LLaMA layout), or 'default'")
    output_dir: str = opt("", "output folder (written into a temporary folder, then renamed into place)")
    to: Literal["llama", "baichuan"] = opt("llama", "target layout: llama or baichuan")
    dtype: str = opt("auto", "dtype of the written weights: fp32, bf16, fp16 or auto (keep the source's)")
    shard_size: str = opt("5GB", "largest weight shard, e.g. 5GB or 500MB (several shards get an index file)")
    safetensors: bool = opt(True, "write safetensors (true) or PyTorch .bin shards as published (false)")
    overwrite_output_dir: bool = opt(False, "replace --output_dir if it already holds files")

    def validate(self) -> None:
        from ..models.checkpoint import check_shard_size, parse_dtype

        if not self.model:
            raise ConfigError("--model is required (the checkpoint folder to convert)")
        if not self.output_dir:
            raise ConfigError("--output_dir is required (the folder to write)")
        parse_dtype(self.dtype)
        check_shard_size(self.shard_size)


def main(argv: list[str]) -> int:
    cfg = parse_config(ConvertConfig, argv, prog="baichuan-tune convert")
    from ..models.checkpoint import check_output_dir, find_weight_files, resolve_model_path
    from ..models.convert import convert_checkpoint

    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, {"--model": resolve_model_path(cfg.model)})
    start = time.time()
    out = convert_checkpoint(cfg.model, cfg.output_dir, cfg.to, dtype=cfg.dtype, shard_size=cfg.shard_size,
                             safe_serialization=cfg.safetensors)
    fmt, files, _ = find_weight_files(out)
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {out} ({cfg.to} layout, {len(files)} {fmt} shard(s), {size / 1e6:.1f} MB) "
          f"in {time.time() - start:.1f}s")
    return 0
