"""Reading, checking, mixing, splitting and cached parallel tokenisation of the real data files."""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from baichuan_tune.data import encoding, formats, loading, sources
from baichuan_tune.data.formats import Example
from baichuan_tune.data.sources import load_dataset
from baichuan_tune.data.loading import load_pair_data, load_sft_data
from baichuan_tune.data.cache import tokenize_dataset
from baichuan_tune.errors import DataError
from baichuan_tune.data.templates import IGNORE_INDEX


@functools.lru_cache(maxsize=None)
def _b2_tokenizer(folder: str):
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer.from_pretrained(folder)


@pytest.fixture
def tok(shared_reference):
    return _b2_tokenizer(str(shared_reference / "baichuan2-13b-chat"))


def _raw(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return json.loads(path.read_text(encoding="utf-8"))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


GOOD = {"instruction": "1+1=?", "input": "", "output": "2"}


# ----------------------------------------------------------------------------- reading the real files


@pytest.mark.parametrize("name,count", [("alpaca_zh_demo.json", 1000), ("belle_dev1k.jsonl", 1000),
                                        ("identity.json", 91), ("c4_demo.jsonl", 300)])
def test_reads_every_record_of_the_real_files(shared_data, name, count):
    loaded = load_dataset(str(shared_data / name))
    raw = _raw(shared_data / name)
    assert len(loaded.train) == len(raw) == count and loaded.skipped == 0
    for rec, ex in zip(raw[:50], loaded.train[:50]):
        if "text" in rec:
            assert ex.turns == [("text", rec["text"])]
        else:
            user = rec["instruction"] + ("\n" + rec["input"] if rec["input"] else "")
            assert ex.turns == [("user", user), ("assistant", rec["output"])]
    assert loaded.train[4].where == f"{shared_data / name}: record 5" + (" (line 5)" if name.endswith("l") else "")


def test_reads_dpo_pairs_with_and_without_system(shared_data):
    raw = _raw(shared_data / "dpo_zh_demo.json")
    loaded = load_dataset(str(shared_data / "dpo_zh_demo.json"), kind="pair")
    assert len(loaded.train) == 300
    for rec, ex in zip(raw, loaded.train):
        roles = {"system": "system", "human": "user"}
        assert ex.prompt == [(roles[t["from"]], t["value"]) for t in rec["conversations"]]
        assert (ex.chosen, ex.rejected) == (rec["chosen"]["value"], rec["rejected"]["value"])
    assert sum(ex.prompt[0][0] == "system" for ex in loaded.train) == 64


def test_record_forms_normalise_to_one_turn_list(tmp_path):
    expected = [("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "2+2"), ("assistant", "4")]
    records = [
        {"system": "Be brief.", "history": [["hi", "hello"]], "instruction": "2+2", "input": "", "output": "4"},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}, {"from": "human", "value": "2+2"},
                           {"from": "gpt", "value": "4"}]},
        {"messages": [{"role": r, "content": c} for r, c in expected]},
    ]
    loaded = load_dataset(str(_write_jsonl(tmp_path / "forms.jsonl", records)))
    assert [ex.turns for ex in loaded.train] == [expected] * 3


def test_flat_preference_forms(tmp_path):
    records = [{"prompt": "2+2", "chosen": "4", "rejected": "5"},
               {"instruction": "add", "input": "2+2", "chosen": "4", "rejected": "5", "system": "Be brief."},
               {"messages": [{"role": "user", "content": "2+2"}], "chosen": {"role": "assistant", "content": "4"},
                "rejected": "5"}]
    loaded = load_dataset(str(_write_jsonl(tmp_path / "pairs.jsonl", records)), kind="pair")
    assert [(ex.prompt, ex.chosen, ex.rejected) for ex in loaded.train] == [
        ([("user", "2+2")], "4", "5"), ([("system", "Be brief."), ("user", "add\n2+2")], "4", "5"),
        ([("user", "2+2")], "4", "5")]


# ----------------------------------------------------------------------------- errors


BAD_RECORDS = [
    (["not", "an", "object"], "record", "expected a JSON object, got a list"),
    ({"instruction": "hi", "input": ""}, "output", "missing"),
    ({"instruction": 5, "output": "x"}, "instruction", "expected a string, got a number"),
    ({"instruction": "hi", "output": "  "}, "output", "empty answer"),
    ({"instruction": "", "input": "", "output": "x"}, "instruction", "empty prompt"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
     "conversations[1].value", "expected an assistant turn here, got user"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
     "conversations[1].from", "unknown role 'robot'"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "conversations[0].value", "must end with an assistant answer"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]}, "messages[0].content", "missing"),
    ({"history": [["only one"]], "instruction": "a", "output": "b"}, "history[0]", "expected a [user, assistant] pair"),
    ({"text": 3}, "text", "expected a string"),
    ({"question": "a", "answer": "b"}, "record", "no known fields"),
]


@pytest.mark.parametrize("record,field,problem", BAD_RECORDS)
def test_bad_record_names_file_record_and_field(tmp_path, record, field, problem):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, record, GOOD])
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    assert str(err.value).startswith(f"{path}: record 3 (line 3), field '{field}': ")
    assert problem in str(err.value)
    # the same in a .json list (record number without a line)
    json_path = tmp_path / "bad.json"
    json_path.write_text(json.dumps([GOOD, GOOD, record, GOOD]), encoding="utf-8")
    with pytest.raises(DataError, match=f"^{re.escape(str(json_path))}: record 3, field '{re.escape(field)}'"):
        load_dataset(str(json_path))


def test_bad_preference_records(tmp_path):
    cases = [({"prompt": "a", "chosen": "b"}, "rejected", "missing"),
             ({"prompt": "a", "chosen": "", "rejected": "c"}, "chosen", "empty"),
             ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "chosen": "x",
               "rejected": "y"}, "conversations[1].value", "must end with a user turn"),
             ({"prompt": "a", "chosen": {"from": "human", "value": "b"}, "rejected": "c"}, "chosen.from", "expected an assistant")]
    for record, field, problem in cases:
        path = _write_jsonl(tmp_path / "p.jsonl", [record])
        with pytest.raises(DataError, match=rf"p.jsonl: record 1 \(line 1\), field '{re.escape(field)}': .*{problem}"):
            load_dataset(str(path), kind="pair")



# KTO-style data: one answer per prompt, marked good or bad (TRL's `label`, LLaMA-Factory's `kto_tag`).
KTO = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": True},
       {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}], "label": False}]


@pytest.mark.parametrize("records,field,says", [
    (KTO, "label", ["KTO", "sft would learn every answer, the bad ones too", "rm/dpo with paired chosen/rejected"]),
    ([{**GOOD, "kto_tag": False}], "kto_tag", ["KTO"]),
    ([{"prompt": "2+2?", "chosen": "4", "rejected": "5"}], "chosen", ["baichuan-tune rm", "baichuan-tune dpo"]),
    ([{"conversations": [{"from": "human", "value": "2+2?"}], "rejected": "5"}],
     "rejected", ["sft would learn the rejected answer"]),
])
def test_sft_refuses_preference_data(tmp_path, records, field, says):
    path = _write_jsonl(tmp_path / "prefs.jsonl", records)
    with pytest.raises(DataError) as err:
        load_dataset(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: record 1 (line 1), field '{field}': ")
    assert all(part in message for part in says), message
    # skipped and counted like any bad record when asked
    if len(records) > 1:
        with pytest.raises(DataError, match="no usable records \\(2 skipped as bad\\)"):
            load_dataset(str(path), skip_bad_records=True)


def test_sft_keeps_a_label_that_is_no_preference():
    assert sft_ok({**GOOD, "label": "arithmetic"}) and sft_ok({**GOOD, "label": None})


def sft_ok(record) -> bool:
    return formats.sft_turns(record) == [("user", "1+1=?"), ("assistant", "2")]


@pytest.mark.parametrize("record,field,problem", [
    (KTO[0], "label", "an unpaired preference record"),
    ({**GOOD, "kto_tag": True}, "kto_tag", "rm and dpo learn from pairs"),
    ({"messages": KTO[0]["messages"]}, "chosen", "missing: rm and dpo learn from preference pairs"),
])
def test_pair_data_names_unpaired_records(tmp_path, record, field, problem):
    """Not "the conversation must end with a user turn": the record has no pair at all."""
    path = _write_jsonl(tmp_path / "p.jsonl", [record])
    with pytest.raises(DataError, match=rf"p.jsonl: record 1 \(line 1\), field '{field}': .*{problem}"):
        load_dataset(str(path), kind="pair")


def test_ppo_reads_the_prompts_of_labelled_data(tmp_path):
    from baichuan_tune.data.prompts import prompt_turns

    path = _write_jsonl(tmp_path / "kto.jsonl", KTO)
    assert prompt_turns(str(path), 0) == [[("user", "2+2?")], [("user", "2+2?")]]

def test_file_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing.json: data file not found"):
        load_dataset(str(tmp_path / "missing.json"))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]')
    with pytest.raises(DataError, match=r"broken.json: invalid JSON at line 3, column 23: Expecting ',' delimiter"):
        load_dataset(str(broken))
    lines = tmp_path / "broken.jsonl"
    lines.write_text(json.dumps(GOOD) + "\n\n" + '{"instruction": "a", \n')
    with pytest.raises(DataError, match=r"broken.jsonl: line 3: invalid JSON"):
        load_dataset(str(lines))
    obj = tmp_path / "obj.json"
    obj.write_text('{"data": []}')
    with pytest.raises(DataError, match=r"obj.json: record 1 \(line 1\), field 'record': no known fields"):
        load_dataset(str(obj))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin.jsonl: not UTF-8 text"):
        load_dataset(str(latin))


def test_skip_bad_records_counts_them(tmp_path):
    records = [GOOD, *[r for r, _, _ in BAD_RECORDS], GOOD]
    path = _write_jsonl(tmp_path / "mixed.jsonl", records)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("{not json}\n")
    loaded = load_dataset(str(path), skip_bad_records=True)
    assert len(loaded.train) == 2
    assert loaded.skipped == len(BAD_RECORDS) + 1
    assert loaded.problems[0].startswith(f"{path}: record 2 (line 2), field 'record'")
    assert loaded.problems[-1] == f"{path}: line {len(records) + 1}: invalid JSON (Expecting property name enclosed in double quotes at column 2)"


# ----------------------------------------------------------------------------- placeholders, mixing, splits


def test_identity_placeholders(shared_data):
    path = str(shared_data / "identity.json")
    filled = load_dataset(path, placeholders=["name=Baichuan-Tune", "author=the lab"])
    raw = _raw(shared_data / "identity.json")
    assert filled.unfilled_placeholders == []
    for rec, ex in zip(raw, filled.train):
        assert "{{" not in ex.turns[1][1]
        assert ex.turns[1][1] == rec["output"].replace("{{name}}", "Baichuan-Tune").replace("{{author}}", "the lab")
    assert load_dataset(path).unfilled_placeholders == ["author", "name"]
    assert load_dataset(path, placeholders={"name": "X"}).unfilled_placeholders == ["author"]


def test_mixing_with_counts_and_ratios(shared_data):
    alpaca, belle, ident = (str(shared_data / n) for n in ("alpaca_zh_demo.json", "belle_dev1k.jsonl", "identity.json"))
    loaded = load_dataset([f"{alpaca}:200", f"{belle}:0.25", f"{ident}:200"], seed=3)
    assert loaded.counts == {alpaca: 200, belle: 250, ident: 200}
    assert len(loaded.train) == 650
    assert [ex.where.split(": record")[0] for ex in loaded.train] == [alpaca] * 200 + [belle] * 250 + [ident] * 200
    # identity (91 records) drawn 200 times: every record twice, 18 of them a third time
    per_record = Counter(ex.where for ex in loaded.train[450:])
    assert len(per_record) == 91 and sorted(Counter(per_record.values()).items()) == [(2, 73), (3, 18)]
    again = load_dataset([f"{alpaca}:200", f"{belle}:0.25", f"{ident}:200"], seed=3)
    assert [ex.where for ex in again.train] == [ex.where for ex in loaded.train]


def test_dataset_spec_parsing():
    assert sources.parse_dataset_spec("a.json") == sources.DataSource("a.json")
    assert sources.parse_dataset_spec("a.json:300") == sources.DataSource("a.json", count=300)
    assert sources.parse_dataset_spec("dir/a.jsonl:0.5") == sources.DataSource("dir/a.jsonl", ratio=0.5)
    assert sources.parse_dataset_spec("a.json:2.") == sources.DataSource("a.json", ratio=2.0)
    with pytest.raises(DataError, match="at least 1"):
        sources.parse_dataset_spec("a.json:0")


