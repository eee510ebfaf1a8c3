"""Baichuan <-> LLaMA maps, checked against transformers' own `LlamaForCausalLM` as the oracle.

FACTS.md: W_pack rows are q, then k, then v; Baichuan2's NormHead uses the row-normalised lm_head, so the
LLaMA head is that normalised matrix; ALiBi models have no LLaMA equivalent.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from baichuan_tune.models.convert import (
    baichuan_to_llama_config, baichuan_to_llama_state_dict, llama_to_baichuan_config, llama_to_baichuan_state_dict,
    rows_are_unit_norm,
)
from baichuan_tune.errors import CheckpointError
from baichuan_tune.models import BaichuanForCausalLM
from transformers import LlamaConfig, LlamaForCausalLM

ROPE_PRESETS = ["tiny-baichuan-7b", "tiny-baichuan2-7b"]
VARIANT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "rms_norm_eps", "rope_theta", "position_embedding", "norm_head",
                  "rotary_fp32", "bos_token_id", "eos_token_id", "pad_token_id")


def llama_names(layers: int) -> set[str]:
    """transformers' LlamaForCausalLM weight names, written out by hand."""
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(layers):
        names |= {f"model.layers.{i}.{n}.weight" for n in (
            "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    return names


def as_llama(model) -> LlamaForCausalLM:
    llama = LlamaForCausalLM(baichuan_to_llama_config(model.config)).eval()
    llama.load_state_dict(baichuan_to_llama_state_dict(model.state_dict(), model.config), strict=True)
    return llama


@pytest.mark.parametrize("preset", ROPE_PRESETS)
def test_w_pack_rows_split_into_q_k_v(preset):
    model = tiny_model(preset)
    state = model.state_dict()
    llama = baichuan_to_llama_state_dict(state, model.config)
    assert set(llama) == llama_names(model.config.num_hidden_layers)
    h = model.config.hidden_size
    for i in range(model.config.num_hidden_layers):
        w_pack = state[f"model.layers.{i}.self_attn.W_pack.weight"]
        assert torch.equal(llama[f"model.layers.{i}.self_attn.q_proj.weight"], w_pack[:h])
        assert torch.equal(llama[f"model.layers.{i}.self_attn.k_proj.weight"], w_pack[h:2 * h])
        assert torch.equal(llama[f"model.layers.{i}.self_attn.v_proj.weight"], w_pack[2 * h:])
    for name in set(state) & set(llama) - {"lm_head.weight"}:
        assert llama[name] is state[name]


def test_norm_head_is_normalised_once_for_llama_only_in_baichuan2():
    b2 = tiny_model("tiny-baichuan2-7b")
    head = b2.state_dict()["lm_head.weight"]
    llama_head = baichuan_to_llama_state_dict(b2.state_dict(), b2.config)["lm_head.weight"]
    by_hand = head / torch.linalg.vector_norm(head, dim=1, keepdim=True)
    torch.testing.assert_close(llama_head, by_hand, rtol=0, atol=1e-7)
    assert not rows_are_unit_norm(head) and rows_are_unit_norm(llama_head)
    b1 = tiny_model("tiny-baichuan-7b")
    assert torch.equal(baichuan_to_llama_state_dict(b1.state_dict(), b1.config)["lm_head.weight"],
                       b1.state_dict()["lm_head.weight"])


@pytest.mark.parametrize("preset", ROPE_PRESETS)
def test_llama_logits_equal_ours(preset):
    model = tiny_model(preset)
    llama = as_llama(model)
    ids = torch.randint(3, model.config.vocab_size, (3, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # right padding: both models give the real tokens positions 0..14
    mask[2, 9:] = 0
    with torch.no_grad():
        ours, theirs = model(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("preset", ROPE_PRESETS)
def test_round_trip_gives_identical_tensors_and_logits(preset):
    model = tiny_model(preset)
    llama_cfg = baichuan_to_llama_config(model.config)
    llama_state = baichuan_to_llama_state_dict(model.state_dict(), model.config)
    back_cfg = llama_to_baichuan_config(llama_cfg, norm_head=rows_are_unit_norm(llama_state["lm_head.weight"]))
    for field in VARIANT_FIELDS:
        assert getattr(back_cfg, field) == getattr(model.config, field), field
    back_state = llama_to_baichuan_state_dict(llama_state)
    original = model.state_dict()
    assert set(back_state) == set(original)
    for name, tensor in original.items():
        if name == "lm_head.weight" and model.config.norm_head:
            # stored normalised now; NormHead normalises it again to the same matrix
            torch.testing.assert_close(torch.nn.functional.normalize(back_state[name], dim=-1),
                                       torch.nn.functional.normalize(tensor, dim=-1), rtol=0, atol=1e-7)
        else:
            assert torch.equal(back_state[name], tensor), name
    back = BaichuanForCausalLM(back_cfg).eval()
    back.load_state_dict(back_state, strict=True)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-baichuan-13b", "tiny-baichuan2-13b"])
def test_alibi_models_are_refused(preset):
    model = tiny_model(preset)
    with pytest.raises(CheckpointError, match="ALiBi"):
        baichuan_to_llama_config(model.config)
    with pytest.raises(CheckpointError, match="ALiBi"):
        baichuan_to_llama_state_dict(model.state_dict(), model.config)


@pytest.mark.parametrize("change, problem", [
    (dict(num_key_value_heads=2), "grouped-query"),
    (dict(attention_bias=True), "biases"),
    (dict(hidden_act="gelu"), "activation"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "RoPE scaling"),
])
def test_llama_features_baichuan_lacks_are_refused(change, problem):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      vocab_size=64, **change)
    with pytest.raises(CheckpointError, match=problem):
        llama_to_baichuan_config(cfg, norm_head=False)


def test_llama_with_tied_head_and_incomplete_layers():
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      vocab_size=64, tie_word_embeddings=True)
    llama = LlamaForCausalLM(cfg)
    state = {k: v for k, v in llama.state_dict().items() if k != "lm_head.weight"}
    back = llama_to_baichuan_state_dict(state)
    assert torch.equal(back["lm_head.weight"], state["model.embed_tokens.weight"])
    del state["model.layers.0.self_attn.v_proj.weight"]
    with pytest.raises(CheckpointError, match="layer 0"):
        llama_to_baichuan_state_dict(state)
