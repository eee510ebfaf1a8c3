"""The scalar head: where it reads, how it is initialised, saving/loading checks, adapter switching."""

from __future__ import annotations

import json

import pytest
import torch

from baichuan_tune.errors import CheckpointError
from baichuan_tune.models.value_head import (HEAD_FILE, META_FILE, RewardModel, ValueHead, adapter_active, load_head,
                                      read_reward_meta)
from conftest import tiny_model


def test_reward_reads_the_last_non_padding_token():
    """Right padding leaves a score unchanged, and the score is head(hidden state at the last real token)."""
    model = RewardModel(tiny_model(), ValueHead(64)).eval()
    ids = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 9, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        batch = model(ids, mask)
        alone = model(ids[1:, :4], mask[1:, :4])
        hidden = model.lm.model(input_ids=ids[1:, :4]).last_hidden_state[0, 3]
    w, b = model.head.summary.weight[0], model.head.summary.bias[0]
    assert batch[1].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert alone[0].item() == pytest.approx(float(hidden @ w + b), abs=1e-5)


def test_reward_is_the_same_under_left_padding():
    """PPO scores left-padded prompt + answer rows: the score must equal that of the unpadded sequence."""
    torch.manual_seed(0)
    for preset in ("tiny-baichuan2-7b", "tiny-baichuan2-13b"):  # RoPE positions and ALiBi distances
        lm = tiny_model(preset)
        model = RewardModel(lm, ValueHead(lm.config.hidden_size)).eval()
        ids = torch.tensor([[1, 5, 6, 7, 2], [0, 0, 1, 8, 2]])
        mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        with torch.no_grad():
            batch = model(ids, mask)
            alone = model(ids[1:, 2:], mask[1:, 2:])
        assert batch[1].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_head_init_scale_and_fp32_under_autocast():
    torch.manual_seed(0)
    head = ValueHead(4095)
    # N(0, 1/(H+1)): the sample std of 4095 weights is within a few percent of 1/64
    assert head.summary.weight.std().item() == pytest.approx(1 / 64, rel=0.05)
    assert head.summary.bias.item() == 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert head(torch.randn(2, 3, 4095, dtype=torch.bfloat16)).dtype == torch.float32


def test_load_head_and_meta_errors(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(CheckpointError, match="value head file is missing"):
        load_head(tmp_path, 64)
    save_file({"summary.weight": torch.zeros(1, 32), "summary.bias": torch.zeros(1)}, str(tmp_path / HEAD_FILE))
    with pytest.raises(CheckpointError, match="hidden size 64"):
        load_head(tmp_path, 64)
    with pytest.raises(CheckpointError, match="not a reward model folder"):
        read_reward_meta(tmp_path)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_reward_meta(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"adapter": True, "base_model": "default"}))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        read_reward_meta(tmp_path)


def test_adapter_active_switches_and_restores():
    from peft import LoraConfig, get_peft_model

    lm = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["W_pack"]))
    lm.add_adapter("other", LoraConfig(r=2, target_modules=["W_pack"]))
    for name, p in lm.named_parameters():
        if "lora_B" in name and ".other." in name:
            p.data.normal_(0, 1.0)
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        plain = lm(input_ids=ids).logits
        with adapter_active(lm, "other"):
            assert lm.active_adapter == "other"
            switched = lm(input_ids=ids).logits
        again = lm(input_ids=ids).logits
    assert not torch.allclose(plain, switched)
    torch.testing.assert_close(again, plain)
    assert lm.active_adapter == "default"
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags
