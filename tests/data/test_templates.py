"""Token and label layout of each template on records of the real data, with the published tokenizers.

Expected ids are computed here from the SentencePiece model directly (not through the project's
tokenizer class) and laid out by hand from FACTS.md "Chat format"."""

from __future__ import annotations

import functools
import json

import pytest

from baichuan_tune.errors import DataError
from baichuan_tune.data.templates import (ASSISTANT_TOKEN_ID, IGNORE_INDEX, USER_TOKEN_ID, TemplateError, get_template)

IGN = IGNORE_INDEX
BOS, EOS = 1, 2


@pytest.fixture
def b2(shared_reference):
    """(project tokenizer, raw SentencePiece encode) for Baichuan2."""
    return _tokenizers(str(shared_reference / "baichuan2-13b-chat"))


@pytest.fixture
def b1(shared_reference):
    """The same for Baichuan-13B (the Baichuan-13B-Chat tokenizer)."""
    return _tokenizers(str(shared_reference / "baichuan-13b-base"))


@functools.lru_cache(maxsize=None)
def _tokenizers(folder: str):
    import sentencepiece as spm

    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    sp = spm.SentencePieceProcessor(model_file=f"{folder}/tokenizer.model")
    return BaichuanTokenizer.from_pretrained(folder), lambda text: sp.encode(text)


def _json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _alpaca_turns(rec, fill=None):
    user = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
    answer = rec["output"]
    for key, value in (fill or {}).items():
        answer = answer.replace("{{" + key + "}}", value)
    return [("user", user), ("assistant", answer)]


def _authors_fine_tune(sp, conversations):
    """Transcription of the layout in the Baichuan2 fine-tune script, as FACTS.md describes it."""
    ids, labels = [], []
    for turn in conversations:
        value = sp(turn["value"])
        if turn["from"] == "human":
            ids += [USER_TOKEN_ID] + value
            labels += [EOS] + [IGN] * len(value)
        else:
            ids += [ASSISTANT_TOKEN_ID] + value
            labels += [IGN] + value
    return ids + [EOS], labels + [EOS]


# ----------------------------------------------------------------------------- baichuan2


def test_baichuan2_alpaca_record_layout(b2, shared_data):
    tok, sp = b2
    rec = _json(shared_data / "alpaca_zh_demo.json")[1]  # has an input: "输入：俄克拉荷马城雷霆队..."
    assert rec["input"]
    user, answer = sp(rec["instruction"] + "\n" + rec["input"]), sp(rec["output"])
    enc = get_template("baichuan2").encode(tok, _alpaca_turns(rec))
    assert enc.input_ids == [195] + user + [196] + answer + [EOS]
    assert enc.labels == [IGN] * (len(user) + 2) + answer + [EOS]
    assert not enc.truncated


def test_baichuan2_matches_authors_fine_tune_targets(b2, shared_data):
    """Same ids as the authors' script; the same shifted targets (the only difference is the unused labels[0])."""
    tok, sp = b2
    for rec in _jsonl(shared_data / "belle_dev1k.jsonl")[:20]:
        conv = [{"from": "human", "value": _alpaca_turns(rec)[0][1]}, {"from": "gpt", "value": rec["output"]}]
        ids, labels = _authors_fine_tune(sp, conv)
        enc = get_template("baichuan2").encode(tok, _alpaca_turns(rec))
        assert enc.input_ids == ids
        assert enc.labels[1:] == labels[1:]
        assert labels[0] == EOS and enc.labels[0] == IGN  # never read: the loss uses labels[:, 1:]


def _belle_conversation(shared_data, n=3):
    recs = _jsonl(shared_data / "belle_dev1k.jsonl")[:n]
    turns = []
    for rec in recs:
        turns += _alpaca_turns(rec)
    return turns


def test_baichuan2_multi_turn_all_and_last(b2, shared_data):
    tok, sp = b2
    turns = [("system", "你是一个乐于助人的助手。")] + _belle_conversation(shared_data, 2)
    sys_ids, u1, a1, u2, a2 = (sp(t[1]) for t in turns)
    ids = sys_ids + [195] + u1 + [196] + a1 + [195] + u2 + [196] + a2 + [EOS]
    all_labels = [IGN] * (len(sys_ids) + 2 + len(u1)) + a1 + [EOS] + [IGN] * (len(u2) + 1) + a2 + [EOS]
    last_labels = [IGN] * (len(ids) - len(a2) - 1) + a2 + [EOS]
    template = get_template("baichuan2")
    enc_all = template.encode(tok, turns, train_on="all")
    enc_last = template.encode(tok, turns, train_on="last")
    assert enc_all.input_ids == ids == enc_last.input_ids
    assert enc_all.labels == all_labels
    assert enc_last.labels == last_labels
    # the eos label sits under the second user token: the model learns eos right after answer 1
    pos = len(sys_ids) + 2 + len(u1) + len(a1)
    assert (enc_all.input_ids[pos], enc_all.labels[pos]) == (USER_TOKEN_ID, EOS)


