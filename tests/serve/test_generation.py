"""Chat prompts, generation defaults and streaming against the published Chat models' behaviour.

The oracle for prompt ids is the authors' rule written out by hand in each test, with token ids taken
from FACTS.md's tokenizer table (not from the tokenizer under test):
- Baichuan2-Chat: [system] + 195 user 196 assistant ... + 196; budget model_max_length - max_new_tokens;
  whole old rounds dropped first, the newest round always kept, then left truncation.
- Baichuan-13B-Chat: same ids, budget max(L // 2, L - max_new_tokens), no system role. Its published
  `_build_chat_input` also puts eos (2) after every assistant reply of the history; FACTS.md's "the same"
  leaves that out, the authors' code has it, and the tests follow the code.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from baichuan_tune.serve.generation import (
    ChatFormatError,
    IncrementalDecoder,
    StopText,
    build_chat_input,
    chat_generation_config,
    chat_prompt_ids,
    generate_text,
)
from conftest import benchmark_script, tiny_model

# FACTS.md, "Tokenizers": the same three strings in both tokenizers.
Q1, A1, Q2 = "世界上第二高的山峰是哪座", "12345", "Hello world"
B2 = {Q1: [8352, 2382, 4767, 67740, 63687, 93110], A1: [92336, 92338, 92354, 92369, 92358], Q2: [23160, 2063]}
B1 = {Q1: [31106, 13839, 3268, 7464, 31452, 32312, 31161, 31853, 31951], A1: [31106, 53, 54, 55, 56, 57], Q2: [24568, 1275]}
U, A, EOS = 195, 196, 2


def _tokenizer(reference, folder):
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer.from_pretrained(reference / folder)


@pytest.fixture
def b2_tok(shared_reference):
    return _tokenizer(shared_reference, "baichuan2-13b-chat")


@pytest.fixture
def b1_tok(shared_reference):
    # Baichuan-13B-Chat ships no tokenizer.model; the Base model's is the same file.
    return _tokenizer(shared_reference, "baichuan-13b-base")


def conv(*texts, system=None):
    roles = ["user", "assistant"]
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": roles[i % 2], "content": t} for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------- prompt ids


def test_baichuan2_multi_turn_prompt(b2_tok):
    ids = build_chat_input(b2_tok, conv(Q1, A1, Q2), model_max_length=4096, max_new_tokens=2048)
    assert ids == [U, *B2[Q1], A, *B2[A1], U, *B2[Q2], A]
    with_system = build_chat_input(b2_tok, conv(Q1, A1, Q2, system=Q2), model_max_length=4096, max_new_tokens=2048)
    assert with_system == [*B2[Q2], U, *B2[Q1], A, *B2[A1], U, *B2[Q2], A]
    # A conversation that ends with the assistant gets no extra 196 (continuation of that reply).
    assert build_chat_input(b2_tok, conv(Q1, A1), model_max_length=4096, max_new_tokens=2048) == [U, *B2[Q1], A, *B2[A1]]


def test_baichuan13b_multi_turn_prompt(b1_tok):
    ids = build_chat_input(b1_tok, conv(Q1, A1, Q2), model_max_length=4096, max_new_tokens=2048, fmt="baichuan")
    assert ids == [U, *B1[Q1], A, *B1[A1], EOS, U, *B1[Q2], A]
    with pytest.raises(ChatFormatError, match="no system role"):
        build_chat_input(b1_tok, conv(Q1, system=Q2), model_max_length=4096, max_new_tokens=2048, fmt="baichuan")


def test_baichuan2_long_history_trimmed(b2_tok):
    r1 = [U, *B2[Q1], A, *B2[A1]]  # 13 tokens
    r2 = [U, *B2[Q2], A, *B2[A1]]  # 9
    r3 = [U, *B2[Q1]]  # 7 (+ the final 196)
    messages = conv(Q1, A1, Q2, A1, Q1)

    def ids(context, new):
        return build_chat_input(b2_tok, messages, model_max_length=context, max_new_tokens=new)

    assert ids(60, 20) == r1 + r2 + r3 + [A]  # budget 40: everything fits
    assert ids(40, 20) == r2 + r3 + [A]  # budget 20: r1 (13) no longer fits after 16 tokens
    # Budget 16: r3 + r2 fill it exactly, then 196 makes 17 and the prompt is cut on the left.
    assert ids(36, 20) == (r2 + r3 + [A])[-16:] == r2[1:] + r3 + [A]
    # The newest round alone is longer than the budget: it is kept, then left-truncated.
    assert ids(25, 20) == [4767, 67740, 63687, 93110, A]
    with_system = build_chat_input(b2_tok, conv(Q1, A1, Q2, A1, Q1, system=Q2), model_max_length=40, max_new_tokens=20)
    # The system tokens (2) come out of the budget: 18 left for history, r2 + r3 = 16 fits, r1 does not.
    assert with_system == B2[Q2] + r2 + r3 + [A]
    with pytest.raises(ChatFormatError, match="max_new_tokens"):
        ids(40, 40)


def test_baichuan13b_long_history_trimmed(b1_tok):
    r1 = [U, *B1[Q1], A, *B1[A1], EOS]  # 18 tokens
    r2 = [U, *B1[Q2], A, *B1[A1], EOS]  # 11
    r3 = [U, *B1[Q1]]  # 10
    messages = conv(Q1, A1, Q2, A1, Q1)

    def ids(context, new):
        return build_chat_input(b1_tok, messages, model_max_length=context, max_new_tokens=new, fmt="baichuan")

    assert ids(60, 10) == r1 + r2 + r3 + [A]  # budget 50
    assert ids(40, 5) == r2 + r3 + [A]  # budget 35: r1 would make 39
    # max_new_tokens 30 of 40 would leave 10; the 13B rule keeps at least half the context (20).
    assert ids(40, 30) == r3 + [A]
    # Budget 21 = r3 + r2 exactly: kept, then the final 196 is appended after the cut (22 tokens).
    assert ids(42, 30) == r2 + r3 + [A]
    # The newest round alone over budget (10 > 8): cut on the left, 196 appended after the cut.
    assert ids(16, 10) == r3[-8:] + [A]


def test_prompt_path_of_model_chat_uses_checkpoint_context(b2_tok, shared_reference):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696, max_position_embeddings=40)
    config = chat_generation_config(model, GenerationConfig.from_pretrained(shared_reference / "baichuan2-13b-chat"),
                                    max_new_tokens=20)
    r2, r3 = [U, *B2[Q2], A, *B2[A1]], [U, *B2[Q1]]
    assert chat_prompt_ids(model, b2_tok, conv(Q1, A1, Q2, A1, Q1), config) == r2 + r3 + [A]
    old = tiny_model("tiny-baichuan-13b", vocab_size=64000, model_max_length=40)
    assert chat_prompt_ids(old, b2_tok, conv(Q1), config) == [U, *B2[Q1], A]  # tokenizer-agnostic rule
    with pytest.raises(ChatFormatError):  # Baichuan-13B's format: no system
        chat_prompt_ids(old, b2_tok, conv(Q1, system="x"), config)


@pytest.mark.parametrize("preset,folder,facts", [("tiny-baichuan2-7b", "baichuan2-13b-chat", B2),
                                                 ("tiny-baichuan-13b", "baichuan-13b-base", B1)])
def test_model_chat_generates_from_the_rule_ids(shared_reference, preset, folder, facts):
    """model.chat's reply equals greedy generate on the hand-built prompt, for both generations."""
    tok = _tokenizer(shared_reference, folder)
    model = tiny_model(preset, vocab_size=tok.vocab_size)
    if facts is B2:
        prompt = [U, *facts[Q1], A, *facts[A1], U, *facts[Q2], A]
    else:
        prompt = [U, *facts[Q1], A, *facts[A1], EOS, U, *facts[Q2], A]
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, repetition_penalty=1.05,
                         eos_token_id=2, pad_token_id=0)
    expected = tok.decode(out[0, len(prompt):], skip_special_tokens=True)
    reply = model.chat(tok, conv(Q1, A1, Q2), temperature=0, max_new_tokens=12)
    assert reply == expected and reply


