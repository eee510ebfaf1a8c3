"""`baichuan-tune convert`: the written LLaMA folder loads in transformers' `LlamaForCausalLM.from_pretrained`
with the same logits as ours, dtype and shard size are honoured, and bad input gives one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from published import shrunk_published_config, write_published_bin

from baichuan_tune.models.checkpoint import load_model, save_pretrained_atomic
from baichuan_tune.cli import main
from transformers import LlamaForCausalLM


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture
def saved(tmp_path):
    def make(preset, **kw):
        model = tiny_model(preset)
        return model, save_pretrained_atomic(model, None, tmp_path / preset, **kw)

    return make


@pytest.mark.parametrize("preset", ["tiny-baichuan-7b", "tiny-baichuan2-7b"])
def test_llama_folder_loads_in_transformers_with_our_logits(saved, tmp_path, preset):
    model, src = saved(preset)
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "llama"), "--to", "llama"]) == 0
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert (config["model_type"], config["architectures"]) == ("llama", ["LlamaForCausalLM"])
    assert "auto_map" not in config
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 19))
    assert (logits(llama, ids) - logits(model, ids)).abs().max().item() <= 1e-4


def test_published_bin_checkpoint_converts(shared_reference, tmp_path):
    src = tmp_path / "published"
    write_published_bin(src, shrunk_published_config(shared_reference, "baichuan2-7b-chat"), dtype=torch.float32)
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "llama"), "--to", "llama"]) == 0
    ours = load_model(src)
    assert ours.config.norm_head  # Baichuan2-7B: NormHead, normalised on the way to LLaMA
    ids = torch.randint(0, ours.config.vocab_size, (1, 11))
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    assert (logits(llama, ids) - logits(ours, ids)).abs().max().item() <= 1e-4


def test_dtype_and_shard_size_are_honoured(saved, tmp_path):
    _, src = saved("tiny-baichuan2-7b")
    out = tmp_path / "llama"
    argv = ["convert", "--model", str(src), "--output_dir", str(out), "--to", "llama", "--dtype", "bf16", "--shard-size", "100KB"]
    assert main(argv) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        assert size <= 100_000 or len(tensors) == 1  # a single tensor larger than the limit gets its own shard
        total += size
    assert index["metadata"]["total_size"] == total
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert LlamaForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["tiny-baichuan-7b", "tiny-baichuan2-7b"])
def test_round_trip_through_llama_to_published_bin(saved, tmp_path, preset):
    model, src = saved(preset)
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "llama"), "--to", "llama"]) == 0
    argv = ["convert", "--model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "back"), "--to", "baichuan",
            "--safetensors", "false", "--shard-size", "200KB"]
    assert main(argv) == 0
    assert (tmp_path / "back" / "pytorch_model.bin.index.json").is_file()
    back = load_model(tmp_path / "back")
    assert (back.config.norm_head, back.config.rotary_fp32) == (model.config.norm_head, model.config.rotary_fp32)
    for name, tensor in model.state_dict().items():
        if name != "lm_head.weight" or not model.config.norm_head:
            assert torch.equal(back.state_dict()[name], tensor), name
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=1e-5)


def test_baichuan_resave_changes_format_only(saved, tmp_path):
    model, src = saved("tiny-baichuan2-13b", safe_serialization=False)
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "st"), "--to", "baichuan"]) == 0
    assert (tmp_path / "st" / "model.safetensors").is_file()
    again = load_model(tmp_path / "st")
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_tokenizer_files_travel_with_the_weights(shared_reference, tmp_path):
    src = tmp_path / "src"
    write_published_bin(src, shrunk_published_config(shared_reference, "baichuan2-7b-chat"))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (src / name).write_bytes((shared_reference / "baichuan2-13b-chat" / name).read_bytes())
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "llama"), "--to", "llama"]) == 0
    out = tmp_path / "llama"
    assert (out / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config and tok_config["tokenizer_class"] == "BaichuanTokenizer"


@pytest.mark.parametrize("argv_tail, message", [
    (["--to", "llama"], "ALiBi"),
    (["--to", "llama", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["--to", "llama", "--shard-size", "5XB"], "shard size '5XB'"),
    (["--to", "gpt2"], "'to' must be one of"),
    (["--too", "llama"], "did you mean 'to'"),
])
def test_bad_input_is_one_clear_error(saved, tmp_path, capsys, argv_tail, message):
    _, src = saved("tiny-baichuan2-13b")
    out = tmp_path / "out"
    assert main(["convert", "--model", str(src), "--output_dir", str(out), *argv_tail]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_or_same_folders(saved, tmp_path, capsys):
    _, src = saved("tiny-baichuan-7b")
    assert main(["convert", "--model", str(src)]) == 2
    assert "--output_dir is required" in capsys.readouterr().err
    assert main(["convert", "--model", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "o")]) == 2
    assert "model folder not found" in capsys.readouterr().err
    assert main(["convert", "--model", str(src), "--output_dir", str(src)]) == 2
    assert "is the --model folder" in capsys.readouterr().err
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "llama")]) == 0
    # an existing folder is replaced whole, so it takes --overwrite_output_dir true
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "llama")]) == 2
    assert "not empty; pass --overwrite_output_dir true" in capsys.readouterr().err
    assert (tmp_path / "llama" / "config.json").is_file()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "busy")]) == 2
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert main(["convert", "--model", str(src), "--output_dir", str(tmp_path / "busy"), "--overwrite_output_dir", "true"]) == 0
    assert (tmp_path / "busy" / "config.json").is_file() and not (tmp_path / "busy" / "notes.txt").exists()
    assert main(["convert", "--model", str(tmp_path / "llama"), "--output_dir", str(tmp_path / "x"), "--to", "llama"]) == 2
    assert "already in the LLaMA layout" in capsys.readouterr().err


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for option in ("--model", "--output_dir", "--to", "--dtype", "--shard_size", "--safetensors"):
        assert option in text
