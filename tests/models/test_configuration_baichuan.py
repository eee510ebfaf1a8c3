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


# ----------------------------------------------------------------------------- NormHead beyond the vocabulary size
# FACTS.md: only Baichuan2 has NormHead. The authors' Baichuan2 config class has a `z_loss_weight` field
# (default 0) that its `save_pretrained` writes; Baichuan-1's classes have none. The published Baichuan2
# configs name `tokenizer_class: BaichuanTokenizer`; Baichuan-1's do not. Baichuan2's tokenizer.model has
# 125,696 pieces and Baichuan-1's 64,000, whatever tokens were added on top.

import logging  # noqa: E402

from baichuan_tune.models import configuration_baichuan  # noqa: E402

LOGGER = "baichuan_tune.models.configuration_baichuan"


@pytest.fixture
def variant_warnings(monkeypatch, caplog):
    """The warnings about a guessed variant, each logged once per process: a fresh record for this test."""
    monkeypatch.setattr(configuration_baichuan, "_warned", set(), raising=False)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    return lambda: [r.getMessage() for r in caplog.records if r.name == LOGGER]


def authors_saved(raw: dict, vocab_size: int) -> dict:
    """A published Baichuan2 config after adding tokens and saving with the authors' code: the vocabulary is
    resized and their config class writes its own fields (z_loss_weight, and for 13B gradient_checkpointing)."""
    return raw | {"vocab_size": vocab_size, "z_loss_weight": 0, "gradient_checkpointing": False,
                  "transformers_version": "4.33.3", "_name_or_path": "/data/models/finetuned"}


@pytest.mark.parametrize("name", ["baichuan2-7b-chat", "baichuan2-13b-chat"])
def test_resized_baichuan2_saved_by_the_authors_code_keeps_normhead(shared_reference, tmp_path, name,
                                                                   variant_warnings):
    raw = authors_saved(published_json(shared_reference, name), 125_700)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for config in (BaichuanConfig(**raw), AutoConfig.from_pretrained(tmp_path)):
        assert config.norm_head is True and config.rotary_fp32 is True
        assert (config.position_embedding, config.vocab_size) == (PUBLISHED[name][0], 125_700)
    assert variant_warnings() == []  # conclusive: nothing to warn about


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_settle_the_variant_without_a_warning(shared_reference, name, variant_warnings):
    BaichuanConfig(**published_json(shared_reference, name))
    assert variant_warnings() == []


def test_tokenizer_class_alone_says_baichuan2(shared_reference, variant_warnings):
    raw = published_json(shared_reference, "baichuan2-13b-chat") | {"vocab_size": 125_697}
    assert "z_loss_weight" not in raw
    assert BaichuanConfig(**raw).norm_head is True
    assert variant_warnings() == []
    plain = {k: v for k, v in raw.items() if k != "tokenizer_class"}  # Baichuan-13B's fields, a resized vocab
    assert BaichuanConfig(**plain).norm_head is False
    assert len(variant_warnings()) == 1 and "assuming a plain head" in variant_warnings()[0]


def test_baichuan_7b_code_names_say_plain_head(shared_reference, variant_warnings):
    raw = published_json(shared_reference, "baichuan-7b") | {"vocab_size": 64_010}
    assert BaichuanConfig(**raw).norm_head is False
    assert variant_warnings() == []  # architectures: BaiChuanForCausalLM


def test_weak_hints_give_a_guess_with_one_warning(shared_reference, variant_warnings):
    raw = published_json(shared_reference, "baichuan2-7b-chat") | {"vocab_size": 125_800}
    del raw["tokenizer_class"]  # left: both context fields, as only Baichuan2-7B's config has them
    for _ in range(3):  # configs are built many times during one load; the warning comes once
        assert BaichuanConfig(**raw).norm_head is True
    [message] = variant_warnings()
    assert "guessed NormHead (Baichuan2)" in message and "max_position_embeddings and model_max_length" in message
    assert '"norm_head": false' in message  # what to write if the guess is wrong


def test_conflicting_hints_are_reported(shared_reference, variant_warnings):
    raw = published_json(shared_reference, "baichuan-13b-base") | {"z_loss_weight": 0}  # vocab 64000
    assert BaichuanConfig(**raw).norm_head is True  # the field only Baichuan2's code writes outranks the size
    [message] = variant_warnings()
    assert "z_loss_weight" in message and "although vocab_size 64000 is the Baichuan-1 tokenizer's" in message


def test_explicit_norm_head_wins_without_a_warning(shared_reference, variant_warnings):
    raw = authors_saved(published_json(shared_reference, "baichuan2-7b-chat"), 125_700)
    assert BaichuanConfig(**raw, norm_head=False).norm_head is False
    assert variant_warnings() == []


@pytest.mark.parametrize("tokenizer_from,norm_head", [("baichuan2-13b-chat", True), ("baichuan-13b-base", False)])
def test_the_tokenizer_file_beside_config_json_settles_it(shared_reference, tmp_path, tokenizer_from, norm_head,
                                                          variant_warnings):
    """A 13B-shaped config with a resized vocabulary and no other hint: the folder's tokenizer.model decides."""
    import shutil

    from baichuan_tune.models.checkpoint import read_config

    raw = published_json(shared_reference, "baichuan-13b-base") | {"vocab_size": 70_000}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    shutil.copy(shared_reference / tokenizer_from / "tokenizer.model", tmp_path / "tokenizer.model")
    assert read_config(tmp_path).norm_head is norm_head
    assert variant_warnings() == []


def test_no_hint_at_all_warns_naming_config_json(tmp_path, variant_warnings):
    from baichuan_tune.models.checkpoint import read_config

    raw = dict(model_type="baichuan", vocab_size=70_001, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, model_max_length=512)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_config(tmp_path).norm_head is False
    [message] = variant_warnings()
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and "assuming a plain head" in message


# ----------------------------------------------------------------------------- absurd sizes


@pytest.mark.parametrize("field,value,limit", [
    ("num_hidden_layers", 10_000_000, "1,024"),
    ("hidden_size", 1_000_000_000, "65,536"),
    ("max_position_embeddings", 10**12, "1,048,576"),
    ("model_max_length", 10**12, "1,048,576"),
    ("vocab_size", 50_000_000, "1,048,576"),
    ("intermediate_size", 10**9, "262,144"),
    ("num_attention_heads", 4096, "1,024"),
])
def test_absurd_sizes_are_refused_before_anything_is_built(field, value, limit):
    with pytest.raises(ValueError, match=f"{field} is {value:,}; at most {limit} is supported"):
        BaichuanConfig(**{field: value})


def test_head_count_must_divide_the_width_and_rope_needs_an_even_head_dim():
    with pytest.raises(ValueError, match="hidden_size 100 is not divisible by num_attention_heads 3"):
        BaichuanConfig(hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="RoPE needs an even head_dim.* is 9"):
        BaichuanConfig(hidden_size=36, num_attention_heads=4, position_embedding="rope", norm_head=False)
    assert BaichuanConfig(hidden_size=36, num_attention_heads=4, position_embedding="alibi", norm_head=False)
