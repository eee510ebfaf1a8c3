"""`baichuan-tune chat`: multi-turn replies, /clear, /exit, streaming, and the options reaching generation.

Oracle: `model.chat` on the same conversations with greedy decoding (the command must keep the history
that the authors' API would be given, and forget it after /clear).
"""

from __future__ import annotations

import io
import re

import pytest
from conftest import tiny_model

from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.models.checkpoint import save_pretrained_atomic
from baichuan_tune.cli import main
from baichuan_tune.commands.chat import ChatSession, run
from baichuan_tune.serve.generation import chat_generation_config


@pytest.fixture
def tiny_chat(tmp_path):
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    model = tiny_model("tiny-baichuan2-7b", vocab_size=4096, intermediate_size=192)
    tokenizer = BaichuanTokenizer(vocab_file=str(DEFAULT_TOKENIZER))
    return model, tokenizer, save_pretrained_atomic(model, tokenizer, tmp_path / "tiny")


def replies(stdout: str) -> list[str]:
    return re.findall(r"Baichuan: (.*?)\n\nUser: ", stdout, flags=re.S)


def test_multi_turn_clear_and_exit(tiny_chat, monkeypatch, capsys):
    model, tokenizer, folder = tiny_chat
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nWhat is 3 plus 4?\n/clear\nWho are you?\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(folder), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    got = replies(out)
    u1, u2, u3 = "Hello there", "What is 3 plus 4?", "Who are you?"
    a1 = model.chat(tokenizer, [{"role": "user", "content": u1}], temperature=0, max_new_tokens=6)
    a2 = model.chat(tokenizer, [{"role": "user", "content": u1}, {"role": "assistant", "content": a1},
                                {"role": "user", "content": u2}], temperature=0, max_new_tokens=6)
    a3 = model.chat(tokenizer, [{"role": "user", "content": u3}], temperature=0, max_new_tokens=6)
    assert got == [a1, a2, a3]
    assert "(history cleared)" in out and "never read" not in out


def test_end_of_input_leaves(tiny_chat, monkeypatch, capsys):
    _, _, folder = tiny_chat
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n"))
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "3"]) == 0
    assert len(replies(capsys.readouterr().out + "\nUser: ")) == 1


def test_reply_is_streamed_piece_by_piece(tiny_chat):
    model, tokenizer, _ = tiny_chat
    session = ChatSession(model, tokenizer, chat_generation_config(model, temperature=0, max_new_tokens=12))
    pieces = []
    reply = session.ask("Tell me a story", pieces.append)
    assert len(pieces) > 3 and "".join(pieces) == reply
    assert session.history == [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": reply}]


def test_system_message_and_sampling_options_reach_generation(tiny_chat, monkeypatch):
    model, tokenizer, _ = tiny_chat
    config = chat_generation_config(model, temperature=0.7, top_k=3, top_p=0.5, max_new_tokens=4)
    session = ChatSession(model, tokenizer, config, system="You are terse.")
    seen = {}
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or real(**kw))
    lines = iter(["hi", "/quit"])
    run(session, read=lambda prompt: next(lines), write=lambda text: None)
    cfg = seen["generation_config"]
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.do_sample) == (0.7, 3, 0.5, 4, True)
    system_ids = tokenizer.encode("You are terse.", add_special_tokens=False)
    hi_ids = tokenizer.encode("hi", add_special_tokens=False)
    assert seen["input_ids"][0].tolist() == system_ids + [195] + hi_ids + [196]


def test_bad_options_get_one_clear_error(tiny_chat, capsys):
    _, _, folder = tiny_chat
    assert main(["chat", "--model", str(folder), "--quantization_bit", "3"]) == 2
    assert "--quantization_bit must be 4 or 8" in capsys.readouterr().err
    assert main(["chat", "--model", str(folder), "--max-new-tokens", "512"]) == 2  # the whole context (512)
    assert "max_new_tokens" in capsys.readouterr().err
    assert main(["chat", "--model", str(folder), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_quantize_option_loads_a_quantized_model(tiny_chat, monkeypatch, capsys):
    pytest.importorskip("bitsandbytes")
    from baichuan_tune.commands import chat as chat_command
    from baichuan_tune.models.quantize import is_quantized

    _, _, folder = tiny_chat
    sessions = []
    monkeypatch.setattr(chat_command, "run", lambda session: sessions.append(session))
    assert main(["chat", "--model", str(folder), "--quantization_bit", "8", "--device", "cpu"]) == 0
    assert is_quantized(sessions[0].model)
    reply = sessions[0].ask("hello", lambda text: None)
    assert isinstance(reply, str)
    assert main(["chat", "--model", str(folder), "--quantization_bit", "4"]) == 0  # the default device, auto
    assert is_quantized(sessions[1].model) and isinstance(sessions[1].ask("hello", lambda text: None), str)


def test_adapter_option_answers_as_peft_does(tiny_chat, tmp_path, monkeypatch, capsys):
    """Oracle: PEFT's own PeftModel.from_pretrained on the same base, then the authors' chat API."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from baichuan_tune.models.checkpoint import load_model

    model, tokenizer, folder = tiny_chat
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["W_pack", "down_proj"])
    get_peft_model(load_model(folder, dtype="fp32"), lora).save_pretrained(str(tmp_path / "adapter"))
    tuned = PeftModel.from_pretrained(load_model(folder, dtype="fp32"), str(tmp_path / "adapter")).get_base_model()
    question = [{"role": "user", "content": "Hello there"}]
    expected = tuned.chat(tokenizer, question, temperature=0, max_new_tokens=6)
    assert expected != model.chat(tokenizer, question, temperature=0, max_new_tokens=6)  # the adapter matters

    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/exit\n"))
    assert main(["chat", "--model", str(folder), "--adapter", str(tmp_path / "adapter"), "--temperature", "0",
                 "--max-new-tokens", "6"]) == 0
    assert replies(capsys.readouterr().out) == [expected]


def test_a_badly_encoded_line_is_refused_and_the_conversation_goes_on(tiny_chat):
    model, tokenizer, _ = tiny_chat
    session = ChatSession(model, tokenizer, chat_generation_config(model, temperature=0, max_new_tokens=4))
    lines = iter(["caf\udce9", "Hello", "/exit"])  # how Python hands over bytes it could not decode
    out = []
    run(session, read=lambda prompt: next(lines), write=out.append)
    assert "not valid UTF-8" in "".join(out)
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["Hello"]


def test_a_truncated_adapter_is_one_error_naming_it(tiny_chat, tmp_path, capsys):
    import torch
    from peft import LoraConfig, get_peft_model

    from baichuan_tune.models.checkpoint import load_model

    _, _, folder = tiny_chat
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["W_pack"])
    torch.manual_seed(3)
    get_peft_model(load_model(folder, dtype="fp32"), lora).save_pretrained(str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["chat", "--model", str(folder), "--adapter", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {weights}: corrupt or truncated safetensors file") and len(err.splitlines()) == 1