def test_baichuan2_prompt_is_the_chat_prompt_of_facts(b2, shared_data):
    tok, sp = b2
    turns = [("system", "请简短回答。")] + _belle_conversation(shared_data, 2)[:3]
    s, u1, a1, u2 = (sp(t[1]) for t in turns)
    assert get_template("baichuan2").encode_prompt(tok, turns) == s + [195] + u1 + [196] + a1 + [195] + u2 + [196]
    messages = [{"role": r, "content": c} for r, c in turns]
    assert get_template("baichuan2").encode_prompt(tok, messages) == s + [195] + u1 + [196] + a1 + [195] + u2 + [196]


# ----------------------------------------------------------------------------- baichuan (13B-Chat)


def test_baichuan_identity_record_layout(b1, shared_data):
    tok, sp = b1
    rec = _json(shared_data / "identity.json")[2]  # "Who are you?"
    turns = _alpaca_turns(rec, {"name": "Bot", "author": "Lab"})
    assert turns[1][1].startswith("I am Bot, an AI assistant developed by Lab")
    user, answer = sp(turns[0][1]), sp(turns[1][1])
    enc = get_template("baichuan").encode(tok, turns)
    assert enc.input_ids == [195] + user + [196] + answer + [EOS]
    assert enc.labels == [IGN] * (len(user) + 2) + answer + [EOS]


def test_baichuan_multi_turn_puts_eos_after_every_answer(b1, shared_data):
    """Baichuan-13B-Chat's prompt builder ends each earlier reply with eos; training uses the same layout."""
    tok, sp = b1
    turns = _belle_conversation(shared_data, 2)
    u1, a1, u2, a2 = (sp(t[1]) for t in turns)
    enc = get_template("baichuan").encode(tok, turns)
    assert enc.input_ids == [195] + u1 + [196] + a1 + [EOS] + [195] + u2 + [196] + a2 + [EOS]
    assert enc.labels == [IGN] * (len(u1) + 2) + a1 + [EOS] + [IGN] * (len(u2) + 2) + a2 + [EOS]
    last = get_template("baichuan").encode(tok, turns, train_on="last")
    assert last.labels == [IGN] * (len(u1) + len(a1) + len(u2) + 5) + a2 + [EOS]
    assert get_template("baichuan").encode_prompt(tok, turns[:3]) == [195] + u1 + [196] + a1 + [EOS] + [195] + u2 + [196]


def test_baichuan_has_no_system_role(b1):
    tok, _ = b1
    with pytest.raises(TemplateError, match="field 'system': this template has no system role"):
        get_template("baichuan").encode(tok, [("system", "x"), ("user", "hi"), ("assistant", "hello")])


# ----------------------------------------------------------------------------- human_assistant and base


def test_human_assistant_belle_record_and_multi_turn(b2, shared_data):
    tok, sp = b2
    turns = _belle_conversation(shared_data, 2)
    p1 = sp("Human: " + turns[0][1] + "\n\nAssistant: ")
    p2 = sp("Human: " + turns[2][1] + "\n\nAssistant: ")
    a1, a2 = sp(turns[1][1]), sp(turns[3][1])
    template = get_template("human_assistant")
    one = template.encode(tok, turns[:2])
    assert one.input_ids == [BOS] + p1 + a1 + [EOS]
    assert one.labels == [IGN] * (1 + len(p1)) + a1 + [EOS]
    both = template.encode(tok, turns)
    assert both.input_ids == [BOS] + p1 + a1 + [EOS] + [BOS] + p2 + a2 + [EOS]
    assert both.labels == [IGN] * (1 + len(p1)) + a1 + [EOS] + [IGN] * (1 + len(p2)) + a2 + [EOS]
    last = template.encode(tok, turns, train_on="last")
    assert last.labels == [IGN] * (len(a1) + len(p1) + len(p2) + 3) + a2 + [EOS]


@pytest.mark.parametrize("name,join", [("human_assistant", ""), ("baichuan2", "\n")])
def test_alpaca_instruction_and_input_join_as_each_recipe(b2, shared_data, tmp_path, name, join):
    """baichuan_sft_lora builds "Human: " + instruction + input; LLaMA-Factory joins them with a newline."""
    from baichuan_tune.data.loading import load_sft_data

    tok, sp = b2
    record = next(r for r in json.loads((shared_data / "alpaca_zh_demo.json").read_text(encoding="utf-8"))
                  if r.get("input"))
    path = tmp_path / "one.json"
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    train, _, _ = load_sft_data([str(path)], tok, template=name, cutoff_len=4096, cache_dir="none")
    user = record["instruction"] + join + record["input"]
    expected = get_template(name).encode(tok, [("user", user), ("assistant", record["output"])])
    assert list(train[0]["input_ids"]) == expected.input_ids
    if name == "human_assistant":
        assert expected.input_ids[: 1 + len(sp("Human: " + user + "\n\nAssistant: "))] == \
            [BOS] + sp("Human: " + record["instruction"] + record["input"] + "\n\nAssistant: ")