def test_max_samples_caps_each_file(shared_data):
    alpaca, belle = str(shared_data / "alpaca_zh_demo.json"), str(shared_data / "belle_dev1k.jsonl")
    loaded = load_dataset([alpaca, belle], max_samples=7)
    assert loaded.counts == {alpaca: 7, belle: 7}
    assert [ex.where for ex in loaded.train[7:]] == [f"{belle}: record {i} (line {i})" for i in range(1, 8)]
    raw = _raw(shared_data / "alpaca_zh_demo.json")[:7]
    assert [ex.turns[1][1] for ex in loaded.train[:7]] == [r["output"] for r in raw]


def test_val_split_is_seeded_and_disjoint(shared_data):
    files = [str(shared_data / "alpaca_zh_demo.json"), str(shared_data / "belle_dev1k.jsonl")]
    a = load_dataset(files, val_size=0.1, seed=1)
    b = load_dataset(files, val_size=0.1, seed=1)
    c = load_dataset(files, val_size=0.1, seed=2)
    assert len(a.eval) == 200 and len(a.train) == 1800
    assert [e.where for e in a.eval] == [e.where for e in b.eval]
    assert [e.where for e in a.eval] != [e.where for e in c.eval]
    assert not {e.where for e in a.eval} & {e.where for e in a.train}
    assert len(load_dataset(files, val_size=25).eval) == 25
    with pytest.raises(DataError, match="leaves none for training"):
        load_dataset(files, val_size=2000)
    with pytest.raises(DataError, match="whole number"):
        load_dataset(files, val_size=2.5)


def test_val_split_comes_before_upsampling(shared_data):
    ident = str(shared_data / "identity.json")
    loaded = load_dataset(f"{ident}:300", val_size=10, seed=0)
    assert len(loaded.eval) == 10 and len(loaded.train) == 300
    assert not {e.where for e in loaded.eval} & {e.where for e in loaded.train}


# ----------------------------------------------------------------------------- tokenisation and the cache


