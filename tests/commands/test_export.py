"""`baichuan-tune export`: LoRA merged into the base gives the logits of base + adapter, in the published layout.

Oracle: PEFT's own `PeftModel` (base + unmerged adapter) for the logits; FACTS.md's weight names (written by
the independent helpers of test_checkpoint) for the layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from published import published_shapes, small_cfg, write_published_bin

from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.models.checkpoint import load_model, load_model_and_tokenizer
from baichuan_tune.cli import main

AUTO_MAP = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
            "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
REMOTE_CODE = b"# the authors' modeling file would be here; export copies it byte for byte\n"


def make_base(folder, **overrides):
    """A base checkpoint as published: .bin shards + index, auto_map into remote code, a tokenizer."""
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    cfg = small_cfg(auto_map=AUTO_MAP, torch_dtype="float32", **overrides)
    tensors = write_published_bin(folder, cfg, n_shards=2, dtype=torch.float32)
    (folder / "modeling_baichuan.py").write_bytes(REMOTE_CODE)
    BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER)).save_pretrained(str(folder))
    return cfg, tensors


def make_adapter(base_dir, out_dir):
    """A LoRA adapter with random (non-zero) A and B on every decoder Linear."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                      target_modules=["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(load_model(base_dir, dtype="fp32"), lora)
    model.save_pretrained(str(out_dir))


@pytest.fixture
def base_and_adapter(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    cfg, tensors = make_base(base)
    make_adapter(base, adapter)
    return base, adapter, cfg, tensors


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_logits_equal_base_plus_adapter(base_and_adapter, tmp_path):
    base, adapter, cfg, tensors = base_and_adapter
    out = tmp_path / "merged"
    argv = ["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(out), "--dtype", "fp32",
            "--shard-size", "100KB"]
    assert main(argv) == 0
    ids = torch.randint(3, cfg["vocab_size"], (2, 17), generator=torch.Generator().manual_seed(0))
    reference = load_model(base, dtype="fp32", adapter=adapter)  # PEFT, unmerged
    merged, tokenizer = load_model_and_tokenizer(out)
    assert not hasattr(merged, "peft_config") and tokenizer.vocab_size == 4096
    expected, got = logits(reference, ids), logits(merged, ids)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert (logits(load_model(base, dtype="fp32"), ids) - expected).abs().max().item() > 1e-2  # the adapter matters


def test_output_has_the_published_layout(base_and_adapter, tmp_path):
    base, adapter, cfg, tensors = base_and_adapter
    out = tmp_path / "merged"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(out),
                 "--shard-size", "20KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    names, dtypes = set(), set()
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                names.add(name)
                dtypes.add(tensor.dtype)
                assert tuple(tensor.shape) == published_shapes(cfg)[name]
    assert names == set(published_shapes(cfg)) == set(index["weight_map"])  # no lora_*, no base_model.* prefix
    assert dtypes == {torch.bfloat16}  # --dtype bf16 is the default
    with safe_open(str(out / index["weight_map"]["lm_head.weight"]), framework="pt") as f:
        # NormHead is stored un-normalised, as published; the authors' code normalises it when it runs.
        assert torch.equal(f.get_tensor("lm_head.weight"), tensors["lm_head.weight"].to(torch.bfloat16))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BaichuanForCausalLM"] and config["model_type"] == "baichuan"
    assert config["auto_map"] == AUTO_MAP and config["torch_dtype"] == "bfloat16"
    assert (out / "modeling_baichuan.py").read_bytes() == REMOTE_CODE
    for name in ("generation_config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()


def test_published_bin_format_on_request(base_and_adapter, tmp_path):
    base, adapter, cfg, _ = base_and_adapter
    out = tmp_path / "merged"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(out),
                 "--safetensors", "false", "--shard-size", "100KB", "--dtype", "fp32"]) == 0
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    assert all(f.startswith("pytorch_model-") and f.endswith(".bin") for f in index["weight_map"].values())
    assert set(index["weight_map"]) == set(published_shapes(cfg))


def test_quantised_base_is_refused(base_and_adapter, tmp_path, capsys):
    base, adapter, _, _ = base_and_adapter
    out = tmp_path / "merged"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(out), "--quantization_bit", "4"]) == 2
    assert "full-precision base" in capsys.readouterr().err and not out.exists()
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "quantised" in err and not out.exists()


def test_bad_requests_get_one_clear_error(base_and_adapter, tmp_path, capsys):
    base, adapter, _, _ = base_and_adapter
    assert main(["export", "--model", str(base), "--output_dir", str(tmp_path / "x")]) == 2
    assert "--adapter is required" in capsys.readouterr().err
    assert main(["export", "--model", str(base), "--adapter", str(base), "--output_dir", str(tmp_path / "x")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err and (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


class Pickled:
    """Any Python object: unpickling one can run code, which weights_only loading refuses."""


@pytest.mark.parametrize("damage", ["truncated", "pickled-bin"])
def test_a_broken_adapter_file_is_one_error_naming_it(base_and_adapter, tmp_path, capsys, damage):
    base, adapter, _, _ = base_and_adapter
    weights = adapter / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
        expected = f"error: {weights}: corrupt or truncated safetensors file"
    else:  # an adapter_model.bin (PEFT's older format) that carries a pickled object besides its tensors
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)) | {"payload": Pickled()}, adapter / "adapter_model.bin")
        weights.unlink()
        expected = (f"error: {adapter / 'adapter_model.bin'}: holds pickled objects other than tensors "
                    f"({Pickled.__module__}.Pickled); refused: unpickling them could run code from the file")
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--output_dir", str(tmp_path / "merged")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(expected) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "merged").exists()