def test_human_assistant_system_goes_first(b2):
    tok, sp = b2
    enc = get_template("human_assistant").encode(tok, [("system", "简短回答。"), ("user", "你好"), ("assistant", "你好！")])
    prompt = sp("简短回答。\n\n") + sp("Human: 你好\n\nAssistant: ")
    assert enc.input_ids == [BOS] + prompt + sp("你好！") + [EOS]


def test_base_text_record_all_tokens_labelled(b2, shared_data):
    tok, sp = b2
    text = _jsonl(shared_data / "c4_demo.jsonl")[0]["text"]
    ids = sp(text)
    for name in ("base", "baichuan2"):  # a text record is plain text under every template
        enc = get_template(name).encode(tok, [("text", text)])
        assert enc.input_ids == [BOS] + ids + [EOS]
        assert enc.labels == [IGN] + ids + [EOS]
    cut = get_template("base").encode(tok, [("text", text)], cutoff_len=50)
    assert cut.input_ids == ([BOS] + ids)[:50] and cut.truncated


def test_base_chat_record(b2, shared_data):
    tok, sp = b2
    turns = _belle_conversation(shared_data, 1)
    u, a = sp(turns[0][1]), sp(turns[1][1])
    enc = get_template("base").encode(tok, turns)
    assert enc.input_ids == [BOS] + u + a + [EOS]
    assert enc.labels == [IGN] * (1 + len(u)) + a + [EOS]


# ----------------------------------------------------------------------------- truncation


def test_cutoff_len_cuts_the_tail(b2, shared_data):
    tok, _ = b2
    turns = _belle_conversation(shared_data, 2)
    full = get_template("baichuan2").encode(tok, turns)
    for cutoff in (len(full.input_ids) - 1, 40, 5):
        enc = get_template("baichuan2").encode(tok, turns, cutoff_len=cutoff)
        assert enc.input_ids == full.input_ids[:cutoff] and enc.labels == full.labels[:cutoff] and enc.truncated
    assert not get_template("baichuan2").encode(tok, turns, cutoff_len=len(full.input_ids)).truncated


def test_per_part_truncation_keeps_role_tokens(b2, shared_data):
    tok, sp = b2
    turns = _belle_conversation(shared_data, 2)
    u1, a1 = sp(turns[0][1]), sp(turns[1][1])
    assert len(u1) > 10 and len(a1) > 8
    # both rounds fit 10 + 8 = 18 tokens? no: round 1 alone takes 10 + 8, so round 2 is dropped
    enc = get_template("baichuan2").encode(tok, turns, max_source_length=10, max_target_length=8)
    assert enc.input_ids == [195] + u1[:8] + [196] + (a1 + [EOS])[:8]
    assert enc.labels == [IGN] * 10 + (a1 + [EOS])[:8]
    assert enc.truncated
    # generous limits keep both rounds; each prompt text and answer is cut separately
    enc = get_template("baichuan2").encode(tok, turns, max_source_length=6, max_target_length=400)
    u2, a2 = sp(turns[2][1]), sp(turns[3][1])
    assert enc.input_ids == [195] + u1[:4] + [196] + a1 + [195] + u2[:4] + [196] + a2 + [EOS]
    assert enc.labels == [IGN] * 6 + a1 + [EOS] + [IGN] * 5 + a2 + [EOS]


def test_per_part_truncation_human_assistant_keeps_marker(b2, shared_data):
    tok, sp = b2
    turns = _belle_conversation(shared_data, 1)
    enc = get_template("human_assistant").encode(tok, turns, max_source_length=12, max_target_length=5)
    marker = sp("\n\nAssistant: ")  # after CJK text the marker tokenises alone (checked below)
    full_prompt = sp("Human: " + turns[0][1] + "\n\nAssistant: ")
    assert full_prompt[-len(marker):] == marker
    assert enc.input_ids == [BOS] + full_prompt[: 11 - len(marker)] + marker + sp(turns[1][1])[:5]
    assert enc.labels[:12] == [IGN] * 12


