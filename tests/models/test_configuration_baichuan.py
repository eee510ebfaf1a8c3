"""`BaichuanConfig` against the real published config.json files in ../shared/reference.

The published files carry no field naming the variant; FACTS.md gives the expected answer for each model
(Baichuan-7B: RoPE, plain head; Baichuan-13B: ALiBi, plain head; Baichuan2-7B: RoPE + NormHead;
Baichuan2-13B: ALiBi + NormHead; context 4096).
"""

from __future__ import annotations

import json

import pytest

import baichuan_tune  # noqa: F401  (registers model_type "baichuan" with AutoConfig)
from baichuan_tune.models import BaichuanConfig
from transformers import AutoConfig

# folder under ../shared/reference -> (position_embedding, norm_head), as FACTS.md states them.
PUBLISHED = {
    "baichuan-7b": ("rope", False),
    "baichuan-13b-base": ("alibi", False),
    "baichuan-13b-chat": ("alibi", False),
    "baichuan2-7b-chat": ("rope", True),
    "baichuan2-13b-chat": ("alibi", True),
}
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def published_json(reference, name: str) -> dict:
    return json.loads((reference / name / "config.json").read_text())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_variant_inferred_from_published_config(shared_reference, name):
    position, norm_head = PUBLISHED[name]
    raw = published_json(shared_reference, name)
    assert "position_embedding" not in raw and "norm_head" not in raw  # really inferred, not read
    config = BaichuanConfig.from_pretrained(shared_reference / name)
    assert (config.position_embedding, config.norm_head) == (position, norm_head)
    # Baichuan2-7B also rotates q/k in fp32; Baichuan-7B does not (FACTS.md, Attention).
    assert config.rotary_fp32 is norm_head
    assert config.max_position_embeddings == config.model_max_length == 4096
    assert config.z_loss_weight == 0.0
    for field in SHAPE_FIELDS + ("rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id"):
        assert getattr(config, field) == raw[field], field
    assert config.head_dim == raw["hidden_size"] // raw["num_attention_heads"]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_autoconfig_loads_published_config_without_remote_code(shared_reference, name):
    assert "auto_map" in published_json(shared_reference, name)  # the folder points at remote code
    config = AutoConfig.from_pretrained(shared_reference / name)  # no trust_remote_code
    assert type(config) is BaichuanConfig
    assert (config.position_embedding, config.norm_head) == PUBLISHED[name]


def test_longer_context_of_baichuan2_13b_chat_v2(shared_reference):
    raw = published_json(shared_reference, "baichuan2-13b-chat") | {"model_max_length": 8192}
    config = BaichuanConfig(**raw)
    assert (config.position_embedding, config.norm_head) == ("alibi", True)
    assert config.max_position_embeddings == config.model_max_length == 8192


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_explicit_fields_override_inference(shared_reference, name):
    raw = published_json(shared_reference, name)
    position, norm_head = PUBLISHED[name]
    other = "alibi" if position == "rope" else "rope"
    config = BaichuanConfig(**raw, position_embedding=other, norm_head=not norm_head, rotary_fp32=norm_head)
    assert (config.position_embedding, config.norm_head, config.rotary_fp32) == (other, not norm_head, norm_head)


def _variant(config) -> tuple:
    return (config.position_embedding, config.norm_head, config.rotary_fp32, config.z_loss_weight,
            config.max_position_embeddings)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_save_and_reload_keeps_published_variant(shared_reference, tmp_path, name):
    config = BaichuanConfig.from_pretrained(shared_reference / name)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["position_embedding"], saved["norm_head"]) == PUBLISHED[name]  # written out explicitly
    assert _variant(AutoConfig.from_pretrained(tmp_path)) == _variant(config)


@pytest.mark.parametrize(
    "fields",
    [
        # Each combination is one that inference from the other fields would get wrong on reload.
        dict(vocab_size=512, norm_head=True, max_position_embeddings=256),  # NormHead with a small vocab
        dict(vocab_size=125696, norm_head=False, position_embedding="alibi", max_position_embeddings=256),
        dict(vocab_size=64000, position_embedding="rope", model_max_length=2048, rotary_fp32=True),
        dict(vocab_size=512, position_embedding="alibi", norm_head=True, z_loss_weight=2e-4),
    ],
)
def test_save_and_reload_keeps_explicit_variant(tmp_path, fields):
    config = BaichuanConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, **fields)
    config.save_pretrained(tmp_path)
    assert _variant(AutoConfig.from_pretrained(tmp_path)) == _variant(config)


def test_bad_fields_are_rejected():
    with pytest.raises(ValueError, match="position_embedding"):
        BaichuanConfig(position_embedding="learned")
    with pytest.raises(ValueError, match="divisible"):
        BaichuanConfig(hidden_size=100, num_attention_heads=3)