class CountingTokenizer:
    """Wraps a tokenizer and counts encode calls (to see whether the cache skipped tokenisation)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.bos_token_id, self.eos_token_id = inner.bos_token_id, inner.eos_token_id
        self.vocab_file = inner.vocab_file

    def encode(self, text, add_special_tokens=False):
        self.calls += 1
        return self.inner.encode(text, add_special_tokens=add_special_tokens)


def test_cache_hit_on_second_call(tok, shared_data, tmp_path):
    path = tmp_path / "belle.jsonl"
    path.write_bytes((shared_data / "belle_dev1k.jsonl").read_bytes())
    counting = CountingTokenizer(tok)
    kw = dict(cutoff_len=256, num_workers=1, cache_dir=tmp_path / "cache")

    def run(template="baichuan2", **extra):
        return tokenize_dataset(load_dataset(str(path), max_samples=300).train, counting, template, **{**kw, **extra})

    first = run()
    calls = counting.calls
    assert first.stats["cache"] == "miss" and calls > 600
    second = run()
    assert second.stats["cache"] == "hit" and counting.calls == calls + 1  # +1: the tokenizer's probe
    assert len(second) == len(first) == 300
    for i in (0, 150, 299):
        assert np.array_equal(first[i]["input_ids"], second[i]["input_ids"])
        assert np.array_equal(first[i]["labels"], second[i]["labels"])
    # any change of option, template or file is a miss, and so is overwrite_cache
    assert run(cutoff_len=128).stats["cache"] == "miss"
    assert run("human_assistant").stats["cache"] == "miss"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert run().stats["cache"] == "miss"
    assert run(overwrite_cache=True).stats["cache"] == "miss"
    assert run().stats["cache"] == "hit"


def test_cache_files_are_plain_arrays(tok, shared_data, tmp_path):
    records = load_dataset(str(shared_data / "identity.json"), placeholders=["name=A", "author=B"]).train
    tokenize_dataset(records, tok, "baichuan2", cache_dir=tmp_path, num_workers=1)
    (folder,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert sorted(p.name for p in folder.iterdir()) == ["input_ids.npy", "input_ids.offsets.npy", "labels.npy",
                                                      "labels.offsets.npy", "meta.json"]
    ids = np.load(folder / "input_ids.npy", allow_pickle=False)
    assert ids.dtype == np.int32 and json.loads((folder / "meta.json").read_text())["stats"]["samples"] == 91
    # a broken cache folder is rebuilt rather than trusted
    (folder / "labels.npy").write_bytes(b"garbage")
    again = tokenize_dataset(records, tok, "baichuan2", cache_dir=tmp_path, num_workers=1)
    assert again.stats["cache"] == "miss" and len(again) == 91


def test_content_hash_when_records_have_no_fingerprint(tok, tmp_path):
    recs = [Example([("user", "hi"), ("assistant", "hello")], "x: record 1")]
    a = tokenize_dataset(recs, tok, "baichuan2", cache_dir=tmp_path, num_workers=1)
    b = tokenize_dataset(list(recs), tok, "baichuan2", cache_dir=tmp_path, num_workers=1)
    c = tokenize_dataset([Example([("user", "hi"), ("assistant", "bye")], "x: record 1")], tok, "baichuan2",
                         cache_dir=tmp_path, num_workers=1)
    assert (a.stats["cache"], b.stats["cache"], c.stats["cache"]) == ("miss", "hit", "miss")


def test_parallel_equals_serial_and_matches_template(tok, shared_data):
    from baichuan_tune.data.templates import get_template

    records = load_dataset(str(shared_data / "belle_dev1k.jsonl")).train
    serial = tokenize_dataset(records, tok, "baichuan2", cutoff_len=300, num_workers=1)
    parallel = tokenize_dataset(records, tok, "baichuan2", cutoff_len=300, num_workers=2, chunk_size=100)
    assert len(serial) == len(parallel) == 1000 and parallel.stats["workers"] == 2
    for c in ("input_ids", "labels"):
        assert np.array_equal(serial.flat[c], parallel.flat[c]) and np.array_equal(serial.offsets[c], parallel.offsets[c])
    for i in (0, 123, 999):
        enc = get_template("baichuan2").encode(tok, records[i].turns, cutoff_len=300)
        assert parallel[i]["input_ids"].tolist() == enc.input_ids and parallel[i]["labels"].tolist() == enc.labels
    assert serial.stats["truncated"] == sum(len(get_template("baichuan2").encode(tok, r.turns).input_ids) > 300
                                            for r in records)


def test_samples_without_targets_are_dropped_and_counted(tok):
    recs = [Example([("user", "很长的问题" * 20), ("assistant", "答")], "x: record 1"),
            Example([("user", "短"), ("assistant", "答")], "x: record 2")]
    ds = tokenize_dataset(recs, tok, "baichuan2", cutoff_len=10, num_workers=1)
    assert len(ds) == 1 and ds.stats["no_target"] == 1 and ds.stats["truncated"] == 1


def test_template_errors_name_the_record_or_are_skipped(tok, tmp_path):
    path = _write_jsonl(tmp_path / "sys.jsonl", [GOOD, {**GOOD, "system": "Be brief."}])
    records = load_dataset(str(path)).train
    with pytest.raises(DataError, match=rf"^{path}: record 2 \(line 2\), field 'system': this template has no system role"):
        tokenize_dataset(records, tok, "baichuan", num_workers=1)
    ds = tokenize_dataset(records, tok, "baichuan", num_workers=1, skip_bad_records=True)
    assert len(ds) == 1 and ds.stats["bad_records"] == 1


def test_pair_tokenisation(tok, shared_data):
    from baichuan_tune.data.templates import get_template

    records = load_dataset(str(shared_data / "dpo_zh_demo.json"), kind="pair").train
    ds = tokenize_dataset(records, tok, "baichuan2", cutoff_len=512, num_workers=2, chunk_size=50)
    assert ds.columns == ("prompt_ids", "chosen_ids", "rejected_ids") and len(ds) == 300
    for i in (0, 299):
        r = records[i]
        expected = get_template("baichuan2").encode_pair(tok, r.prompt, r.chosen, r.rejected, cutoff_len=512)
        assert [ds[i][c].tolist() for c in ds.columns] == list(expected[:3])
    assert (ds.lengths() <= 512).all()


def test_load_sft_data_one_call(tok, shared_data, tmp_path):
    files = [str(shared_data / "alpaca_zh_demo.json") + ":100", str(shared_data / "identity.json")]
    kw = dict(template="baichuan2", cutoff_len=256, val_size=0.1, seed=0, num_workers=1, cache_dir=str(tmp_path),
              placeholders={"name": "A", "author": "B"})
    train, val, report = load_sft_data(files, tok, **kw)
    loaded = load_dataset(files, val_size=0.1, seed=0, placeholders=kw["placeholders"])
    identity_in_val = sum("identity.json" in e.where for e in loaded.eval)
    assert len(val) == round(0.1 * 1091) == len(loaded.eval)
    assert len(train) == 100 + 91 - identity_in_val
    assert "alpaca_zh_demo.json: 100" in report and "cache miss" in report
    assert all(int(x["labels"][0]) == IGNORE_INDEX for x in train[:20])
    assert [x["input_ids"].tolist() for x in train[-3:]] == [
        tokenize_dataset(loaded.train[-3:], tok, "baichuan2", cutoff_len=256)[i]["input_ids"].tolist() for i in range(3)
    ]
    train2, _, report2 = load_sft_data(files, tok, **kw)
    assert "cache hit" in report2 and len(train2) == len(train)


def test_load_pair_data_one_call(tok, shared_data, tmp_path):
    train, val, report = load_pair_data([str(shared_data / "dpo_zh_demo.json")], tok, cutoff_len=256, val_size=20,
                                        num_workers=1, cache_dir="none")
    assert (len(train), len(val)) == (280, 20) and val.columns == train.columns == encoding.PAIR_COLUMNS
    assert "cache off" in report


@pytest.mark.parametrize("model", ["baichuan2-13b-chat", "baichuan-7b"])
def test_sentencepiece_fast_path_equals_the_tokenizer(shared_reference, shared_data, model):
    """The data layer's direct SentencePiece calls give the project tokenizer's ids on every real text."""
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    tok = BaichuanTokenizer.from_pretrained(str(shared_reference / model))
    fast = encoding._SentencePieceFastPath.wrap(tok)
    assert isinstance(fast, encoding._SentencePieceFastPath)
    texts = [t for rec in _raw(shared_data / "alpaca_zh_demo.json")[:300] + _raw(shared_data / "identity.json")
             for t in (rec["instruction"], rec["input"], rec["output"])]
    texts += [rec["text"][:2000] for rec in _raw(shared_data / "c4_demo.jsonl")[:50]]
    texts += ["Human: 你好\n\nAssistant: ", "said </s> then <s>", "<reserved_106>x", " a ", "\t\n"]
    for text in texts:
        assert fast.encode(text) == tok.encode(text, add_special_tokens=False), text[:80]


def test_builtin_demo_dataset():
    from baichuan_tune.builtin import demo_sft_records

    loaded = load_dataset("demo", val_size=0.1, seed=0)
    raw = demo_sft_records()
    assert len(loaded.train) + len(loaded.eval) == len(raw) and len(loaded.eval) == round(0.1 * len(raw))
    first = next(ex for ex in loaded.train if ex.where == "demo: record 1")
    user = raw[0]["instruction"] + ("\n" + raw[0]["input"] if raw[0]["input"] else "")
    assert first.turns == [("user", user), ("assistant", raw[0]["output"])]


def test_data_options_feed_the_loaders(tok, shared_data):
    from baichuan_tune.config import parse_config

    argv = ["--dataset", f"{shared_data / 'identity.json'},{shared_data / 'alpaca_zh_demo.json'}:20",
            "--val_size", "5", "--cutoff_len", "128", "--cache_dir", "none", "--name", "Bot", "--template", "baichuan"]
    options = parse_config(loading.DataOptions, argv)
    assert options.dataset == [str(shared_data / "identity.json"), f"{shared_data / 'alpaca_zh_demo.json'}:20"]
    train, val, report = load_sft_data(options.dataset, tok, **options.load_kwargs(seed=1))
    loaded = load_dataset(options.dataset, val_size=5, seed=1)
    identity_in_val = sum("identity.json" in e.where for e in loaded.eval)
    assert len(val) == 5 and len(train) == 91 - identity_in_val + 20
    assert "WARNING: no value for placeholders" not in report  # name and author come from the options
    assert train[0]["input_ids"][0] == 195 and "cache off" in report