def test_encode_pair_dpo_record(b2, shared_data):
    tok, sp = b2
    rec = next(r for r in _json(shared_data / "dpo_zh_demo.json") if r["conversations"][0]["from"] == "system")
    system, user = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
    prompt, chosen, rejected, truncated = get_template("baichuan2").encode_pair(
        tok, [("system", system), ("user", user)], rec["chosen"]["value"], rec["rejected"]["value"])
    assert prompt == sp(system) + [195] + sp(user) + [196]
    assert chosen == sp(rec["chosen"]["value"]) + [EOS] and rejected == sp(rec["rejected"]["value"]) + [EOS]
    assert not truncated
    p, c, r, truncated = get_template("baichuan2").encode_pair(
        tok, [("system", system), ("user", user)], rec["chosen"]["value"], rec["rejected"]["value"], cutoff_len=64)
    assert truncated and len(p) + max(len(c), len(r)) <= 64
    assert p == prompt[-len(p):] and c == chosen[: len(c)] and r == rejected[: len(r)]
    assert p[-1] == ASSISTANT_TOKEN_ID


def test_first_label_is_never_a_target(b2, shared_data):
    tok, _ = b2
    turns = _belle_conversation(shared_data, 2)
    for name in ("baichuan2", "baichuan", "human_assistant", "base"):
        for on in ("all", "last"):
            assert get_template(name).encode(tok, turns, train_on=on).labels[0] == IGN


def test_bad_turn_orders_and_names():
    template = get_template("baichuan2")
    with pytest.raises(TemplateError, match=r"field 'turns\[1\]': expected an assistant turn, got 'user'"):
        template.encode(None, [("user", "a"), ("user", "b")])
    with pytest.raises(TemplateError, match="must end with an assistant answer"):
        template.encode(None, [("user", "a")])
    with pytest.raises(DataError, match="unknown template 'chatml'; choose one of baichuan2, baichuan"):
        get_template("chatml")


# ----------------------------------------------------------------------------- the same prompt at inference


@pytest.mark.parametrize("name", ["baichuan2", "baichuan", "human_assistant", "base"])
@pytest.mark.parametrize("tokenizer", ["b2", "b1"])
def test_chat_prompt_is_the_prompt_part_of_the_training_sample(name, tokenizer, request, shared_data):
    """generation.build_chat_input (chat, serve, model.chat) gives the ids the template trains before the last
    answer: for baichuan2/baichuan the authors' chat rule, for the others the template's own prompt."""
    from baichuan_tune.serve.generation import build_chat_input

    tok, _ = request.getfixturevalue(tokenizer)
    system = [("system", "请简短回答。")] if name != "baichuan" else []
    turns = system + _belle_conversation(shared_data, 3)
    sample = get_template(name).encode(tok, turns, train_on="last")
    prompt_part = sample.input_ids[: next(i for i, label in enumerate(sample.labels) if label != IGN)]
    messages = [{"role": r, "content": c} for r, c in turns[:-1]]
    assert build_chat_input(tok, messages, model_max_length=8192, max_new_tokens=16, fmt=name) == prompt_part
    assert get_template(name).encode_prompt(tok, messages) == prompt_part


def test_prompt_budget_drops_old_rounds_whole_then_cuts_left(b2):
    """The Baichuan2 chat rule on a human_assistant prompt, rounds laid out by hand."""
    from baichuan_tune.serve.generation import build_chat_input

    tok, sp = b2
    q1, a1, q2, q3 = "世界上第二高的山峰是哪座", "乔戈里峰。", "Hello world", "12345"
    r1 = [BOS] + sp(f"Human: {q1}\n\nAssistant: ") + sp(a1) + [EOS]
    r2 = [BOS] + sp(f"Human: {q2}\n\nAssistant: ") + sp(a1) + [EOS]
    r3 = [BOS] + sp(f"Human: {q3}\n\nAssistant: ")
    messages = [{"role": r, "content": c} for r, c in
                [("user", q1), ("assistant", a1), ("user", q2), ("assistant", a1), ("user", q3)]]

    def ids(budget, system=None):
        head = [{"role": "system", "content": system}] if system else []
        return build_chat_input(tok, head + messages, model_max_length=budget + 10, max_new_tokens=10,
                                fmt="human_assistant")

    assert ids(len(r1 + r2 + r3)) == r1 + r2 + r3
    assert ids(len(r1 + r2 + r3) - 1) == r2 + r3  # r1 no longer fits whole: dropped
    assert ids(len(r2 + r3) - 1) == r3
    assert ids(len(r3) - 2) == r3[2:]  # the newest round alone is over budget: cut on the left
    # a system text goes into the first round kept, after its bos, and counts against the budget
    system = sp("简短回答。\n\n")
    assert ids(len(system + r2 + r3), "简短回答。") == [BOS] + system + r2[1:] + r3
    assert ids(len(system + r2 + r3) - 1, "简短回答。") == [BOS] + system + r3[1:]
