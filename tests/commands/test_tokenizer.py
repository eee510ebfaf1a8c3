"""`baichuan-tune tokenizer train`: a Baichuan2-style tokenizer from text files, its files, and its compression report."""

from __future__ import annotations

import json
import re

import pytest
import sentencepiece as spm
from conftest import REFERENCE, need_shared
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import AutoTokenizer

import baichuan_tune  # noqa: F401  (registers the Auto classes)
from baichuan_tune import cli
from baichuan_tune.builtin import DEFAULT_TOKENIZER
from baichuan_tune.commands.tokenizer import main
from baichuan_tune.errors import CheckpointError, DataError
from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

WORDS = ["river", "mountain", "garden", "window", "yellow", "summer", "quiet", "market", "letter", "bridge"]
ZH = ["今天天气很好", "我们去公园散步", "山上有很多树", "他在看书", "这是一个问题"]


def write_corpus(folder):
    """A .txt, a .jsonl and a .json file; 'zebrafish' only occurs inside JSON string values."""
    lines = [f"The {WORDS[i % 10]} and the {WORDS[(i * 3) % 10]} are {i % 7} km apart. {ZH[i % 5]}。" for i in range(300)]
    (folder / "a.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(folder / "b.jsonl", "w", encoding="utf-8") as fh:
        for i in range(100):
            fh.write(json.dumps({"instruction": f"zebrafish {WORDS[i % 10]}", "output": f"zebrafish\n{ZH[i % 5]}"}) + "\n")
    (folder / "c.json").write_text(json.dumps([{"text": "zebrafish swim", "meta": {"note": "zebrafish"}}] * 20))
    (folder / "heldout.txt").write_text("The quiet garden is 42 km away. 今天我们去看书。\nzebrafish 🦙 Ω\n", encoding="utf-8")
    return [str(folder / name) for name in ("a.txt", "b.jsonl", "c.json")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Train once with the command line a user types; return (output folder, printed report)."""
    folder = tmp_path_factory.mktemp("corpus")
    inputs = write_corpus(folder)
    out = folder / "tok"
    argv = ["train", "--input", inputs[0], "--input", inputs[1], "--input", inputs[2], "--vocab-size", "400",
            "--reserved", "8", "--output_dir", str(out), "--heldout", str(folder / "heldout.txt"),
            "--reference", str(DEFAULT_TOKENIZER)]
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(argv) == 0
    return out, buf.getvalue(), folder


def test_output_folder_loads_with_autotokenizer(trained):
    out, _, _ = trained
    assert {p.name for p in out.iterdir()} >= {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(tok, BaichuanTokenizer) and len(tok) == 400
    assert tok.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert (tok.pad_token_id, tok.add_bos_token, tok.add_eos_token) == (0, False, False)


def test_reserved_tokens_sit_right_after_the_fixed_ids(trained):
    tok = BaichuanTokenizer.from_pretrained(trained[0])
    assert tok.convert_ids_to_tokens(list(range(3, 11))) == [f"<reserved_{i}>" for i in range(8)]
    assert tok.convert_ids_to_tokens(11) == "<0x00>"  # then the 256 byte pieces
    assert tok("<reserved_5>").input_ids == [8]
    assert tok("river<reserved_0>garden").input_ids.count(3) == 1


def test_digits_are_one_token_each(trained):
    tok = BaichuanTokenizer.from_pretrained(trained[0])
    ids = tok("2024 and 31415926").input_ids
    digit_tokens = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert "".join(digit_tokens) == "202431415926" and all(len(t) == 1 for t in digit_tokens)


def test_byte_fallback_covers_characters_never_seen(trained):
    tok = BaichuanTokenizer.from_pretrained(trained[0])
    text = "Ω 🦙 𠀀 café"  # none of these characters is in the training text
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids
    assert sum(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids)) >= 4 + 4 + 2 + 2
    assert tok.decode(ids) == text


def test_text_is_read_from_json_and_jsonl_string_values(trained):
    tok = BaichuanTokenizer.from_pretrained(trained[0])
    assert tok.tokenize("zebrafish") == ["zebrafish"]  # only in the JSON files, frequent enough to be one piece
    assert "instruction" not in tok.get_vocab()  # keys are not text


def test_identity_normaliser_without_dummy_prefix(trained):
    tok = BaichuanTokenizer.from_pretrained(trained[0])
    for text in ["river  garden", " leading space", "ｆｕｌｌ width"]:
        assert tok.decode(tok(text).input_ids) == text
    assert not tok.tokenize("river")[0].startswith("▁")


def _row(report: str, label: str) -> list[float]:
    line = next(line for line in report.splitlines() if line.strip().startswith(label))
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", line.split(":", 1)[1].split(None, 1)[1])]


def test_compression_report_gives_both_numbers_for_new_and_reference(trained):
    out, report, folder = trained
    heldout = [line for line in (folder / "heldout.txt").read_text(encoding="utf-8").splitlines() if line]
    chars = sum(len(line) for line in heldout)
    assert f"{len(heldout)} lines, {chars} characters" in report
    for label, model in (("new:", out / "tokenizer.model"), ("reference:", DEFAULT_TOKENIZER)):
        sp = spm.SentencePieceProcessor(model_file=str(model))
        tokens = sum(len(sp.encode(line)) for line in heldout)  # independent count with plain sentencepiece
        vocab, printed_tokens, per_char, per_token = _row(report, label)
        assert (vocab, printed_tokens) == (sp.get_piece_size(), tokens)
        assert per_char == pytest.approx(tokens / chars, abs=1e-4)
        assert per_token == pytest.approx(chars / tokens, abs=1e-4)


def test_trainer_spec_matches_the_published_baichuan2_tokenizer(trained):
    ours = pb.ModelProto.FromString((trained[0] / "tokenizer.model").read_bytes())
    published = pb.ModelProto.FromString(need_shared(REFERENCE / "baichuan2-13b-chat" / "tokenizer.model").read_bytes())
    for field in ("model_type", "split_digits", "byte_fallback", "allow_whitespace_only_pieces",
                  "max_sentencepiece_length", "character_coverage", "split_by_whitespace"):
        assert getattr(ours.trainer_spec, field) == getattr(published.trainer_spec, field), field
    for field in ("name", "add_dummy_prefix", "remove_extra_whitespaces", "escape_whitespaces"):
        assert getattr(ours.normalizer_spec, field) == getattr(published.normalizer_spec, field), field
    assert [(p.piece, p.type) for p in ours.pieces[:3]] == [(p.piece, p.type) for p in published.pieces[:3]]


def test_builtin_asset_is_what_the_documented_command_builds(tmp_path, capsys):
    argv = ["train", "--builtin", "--vocab-size", "4096", "--reserved", "200", "--fill-vocab",
            "--model-max-length", "1024", "--output_dir", str(tmp_path / "default")]
    assert main(argv) == 0
    assert (tmp_path / "default" / "tokenizer.model").read_bytes() == DEFAULT_TOKENIZER.read_bytes()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "default" / name).read_text() == (DEFAULT_TOKENIZER.parent / name).read_text()
    assert "ids 195/196 = <reserved_192> / <reserved_193>" in capsys.readouterr().out


def test_vocab_larger_than_the_text_supports_is_an_error_unless_filled(tmp_path):
    inputs = write_corpus(tmp_path)
    with pytest.raises(DataError, match="supports only .* pieces, fewer than vocab_size 5000"):
        main(["train", "--input", inputs[0], "--vocab-size", "5000", "--reserved", "8", "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()  # nothing written


def test_existing_folder_keeps_its_other_files(tmp_path):
    inputs = write_corpus(tmp_path)
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "config.json").write_text("{}")
    main(["train", "--input", inputs[0], "--vocab-size", "360", "--reserved", "4", "--output_dir", str(out)])
    assert (out / "config.json").read_text() == "{}"
    assert len(BaichuanTokenizer.from_pretrained(out)) == 360
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


@pytest.mark.parametrize("argv,message", [
    (["train", "--input", "{missing}", "--output_dir", "{out}"], "missing.txt: file not found"),
    (["train", "--input", "{bad}", "--output_dir", "{out}"], "bad.jsonl: line 2 is not valid JSON"),
    (["train", "--output_dir", "{out}"], "give training text with --input"),
    (["train", "--input", "{good}", "--output_dir", "{out}", "--vocab-size", "100"], "leaves no room for learned pieces"),
    (["train", "--input", "{good}", "--output_dir", "{out}", "--vocab-sise", "300"], "did you mean 'vocab_size'"),
    (["train", "--input", "{good}", "--output_dir", "{out}", "--vocab-size", "270", "--reserved", "0"], "too small for this text"),
    (["train", "--input", "{good}", "--output_dir", "{out}", "--reference", "{missing}"], "missing.txt: missing"),
    (["tran"], "unknown tokenizer command 'tran'"),
])
def test_bad_input_is_one_clear_error(argv, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    (tmp_path / "good.txt").write_text("The quick brown fox jumps over the lazy dog 0123456789 今天天气很好\n")
    names = {"missing": tmp_path / "missing.txt", "bad": tmp_path / "bad.jsonl", "good": tmp_path / "good.txt",
             "out": tmp_path / "out"}
    argv = [a.format(**names) for a in argv]
    assert cli.main(["tokenizer", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_reference_that_is_not_a_tokenizer_fails_before_training(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"junk")
    (tmp_path / "good.txt").write_text("some text\n")
    with pytest.raises(CheckpointError, match="not a valid SentencePiece"):
        main(["train", "--input", str(tmp_path / "good.txt"), "--output_dir", str(tmp_path / "out"),
              "--reference", str(tmp_path)])
    assert not (tmp_path / "out").exists()


def test_without_heldout_file_every_20th_line_is_held_out(tmp_path, capsys):
    inputs = write_corpus(tmp_path)
    lines = [line for line in (tmp_path / "a.txt").read_text(encoding="utf-8").splitlines() if line]
    main(["train", "--input", inputs[0], "--vocab-size", "360", "--reserved", "4", "--output_dir", str(tmp_path / "o")])
    out = capsys.readouterr().out
    heldout = lines[19::20]
    assert f"trained on {len(lines) - len(heldout)} lines" in out
    assert f"held-out text (every 20th input line, not trained on): {len(heldout)} lines, " \
           f"{sum(len(line) for line in heldout)} characters" in out
    assert "note: ids 195/196 are not reserved tokens" in out  # only 4 reserved


def test_too_little_text_to_hold_out_reports_on_the_training_text(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("The quick brown fox jumps over the lazy dog 0123456789 今天天气很好\n")
    main(["train", "--input", str(tmp_path / "one.txt"), "--vocab-size", "320", "--reserved", "4",
          "--output_dir", str(tmp_path / "o")])
    assert "compression on the training text (nothing held out): 1 lines" in capsys.readouterr().out
