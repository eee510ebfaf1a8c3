"""Model shapes by name: the four published architectures, tiny ones for tests, and the built-in default.

`preset_config("baichuan2-7b")` gives a `BaichuanConfig` of that shape (random-weight models for
benchmarks and tests are built from these). Shapes follow the published config.json files.
"""

from __future__ import annotations

from .configuration_baichuan import BAICHUAN2_VOCAB_SIZE, BaichuanConfig

_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32)
_13B = dict(hidden_size=5120, intermediate_size=13696, num_hidden_layers=40, num_attention_heads=40)
_TINY = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4)

PRESETS: dict[str, dict] = {
    "baichuan-7b": dict(_7B, vocab_size=64000, position_embedding="rope", norm_head=False, max_position_embeddings=4096),
    "baichuan-13b": dict(_13B, vocab_size=64000, position_embedding="alibi", norm_head=False, model_max_length=4096),
    "baichuan2-7b": dict(
        _7B, vocab_size=BAICHUAN2_VOCAB_SIZE, position_embedding="rope", norm_head=True, max_position_embeddings=4096
    ),
    "baichuan2-13b": dict(
        _13B, vocab_size=BAICHUAN2_VOCAB_SIZE, position_embedding="alibi", norm_head=True, model_max_length=4096
    ),
    # Tiny random-weight models of each architecture, for tests (vocab small enough for CPU).
    "tiny-baichuan-7b": dict(_TINY, vocab_size=512, position_embedding="rope", norm_head=False, max_position_embeddings=512),
    "tiny-baichuan-13b": dict(_TINY, hidden_size=80, num_attention_heads=5, vocab_size=512, position_embedding="alibi", norm_head=False, model_max_length=512),
    "tiny-baichuan2-7b": dict(_TINY, vocab_size=512, position_embedding="rope", norm_head=True, max_position_embeddings=512),
    "tiny-baichuan2-13b": dict(
        _TINY, num_attention_heads=5, hidden_size=80, vocab_size=512, position_embedding="alibi", norm_head=True,
        model_max_length=512,
    ),
    # The built-in default model: Baichuan2-7B architecture (RoPE + NormHead) at a size that trains on a CPU.
    # Widths are multiples of 64 so that bitsandbytes' CPU NF4 kernels take every layer (--quantization_bit 4).
    "default": dict(
        hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, vocab_size=4096,
        position_embedding="rope", norm_head=True, max_position_embeddings=1024,
    ),
}


def preset_config(name: str, **overrides) -> BaichuanConfig:
    if name not in PRESETS:
        import difflib

        hint = difflib.get_close_matches(name, list(PRESETS), n=1)
        raise ValueError(f"unknown preset '{name}'" + (f"; did you mean '{hint[0]}'?" if hint else "") + f" (known: {', '.join(PRESETS)})")
    return BaichuanConfig(**{**PRESETS[name], **overrides})
