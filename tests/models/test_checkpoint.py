"""Checkpoint loading, validation and saving against the published layout.

The oracle for names, shapes and files is FACTS.md ("Weight names", sharded `pytorch_model-0000N-of-0000M.bin`
with `pytorch_model.bin.index.json`): the helpers below write that layout with plain `torch.save` and
`json`, independently of the code under test, and check what the code under test writes against it.
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from conftest import need_shared, tiny_model

import baichuan_tune  # noqa: F401  (registers model_type baichuan)
from baichuan_tune.models.checkpoint import (
    load_model, load_model_and_tokenizer, load_tokenizer, parse_dtype, resolve_model_path, save_pretrained_atomic,
    validate_checkpoint,
)
from baichuan_tune.config import ConfigError
from baichuan_tune.errors import BaichuanTuneError, CheckpointError
from transformers import AutoModelForCausalLM

from published import PUBLISHED, TINY, published_shapes, shrunk_published_config, small_cfg, write_published_bin  # noqa: F401


@pytest.fixture
def good_ckpt(tmp_path):
    folder = tmp_path / "ckpt"
    write_published_bin(folder, small_cfg(), n_shards=3)
    return folder


def assert_error(exc_info, *parts):
    text = str(exc_info.value)
    for part in parts:
        assert str(part) in text, f"{part!r} not in {text!r}"


# ----------------------------------------------------------------------------- the published layout loads


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_layout_loads_as_published(shared_reference, tmp_path, name):
    cfg = shrunk_published_config(shared_reference, name)
    dtype = getattr(torch, cfg["torch_dtype"])  # bfloat16, Baichuan-7B float32
    tensors = write_published_bin(tmp_path / name, cfg, n_shards=2, dtype=dtype)
    auto = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype="auto")  # no trust_remote_code
    ours = load_model(tmp_path / name)
    for model in (auto, ours):
        assert type(model).__name__ == "BaichuanForCausalLM"
        assert (model.config.position_embedding, model.config.norm_head) == PUBLISHED[name]
        assert model.dtype == dtype
        state = model.state_dict()
        assert set(state) == set(tensors)
        for key, value in tensors.items():
            assert torch.equal(state[key], value), key


def test_checkpoint_written_here_uses_published_names_and_layout(tmp_path):
    model = tiny_model("tiny-baichuan2-7b")
    out = save_pretrained_atomic(model, None, tmp_path / "out", shard_size="60KB", safe_serialization=False)
    index = json.loads((out / "pytorch_model.bin.index.json").read_text())
    shards = sorted({p.name for p in out.glob("*.bin")})
    assert len(shards) > 2
    assert shards == [f"pytorch_model-{k:05d}-of-{len(shards):05d}.bin" for k in range(1, len(shards) + 1)]
    cfg = model.config.to_dict()
    expected = published_shapes(cfg)
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == set(shards)
    total = 0
    for shard in shards:
        state = torch.load(out / shard, weights_only=True)
        assert set(state) == {n for n, f in index["weight_map"].items() if f == shard}
        for name, tensor in state.items():
            assert tuple(tensor.shape) == expected[name], name
            assert torch.equal(tensor, model.state_dict()[name]), name
            total += tensor.numel() * tensor.element_size()
            # A shard holds its own tensors only, not a larger storage they were cut from.
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    assert index["metadata"]["total_size"] == total
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["torch_dtype"]) == (
        "baichuan", ["BaichuanForCausalLM"], "float32")


def test_published_config_round_trips_with_auto_map(shared_reference, tmp_path):
    cfg = shrunk_published_config(shared_reference, "baichuan2-13b-chat")
    write_published_bin(tmp_path / "src", cfg)
    model = load_model(tmp_path / "src")
    out = save_pretrained_atomic(model, None, tmp_path / "out", safe_serialization=False)
    saved = json.loads((out / "config.json").read_text())
    # The authors' code finds its classes through auto_map; the size fields it reads are kept as published.
    assert saved["auto_map"] == cfg["auto_map"]
    for key in ("model_max_length", "hidden_size", "num_attention_heads", "vocab_size", "torch_dtype"):
        assert saved[key] == cfg[key], key
    again = load_model(out)
    assert (again.config.position_embedding, again.config.norm_head) == ("alibi", True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_safetensors_round_trip_keeps_logits(tmp_path):
    model = tiny_model("tiny-baichuan-13b")
    out = save_pretrained_atomic(model, None, tmp_path / "out", shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file() and not list(out.glob("*.bin"))
    loaded = load_model(out)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_save_dtype_casts_the_files_and_the_config(tmp_path):
    model = tiny_model("tiny-baichuan2-7b")
    out = save_pretrained_atomic(model, None, tmp_path / "out", dtype="bf16", safe_serialization=False)
    state = torch.load(out / "pytorch_model.bin", weights_only=True)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not changed
    assert load_model(out).dtype == torch.bfloat16


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    out = save_pretrained_atomic(tiny_model("tiny-baichuan-7b"), None, tmp_path / "out", safe_serialization=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def failing_save(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    real_save = torch.save
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained_atomic(tiny_model("tiny-baichuan-7b", seed=1), None, out, shard_size="50KB",
                               safe_serialization=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_save_refuses_a_peft_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model(), LoraConfig(r=2, target_modules=["W_pack"]))
    with pytest.raises(BaichuanTuneError, match="merge"):
        save_pretrained_atomic(peft_model, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- validation: one clear error


def test_validate_reports_what_it_found(good_ckpt):
    info = validate_checkpoint(good_ckpt)
    assert info.format == "bin" and len(info.files) == 3
    assert info.total_bytes == sum(f.stat().st_size for f in info.files)
    assert info.config.norm_head is True


def test_missing_folder_and_file_instead_of_folder(tmp_path, good_ckpt):
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(tmp_path / "nope")
    assert_error(exc, tmp_path / "nope", "not found")
    with pytest.raises(CheckpointError) as exc:
        resolve_model_path("baichuan-inc/Baichuan2-7B-Chat")
    assert_error(exc, "not downloaded")
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt / "config.json")
    assert_error(exc, "is a file")


def test_folder_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(tmp_path / "empty")
    assert_error(exc, tmp_path / "empty" / "config.json", "missing")


@pytest.mark.parametrize("model_type, hint", [("llama", "convert"), ("gpt2", "not 'baichuan'"), (None, "not 'baichuan'")])
def test_folder_of_another_model_type(good_ckpt, model_type, hint):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    (good_ckpt / "config.json").write_text(json.dumps(cfg | {"model_type": model_type}))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, good_ckpt / "config.json", repr(model_type), hint)


def test_config_that_is_not_json(good_ckpt):
    (good_ckpt / "config.json").write_text('{"model_type": "baichuan",')
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, good_ckpt / "config.json", "not valid JSON")


def test_unknown_dtype_in_config(good_ckpt):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    (good_ckpt / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "float7"}))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, good_ckpt / "config.json", "float7")


@pytest.mark.parametrize("field,value", [("hidden_size", "32"), ("num_attention_heads", 0), ("num_hidden_layers", -1),
                                         ("vocab_size", None), ("rope_theta", "abc"), ("max_position_embeddings", 1.5)])
def test_config_sizes_that_cannot_build_a_model(good_ckpt, field, value):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    (good_ckpt / "config.json").write_text(json.dumps(cfg | {field: value}))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, good_ckpt / "config.json", field, repr(value))


@contextmanager
def fails_fast(seconds: int = 30):
    """Turn a hang (a model of 10,000,000 layers being built) into a test failure."""
    import signal

    def hung(signum, frame):
        raise AssertionError(f"still running after {seconds}s: the size was not bounded before building")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("field,value,limit", [
    ("num_hidden_layers", 10_000_000, "1,024"),  # hung the load while memory grew
    ("hidden_size", 1_000_000_000, "65,536"),  # RuntimeError: Storage size calculation overflowed
    ("max_position_embeddings", 10**12, "1,048,576"),  # was accepted
    ("vocab_size", 10**8, "1,048,576"),
])
def test_absurd_config_sizes_are_one_error_naming_config_json(good_ckpt, field, value, limit):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    (good_ckpt / "config.json").write_text(json.dumps(cfg | {field: value}))
    with fails_fast(), pytest.raises(CheckpointError) as exc:
        load_model_and_tokenizer(good_ckpt)
    assert_error(exc, f"{good_ckpt / 'config.json'}: {field} is {value:,}; at most {limit} is supported")
    from baichuan_tune.models import BaichuanConfig

    with fails_fast(), pytest.raises(ValueError, match=f"{field} is {value:,}; at most {limit}"):
        BaichuanConfig.from_pretrained(good_ckpt)  # transformers' own path reads the same bounds


@pytest.mark.parametrize("fields,message", [
    (dict(hidden_size=30, num_attention_heads=4), "hidden_size 30 is not divisible by num_attention_heads 4"),
    (dict(hidden_size=36, num_attention_heads=4), "RoPE needs an even head_dim"),
])
def test_head_sizes_that_cannot_work_name_config_json(good_ckpt, fields, message):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    (good_ckpt / "config.json").write_text(json.dumps(cfg | fields))
    with pytest.raises(CheckpointError) as exc:
        load_model_and_tokenizer(good_ckpt)
    assert_error(exc, good_ckpt / "config.json", message)


def test_resized_baichuan2_folder_saved_by_the_authors_code_loads_with_normhead(shared_reference, tmp_path):
    """Tokens added and saved by the authors' code (their config class writes z_loss_weight; no norm_head): the
    logits are those of the normalised head (FACTS.md, NormHead), not of a plain one."""
    from baichuan_tune.models.modeling_baichuan import NormHead

    cfg = shrunk_published_config(shared_reference, "baichuan2-7b-chat")
    cfg |= {"vocab_size": 130, "z_loss_weight": 0, "transformers_version": "4.33.3", "torch_dtype": "float32"}
    tensors = write_published_bin(tmp_path / "resized", cfg, dtype=torch.float32)
    model = load_model(tmp_path / "resized")
    assert isinstance(model.lm_head, NormHead)
    ids = torch.tensor([[1, 5, 99, 129]])
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        expected = hidden @ torch.nn.functional.normalize(tensors["lm_head.weight"], dim=-1).T
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("shard", [5, "", "../elsewhere/pytorch_model-00001-of-00003.bin"])
def test_index_naming_something_other_than_a_shard_beside_it(good_ckpt, shard):
    index_file = good_ckpt / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = shard
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, index_file, "model.norm.weight", repr(shard))


def test_index_naming_a_missing_shard(good_ckpt):
    (good_ckpt / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, good_ckpt / "pytorch_model.bin.index.json", "pytorch_model-00002-of-00003.bin", "missing")


def test_index_pointing_a_tensor_at_the_wrong_shard(good_ckpt):
    index_file = good_ckpt / "pytorch_model.bin.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["model.norm.weight"] = next(
        f for f in sorted(set(index["weight_map"].values())) if f != index["weight_map"]["model.norm.weight"])
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, index_file, "model.norm.weight", "not there")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_bin_shard(good_ckpt, damage):
    shard = good_ckpt / "pytorch_model-00003-of-00003.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a torch file" * 100)
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, shard, "corrupt or truncated")


def test_truncated_safetensors_shard(tmp_path):
    out = save_pretrained_atomic(tiny_model(), None, tmp_path / "out", shard_size="100KB")
    shard = sorted(out.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(out)
    assert_error(exc, shard, "corrupt or truncated")


def test_shard_holding_pickled_code_is_refused(good_ckpt):
    shard = good_ckpt / "pytorch_model-00001-of-00003.bin"
    state = torch.load(shard, weights_only=True)
    torch.save(state | {"payload": CheckpointInfoLike()}, shard)
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, shard, "weights_only")


class CheckpointInfoLike:
    """An arbitrary Python object: unpickling it would run code, which weights_only loading refuses."""


def test_tensor_with_wrong_shape(good_ckpt):
    index = json.loads((good_ckpt / "pytorch_model.bin.index.json").read_text())
    name = "model.layers.1.self_attn.W_pack.weight"
    shard = good_ckpt / index["weight_map"][name]
    state = torch.load(shard, weights_only=True)
    state[name] = torch.zeros(3 * 32, 16, dtype=torch.bfloat16)
    torch.save(state, shard)
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, shard, name, "[96, 16]", "[96, 32]", "config.json")


def test_config_that_does_not_match_the_weights(good_ckpt):
    cfg = json.loads((good_ckpt / "config.json").read_text())
    (good_ckpt / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 80}))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, "mlp.", "[80, 32]", "[64, 32]")


def test_missing_weight(tmp_path):
    folder = tmp_path / "ckpt"
    tensors = write_published_bin(folder, small_cfg(), n_shards=1)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    torch.save(tensors, folder / "pytorch_model-00001-of-00001.bin")
    index = json.loads((folder / "pytorch_model.bin.index.json").read_text())
    del index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(folder)
    assert_error(exc, folder, "1 weights missing", "model.layers.1.mlp.up_proj.weight")


def test_llama_named_weights_under_a_baichuan_config(tmp_path):
    folder = tmp_path / "ckpt"
    tensors = write_published_bin(folder, small_cfg(), n_shards=1)
    for layer in range(2):
        w_pack = tensors.pop(f"model.layers.{layer}.self_attn.W_pack.weight")
        for part, block in zip(("q_proj", "k_proj", "v_proj"), w_pack.chunk(3)):
            tensors[f"model.layers.{layer}.self_attn.{part}.weight"] = block.clone()
    (folder / "pytorch_model.bin.index.json").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "pytorch_model-00001-of-00001.bin").unlink()
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(folder)
    assert_error(exc, "W_pack", "LLaMA layout", "convert --to baichuan")


def test_unknown_extra_tensor_is_an_error_but_rotary_buffers_are_not(tmp_path):
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}
    folder = tmp_path / "ok"
    tensors = write_published_bin(folder, small_cfg(), n_shards=2, extra=extra)
    model = load_model(folder)  # older RoPE checkpoints carry inv_freq; it is recomputed
    assert torch.equal(model.state_dict()["model.norm.weight"], tensors["model.norm.weight"])
    bad = tmp_path / "bad"
    write_published_bin(bad, small_cfg(), n_shards=2, extra={"lm_head.bias": torch.zeros(96)})
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(bad)
    assert_error(exc, "lm_head.bias", "not part of a Baichuan model")


def test_folder_without_weights(good_ckpt):
    for f in good_ckpt.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError) as exc:
        validate_checkpoint(good_ckpt)
    assert_error(exc, good_ckpt, "no weights found", "pytorch_model.bin.index.json")


def test_load_model_validates_before_reading_weights(good_ckpt, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("from_pretrained ran on an invalid checkpoint")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", must_not_run)
    (good_ckpt / "pytorch_model-00001-of-00003.bin").unlink()
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00003.bin"):
        load_model(good_ckpt)


# ----------------------------------------------------------------------------- dtypes, devices, options


def test_parse_dtype_names():
    assert parse_dtype("fp32") is parse_dtype("float32") is torch.float32
    assert parse_dtype("bf16") is parse_dtype("bfloat16") is parse_dtype("BF16") is torch.bfloat16
    assert parse_dtype("fp16") is parse_dtype("float16") is parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto") == parse_dtype(None) == "auto"
    with pytest.raises(ConfigError) as exc:
        parse_dtype("int4")
    assert_error(exc, "int4", "fp32", "bf16", "fp16", "auto")


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("fp16", torch.float16), ("auto", torch.bfloat16)])
def test_load_model_dtype(good_ckpt, dtype, expected):
    model = load_model(good_ckpt, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert not model.training


def test_load_model_bad_options(good_ckpt):
    with pytest.raises(BaichuanTuneError, match="quantize must be 4 or 8"):
        load_model(good_ckpt, quantize=3)
    with pytest.raises(ConfigError, match="device"):
        load_model(good_ckpt, device="tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            load_model(good_ckpt, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_model_on_cuda(good_ckpt):
    model = load_model(good_ckpt, dtype="bf16", device="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}


def test_quantized_4bit_load(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    # bitsandbytes' CPU kernels quantise blocks of 64 along the input dimension.
    folder = tmp_path / "ckpt"
    write_published_bin(folder, small_cfg(hidden_size=64, intermediate_size=128))
    model = load_model(folder, quantize=4)
    w_pack = model.model.layers[0].self_attn.W_pack
    assert isinstance(w_pack, bnb.nn.Linear4bit)
    q = model.config.quantization_config
    assert (q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == ("nf4", True, torch.bfloat16)
    reference = load_model(folder, dtype="fp32")
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        got, want = model(ids).logits.float(), reference(ids).logits
    # NF4 keeps the function close: logits stay strongly correlated with the full-precision ones.
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.9


def test_adapter_is_loaded_on_top(good_ckpt, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(good_ckpt, dtype="fp32")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["W_pack", "o_proj"]))
    torch.manual_seed(0)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)  # a trained-looking adapter that changes the output
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        want = peft_model.eval()(ids).logits
        plain = load_model(good_ckpt, dtype="fp32")(ids).logits
        got = load_model(good_ckpt, dtype="fp32", adapter=tmp_path / "adapter")(ids).logits
    assert not torch.allclose(plain, want)
    torch.testing.assert_close(got, want)
    with pytest.raises(CheckpointError) as exc:
        load_model(good_ckpt, adapter=tmp_path)
    assert_error(exc, tmp_path / "adapter_config.json", "not a PEFT adapter folder")


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("name, ids", [("baichuan2-13b-chat", [23160, 2063]), ("baichuan-7b", [24568, 1275])])
def test_load_tokenizer_of_a_published_folder(shared_reference, tmp_path, name, ids):
    folder = tmp_path / name
    shutil.copytree(need_shared(shared_reference / name), folder)
    tokenizer = load_tokenizer(folder)
    assert tokenizer("Hello world").input_ids == ids  # FACTS.md tokenizer table


def test_corrupt_or_missing_tokenizer_model(shared_reference, tmp_path, good_ckpt, monkeypatch):
    shutil.copyfile(need_shared(shared_reference / "baichuan2-13b-chat" / "tokenizer_config.json"),
                    good_ckpt / "tokenizer_config.json")
    with pytest.raises(CheckpointError) as exc:
        load_tokenizer(good_ckpt)
    assert_error(exc, good_ckpt / "tokenizer.model", "missing")
    (good_ckpt / "tokenizer.model").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(CheckpointError) as exc:
        load_tokenizer(good_ckpt)
    assert_error(exc, good_ckpt / "tokenizer.model", "not a valid SentencePiece")

    def must_not_run(*args, **kwargs):
        raise AssertionError("weights loaded before the tokenizer was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", must_not_run)
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_model_and_tokenizer(good_ckpt)


def test_save_and_load_model_with_tokenizer(shared_reference, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(need_shared(shared_reference / "baichuan2-13b-chat"), src)
    write_published_bin(src, shrunk_published_config(shared_reference, "baichuan2-13b-chat"))
    model, tokenizer = load_model_and_tokenizer(src, dtype="fp32")
    out = save_pretrained_atomic(model, tokenizer, tmp_path / "out", dtype="bf16")
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "special_tokens_map.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "generation_config.json").read_text())["user_token_id"] == 195
    model2, tokenizer2 = load_model_and_tokenizer(out)
    assert model2.dtype == torch.bfloat16
    assert tokenizer2("世界上第二高的山峰是哪座").input_ids == [8352, 2382, 4767, 67740, 63687, 93110]


def test_default_model_resolves_to_the_builtin_folder():
    from baichuan_tune import builtin

    if not builtin.DEFAULT_TOKENIZER.is_file():
        pytest.skip("the built-in tokenizer asset is not built yet (baichuan-tune tokenizer train --builtin)")
    path = resolve_model_path("default")
    assert path == builtin.default_model_dir()
    assert validate_checkpoint(path).config.norm_head is True


def test_generation_settings_are_saved_even_when_transformers_finds_them_inconsistent(tmp_path):
    model = tiny_model()
    for key, value in dict(user_token_id=195, temperature=0.3, top_k=5, do_sample=False).items():  # greedy chat
        setattr(model.generation_config, key, value)
    out = save_pretrained_atomic(model, None, tmp_path / "out")
    saved = json.loads((out / "generation_config.json").read_text())
    assert (saved["user_token_id"], saved["temperature"], saved["top_k"]) == (195, 0.3, 5)


def test_four_bit_compute_dtype_follows_an_fp16_run():
    pytest.importorskip("bitsandbytes")
    from baichuan_tune.models.checkpoint import _quantization_config

    assert _quantization_config(4, torch.float16).bnb_4bit_compute_dtype == torch.float16
    assert _quantization_config(4, torch.float32).bnb_4bit_compute_dtype == torch.bfloat16
    assert _quantization_config(None, torch.float16) is None