# ----------------------------------------------------------------------------- generation settings


def test_defaults_come_from_generation_config(shared_reference):
    model = tiny_model("tiny-baichuan2-7b")
    model.generation_config = GenerationConfig.from_pretrained(shared_reference / "baichuan-13b-chat")
    cfg = chat_generation_config(model)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (0.3, 5, 0.85, 1.1)
    assert (cfg.max_new_tokens, cfg.do_sample, cfg.user_token_id, cfg.assistant_token_id) == (2048, True, 195, 196)
    over = chat_generation_config(model, temperature=0.9, top_k=None, max_new_tokens=7)
    assert (over.temperature, over.top_k, over.max_new_tokens) == (0.9, 5, 7)  # None = keep the checkpoint's
    greedy = chat_generation_config(model, temperature=0)
    assert greedy.do_sample is False and greedy.repetition_penalty == 1.1
    assert model.generation_config.temperature == 0.3  # the model's own config is not modified


def test_defaults_without_a_chat_config():
    model = tiny_model("tiny-baichuan2-7b")  # context 512, no generation_config.json
    cfg = chat_generation_config(model)
    assert (cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty, cfg.do_sample) == (0.3, 5, 0.85, 1.05, True)
    assert cfg.max_new_tokens == 256  # min(2048, context // 2): room is left for the prompt
    with pytest.raises(ChatFormatError, match="top_p"):
        chat_generation_config(model, top_p=1.5)


