"""Files the project writes get the permissions the umask gives (weights included), and atomic writes stay atomic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

UMASK = 0o027  # not the usual 022, so a hard-coded 0644 would show


@pytest.fixture
def umask():
    before = os.umask(UMASK)
    yield UMASK
    os.umask(before)


def modes(folder: Path) -> dict[str, int]:
    """{relative path: permission bits} of a folder and everything in it."""
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def assert_umask_modes(folder: Path, mask: int) -> None:
    expected = {name: (0o777 if (folder / name).is_dir() else 0o666) & ~mask for name in modes(folder)}
    assert modes(folder) == expected


def test_atomic_writes_respect_the_umask(umask, tmp_path):
    from baichuan_tune.io_utils import atomic_dir, atomic_write_bytes

    atomic_write_bytes(tmp_path / "a.bin", b"x")
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o640
    with atomic_dir(tmp_path / "out") as tmp:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors alone writes 0600
    assert_umask_modes(tmp_path / "out", umask)


def test_weights_checkpoints_and_adapters_get_the_umask_permissions(umask, tmp_path):
    from baichuan_tune.train.adapters import prepare_for_training
    from baichuan_tune.models.checkpoint import load_tokenizer, save_pretrained_atomic
    from baichuan_tune.builtin import default_model_dir
    from baichuan_tune.train.training import Checkpoints, save_final

    tokenizer = load_tokenizer(default_model_dir())
    save_pretrained_atomic(tiny_model(), tokenizer, tmp_path / "full")  # full weights (also export, sft full)
    assert {"model.safetensors", "config.json", "tokenizer.model"} <= set(modes(tmp_path / "full"))
    assert_umask_modes(tmp_path / "full", umask)

    model = prepare_for_training(tiny_model(), "lora", lora_target=["all"], lora_rank=2, lora_alpha=4.0,
                                 lora_dropout=0.0)
    out = tmp_path / "run"
    out.mkdir()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    Checkpoints(out, keep=2).save(1, model, optimizer, scheduler, None, {"epoch": 0, "batch": 1})
    save_final(model, tokenizer, out, "lora")  # PEFT writes the adapter through safetensors
    assert {"checkpoint-1/trainable.safetensors", "adapter_model.safetensors"} <= set(modes(out))
    assert_umask_modes(out, umask)


def test_tokenised_data_cache_gets_the_umask_permissions(umask, tmp_path):
    from baichuan_tune.builtin import default_model_dir
    from baichuan_tune.models.checkpoint import load_tokenizer
    from baichuan_tune.data.loading import load_sft_data

    load_sft_data(["demo"], load_tokenizer(default_model_dir()), max_samples=4, cache_dir=str(tmp_path / "cache"),
                  num_workers=1)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # train and eval sets
    assert_umask_modes(tmp_path / "cache", umask)
