"""BaichuanTokenizer against the published tokenizer files: the ids of FACTS.md, both directions, on both generations."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
import sentencepiece as spm
from conftest import REFERENCE, need_shared
from transformers import AutoTokenizer

import baichuan_tune  # noqa: F401  (registers the Auto classes)
from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.errors import CheckpointError
from baichuan_tune.models.presets import preset_config
from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

# Folders under ../shared/reference that hold a published tokenizer.model.
GEN1 = ("baichuan-7b", "baichuan-13b-base")
GEN2 = ("baichuan2-13b-chat",)
TOKENIZER_FOLDERS = GEN1 + GEN2

# FACTS.md, "Tokenizers": (text, Baichuan-7B/13B ids, Baichuan2 ids)
FACTS_TABLE = [
    ("世界上第二高的山峰是哪座", [31106, 13839, 3268, 7464, 31452, 32312, 31161, 31853, 31951],
     [8352, 2382, 4767, 67740, 63687, 93110]),
    ("12345", [31106, 53, 54, 55, 56, 57], [92336, 92338, 92354, 92369, 92358]),
    ("Hello world", [24568, 1275], [23160, 2063]),
]
# FACTS.md: id 195 / 196 per generation (the chat models' user / assistant ids).
RESERVED_195_196 = {"gen1": ("<reserved_102>", "<reserved_103>"), "gen2": ("<reserved_106>", "<reserved_107>")}

_cache: dict[str, BaichuanTokenizer] = {}


def load(name: str):
    """AutoTokenizer on a published folder, as a user calls it: no trust_remote_code, no network."""
    if name not in _cache:
        _cache[name] = AutoTokenizer.from_pretrained(need_shared(REFERENCE / name))
    return _cache[name]


def generation(name: str) -> str:
    return "gen2" if name in GEN2 else "gen1"


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_autotokenizer_loads_every_published_folder_as_this_class(name):
    tok = load(name)
    assert isinstance(tok, BaichuanTokenizer) and not tok.is_fast
    published = json.loads((REFERENCE / name / "tokenizer_config.json").read_text())
    assert type(tok).__name__ == published["tokenizer_class"]  # Baichuan-7B: BaiChuanTokenizer
    assert len(tok) == (125696 if name in GEN2 else 64000)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
@pytest.mark.parametrize("text,gen1_ids,gen2_ids", FACTS_TABLE)
def test_facts_table_encode_and_decode(name, text, gen1_ids, gen2_ids):
    tok = load(name)
    expected = gen2_ids if name in GEN2 else gen1_ids
    assert tok(text).input_ids == expected
    assert tok.encode(text) == expected
    assert tok.decode(expected) == text


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_ids_195_196_are_reserved_tokens_and_encode_as_one_id(name):
    tok = load(name)
    user, assistant = RESERVED_195_196[generation(name)]
    assert tok.convert_ids_to_tokens([195, 196]) == [user, assistant]
    text = f"{user}你好{assistant}世界"
    ids = tok(text).input_ids
    assert ids.count(195) == 1 and ids.count(196) == 1
    assert ids.index(196) > ids.index(195) + 1  # the text between them is tokens of its own
    assert tok.decode(ids) == text
    if name in GEN2:
        assert tok(user).input_ids == [195]
    else:  # nmt_nfkc adds a leading "▁" (31106) to every text, as FACTS shows for "12345"
        assert tok(user).input_ids == [31106, 195]


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_byte_fallback_round_trips_rare_characters_and_emoji(name):
    tok = load(name)
    text = "𠀀𪚥 🦙🫠 Ꙭ ⸻ 👩‍👩‍👧 ok"
    ids = tok(text).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert any(p.startswith("<0x") and p.endswith(">") for p in pieces), pieces  # byte fallback was used
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_normaliser_is_nfkc_for_baichuan1_and_identity_for_baichuan2(name):
    tok = load(name)
    text = "𝔘𝔫𝔦 e\u0301 ｆｕｌｌ"  # changed by NFKC: mathematical letters, a combining accent, full-width letters
    nfkc = unicodedata.normalize("NFKC", text)
    assert nfkc != text
    decoded = tok.decode(tok(text).input_ids)
    assert decoded == (text if name in GEN2 else nfkc)


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_special_tokens_in_text_keep_their_ids(name):
    # Baichuan2's published config marks </s> single_word; the authors' transformers ignored that flag.
    tok = load(name)
    ids = tok("你好</s>").input_ids
    assert ids[-1] == 2
    assert tok.decode(ids) == "你好</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "你好"


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_bos_eos_flags_come_from_tokenizer_config(name, tmp_path):
    tok = load(name)
    plain = tok("Hello world").input_ids
    assert tok.add_bos_token is False and tok.add_eos_token is False  # as published
    assert 1 not in plain and 2 not in plain
    folder = tmp_path / name
    shutil.copytree(REFERENCE / name, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    on = AutoTokenizer.from_pretrained(folder)
    assert on("Hello world").input_ids == [1] + plain + [2]
    assert on("Hello world", return_special_tokens_mask=True).special_tokens_mask == [1] + [0] * len(plain) + [1]
    assert on.decode(on("Hello world").input_ids, skip_special_tokens=True) == "Hello world"


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_uses_unk_id_0_on_either_side(side):
    tok = load("baichuan2-13b-chat")
    texts = ["你好", "世界上第二高的山峰是哪座", "Hello world"]
    singles = [tok(t).input_ids for t in texts]
    batch = tok(texts, padding=True, return_tensors="pt", padding_side=side)
    width = max(len(s) for s in singles)
    assert tok.pad_token == "<unk>" and tok.pad_token_id == 0
    assert batch.input_ids.shape == (3, width)
    for row, mask, single in zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), singles):
        pad = width - len(single)
        expected = single + [0] * pad if side == "right" else [0] * pad + single
        assert row == expected
        assert mask == ([1] * len(single) + [0] * pad if side == "right" else [0] * pad + [1] * len(single))


@pytest.mark.parametrize("name", TOKENIZER_FOLDERS)
def test_save_pretrained_round_trip_keeps_ids_and_published_fields(name, tmp_path):
    tok = load(name)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.model").read_bytes() == (REFERENCE / name / "tokenizer.model").read_bytes()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    published = json.loads((REFERENCE / name / "tokenizer_config.json").read_text())
    for key in ("add_bos_token", "add_eos_token", "auto_map", "tokenizer_class", "sp_model_kwargs",
                "clean_up_tokenization_spaces", "model_max_length"):
        assert config[key] == published[key], key
    for key in ("bos_token", "eos_token", "unk_token"):
        assert config[key]["__type"] == "AddedToken" and config[key]["content"] == published[key]["content"]
    special = json.loads((tmp_path / "special_tokens_map.json").read_text())
    assert {k: v["content"] for k, v in special.items()} == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is type(tok)
    texts = [row[0] for row in FACTS_TABLE] + ["<reserved_106>🦙 a\nb  c</s>"]
    assert [again(t).input_ids for t in texts] == [tok(t).input_ids for t in texts]
    assert again.pad_token_id == 0 and again.add_bos_token is False


def test_saved_flags_load_back(tmp_path):
    tok = AutoTokenizer.from_pretrained(need_shared(REFERENCE / "baichuan2-13b-chat"), add_eos_token=True)
    tok.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["add_eos_token"] is True
    again = BaichuanTokenizer.from_pretrained(tmp_path)
    assert again("Hello world").input_ids == [23160, 2063, 2]


def test_7b_and_13b_models_differ_exactly_in_ids_93_to_99():
    seven = spm.SentencePieceProcessor(model_file=str(need_shared(REFERENCE / "baichuan-7b" / "tokenizer.model")))
    thirteen = spm.SentencePieceProcessor(model_file=str(need_shared(REFERENCE / "baichuan-13b-base" / "tokenizer.model")))
    assert seven.get_piece_size() == thirteen.get_piece_size() == 64000
    differ = [i for i in range(64000) if seven.id_to_piece(i) != thirteen.id_to_piece(i)]
    assert differ == list(range(93, 100))
    assert [seven.id_to_piece(i) for i in differ] == [f"<reserved_{n}>" for n in range(7)]
    assert thirteen.id_to_piece(99) == "▁▁"  # 13B turned these into runs of spaces
    # so the same text gets different ids through the tokenizer class:
    text = "a\nb  c"
    assert load("baichuan-7b")(text).input_ids != load("baichuan-13b-base")(text).input_ids
    assert 99 in load("baichuan-13b-base")(text).input_ids
    assert load("baichuan-7b").decode(load("baichuan-7b")(text).input_ids) == text


@pytest.mark.parametrize("content", [b"", b"not a sentencepiece model\n" * 20, "half"])
def test_corrupt_tokenizer_model_raises_checkpoint_error_naming_the_file(content, tmp_path):
    source = need_shared(REFERENCE / "baichuan2-13b-chat")
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    model = folder / "tokenizer.model"
    if content == "half":
        content = (source / "tokenizer.model").read_bytes()[:50_000]
    model.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: not a valid SentencePiece") as info:
        AutoTokenizer.from_pretrained(folder)
    assert str(model) in str(info.value)
    with pytest.raises(CheckpointError, match="not a valid SentencePiece"):
        BaichuanTokenizer(vocab_file=str(model))


def test_missing_tokenizer_model_raises_checkpoint_error_naming_the_file():
    # The published Baichuan-13B-Chat folder here has configs but no tokenizer.model.
    folder = need_shared(REFERENCE / "baichuan-13b-chat")
    assert not (folder / "tokenizer.model").exists()
    with pytest.raises(CheckpointError, match=r"tokenizer\.model: missing") as info:
        AutoTokenizer.from_pretrained(folder)
    assert str(folder / "tokenizer.model") in str(info.value)


def test_builtin_default_tokenizer_asset():
    assert DEFAULT_TOKENIZER.is_file() and DEFAULT_TOKENIZER.stat().st_size < 1_000_000
    tok = BaichuanTokenizer.from_pretrained(DEFAULT_TOKENIZER.parent)
    assert len(tok) == preset_config("default").vocab_size
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    user, assistant = tok.convert_ids_to_tokens([195, 196])
    assert user.startswith("<reserved_") and assistant.startswith("<reserved_")
    ids = tok(user + "你好" + assistant).input_ids
    assert ids[0] == 195 and ids[-1] == 196 and len(ids) > 2
    assert [tok.decode([i]) for i in tok("2024").input_ids] == ["2", "0", "2", "4"]
    for text in ["Who are you?", "请向下面这个人问好。\n小明", "3加4等于多少？ 🦙 𠀀"]:
        assert tok.decode(tok(text).input_ids) == text