def test_generate_receives_the_chat_settings(b2_tok, shared_reference, monkeypatch):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696)
    model.generation_config = GenerationConfig.from_pretrained(shared_reference / "baichuan2-13b-chat")
    seen = {}
    real_generate = model.generate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    model.chat(b2_tok, conv(Q1), max_new_tokens=3)
    cfg = seen["generation_config"]
    assert (cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (True, 0.3, 5, 0.85, 1.05)
    assert cfg.max_new_tokens == 3 and seen["input_ids"][0].tolist() == [U, *B2[Q1], A]


def test_eos_stops_generation(b2_tok):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696)
    prompt = [U, *B2[Q1], A]
    free = chat_generation_config(model, temperature=0, max_new_tokens=8, eos_token_id=[])
    first = generate_text(model, b2_tok, prompt, free)
    assert len(first.token_ids) == 8 and first.finish_reason == "length"
    stop_id = first.token_ids[3]
    k = first.token_ids.index(stop_id)
    stopped = generate_text(model, b2_tok, prompt, chat_generation_config(model, temperature=0, max_new_tokens=8,
                                                                          eos_token_id=stop_id))
    assert stopped.token_ids == first.token_ids[:k] and stopped.finish_reason == "stop"
    assert stopped.text == b2_tok.decode(first.token_ids[:k], skip_special_tokens=True)


# ----------------------------------------------------------------------------- streaming


def test_stream_is_cumulative_and_ends_with_the_reply(b2_tok):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696)
    reply = model.chat(b2_tok, conv(Q1), temperature=0, max_new_tokens=16)
    seen = list(model.chat(b2_tok, conv(Q1), stream=True, temperature=0, max_new_tokens=16))
    assert seen and seen[-1] == reply
    assert all(b.startswith(a) and len(b) > len(a) for a, b in zip(seen, seen[1:]))


def test_stream_raises_errors_of_the_generation_thread(b2_tok, monkeypatch):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696)

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model, "generate", broken)
    with pytest.raises(RuntimeError, match="device lost"):
        list(model.chat(b2_tok, conv(Q1), stream=True, max_new_tokens=4))


def test_incremental_decoder_adds_up_to_full_decode(b2_tok):
    text = "世界上第二高的山峰是哪座？ Hello world, 12345 🤖 naïve\n\n第二行 tabs\tand  spaces"
    ids = b2_tok.encode(text, add_special_tokens=False)
    gen = torch.Generator().manual_seed(0)
    ids += torch.randint(3, 125696, (60,), generator=gen).tolist() + [2, 195, 196]
    decoder = IncrementalDecoder(b2_tok)
    pieces = [decoder.push([i]) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == b2_tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in p for p in pieces[: len(b2_tok.encode(text, add_special_tokens=False))])


def test_stop_text_cuts_and_holds_back():
    stop = StopText(["STOP", "\n\n"])
    assert stop.feed("Hello wor") == "Hello "  # "wor" could not start a stop string, but 3 chars are held
    assert stop.feed("ld! ST") == "world!"
    assert stop.feed("OP and more") == " "
    assert stop.stopped and stop.text == "Hello world! "
    plain = StopText(None)
    assert plain.feed("abc") == "abc" and plain.feed("", final=True) == ""


def test_stop_strings_end_generation(b2_tok):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696)
    prompt = [U, *B2[Q1], A]
    free = generate_text(model, b2_tok, prompt, chat_generation_config(model, temperature=0, max_new_tokens=12))
    marker = free.text[len(free.text) // 2 : len(free.text) // 2 + 2]
    deltas = []
    cut = generate_text(model, b2_tok, prompt, chat_generation_config(model, temperature=0, max_new_tokens=12),
                        on_text=deltas.append, stop=[marker])
    assert cut.text == free.text[: free.text.index(marker)] == "".join(deltas)
    assert cut.finish_reason == "stop"


def test_decode_benchmark_smoke():
    """benchmarks/bench_decode.py on a CPU: the fast path (batch 1 and 2), generate and Llama's static path
    decode; bytes per token = non-embedding weights; time to first token is reported."""
    bench = benchmark_script("bench_decode")
    rows = bench.main(["--preset", "tiny-baichuan2-7b", "--device", "cpu", "--modes", "fp32", "--new-tokens", "4",
                       "--prompt-tokens", "4", "--repeats", "1", "--batch-sizes", "1,2", "--ttft-tokens", "16"])
    h, i, v, layers = 64, 176, 512, 2
    per_token = 4 * (layers * (4 * h * h + 3 * i * h + 2 * h) + h + v * h)  # fp32 layers, final norm, lm_head
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("baichuan fast", 1), ("baichuan fast", 2), ("baichuan generate", 1), ("llama static", 1)]
    for row in rows:
        assert row["weight_gb_per_token"] * 1e9 == pytest.approx(per_token) and row["tokens_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["steps_per_s"] * row["batch"])
    assert rows[0]["ttft_s"] > 0 and rows[3]["ttft_s"] > 0
    assert rows[2]["agreement"]["agree"] == 32  # fp32 on a CPU: the fast path gives generate's greedy tokens
