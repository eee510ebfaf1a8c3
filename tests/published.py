"""Published-layout checkpoints for tests: the weight names and shapes of the published folders, written as
sharded `.bin` files with random weights (used by the checkpoint, convert and export tests)."""

from __future__ import annotations

import json

import torch

LAYER_WEIGHTS = ("input_layernorm", "self_attn.W_pack", "self_attn.o_proj", "post_attention_layernorm",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Published folder -> (position_embedding, norm_head) as FACTS.md's table gives them.
PUBLISHED = {
    "baichuan-7b": ("rope", False),
    "baichuan-13b-base": ("alibi", False),
    "baichuan-13b-chat": ("alibi", False),
    "baichuan2-7b-chat": ("rope", True),
    "baichuan2-13b-chat": ("alibi", True),
}
# Tiny sizes that keep the published vocabulary (the variant is inferred from it) and, for the 13B models,
# a head count that is not a power of two, like their 40.
TINY = {"rope": dict(hidden_size=32, num_attention_heads=4), "alibi": dict(hidden_size=40, num_attention_heads=5)}


def published_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every published weight name with its shape, from FACTS.md (W_pack is [3*hidden, hidden], no biases)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    per_layer = {"input_layernorm": (h,), "self_attn.W_pack": (3 * h, h), "self_attn.o_proj": (h, h),
                 "post_attention_layernorm": (h,), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                 "mlp.down_proj": (h, i)}
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        shapes |= {f"model.layers.{layer}.{n}.weight": s for n, s in per_layer.items()}
    return shapes


def write_published_bin(folder, cfg: dict, n_shards: int = 2, dtype=torch.bfloat16, seed: int = 0, extra=None):
    """Write `cfg` and random weights in the published sharded .bin layout (+ index); return the tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: (torch.randn(s, generator=gen) * 0.05).to(dtype) for n, s in published_shapes(cfg).items()}
    tensors |= extra or {}
    names = list(tensors)
    weight_map = {}
    for k in range(n_shards):
        shard = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        part = names[k::n_shards]
        torch.save({n: tensors[n] for n in part}, folder / shard)
        weight_map |= {n: shard for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return tensors


def shrunk_published_config(reference, name: str) -> dict:
    cfg = json.loads((reference / name / "config.json").read_text())
    assert "auto_map" in cfg  # the real file, pointing at the authors' remote code
    position = PUBLISHED[name][0]
    return cfg | TINY[position] | dict(intermediate_size=64, num_hidden_layers=2)


def small_cfg(**overrides) -> dict:
    """A small Baichuan2-7B-style config written by hand (no ../shared needed)."""
    cfg = dict(architectures=["BaichuanForCausalLM"], model_type="baichuan", hidden_size=32, intermediate_size=64,
               num_hidden_layers=2, num_attention_heads=4, vocab_size=96, max_position_embeddings=256,
               rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16",
               norm_head=True)
    return cfg | overrides
