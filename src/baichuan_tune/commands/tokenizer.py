"""Train a SentencePiece BPE tokenizer the way Baichuan2's was built, and report its compression.

    baichuan-tune tokenizer train --input corpus.txt --input chats.jsonl --vocab-size 32000 --output_dir my-tokenizer \\
        --heldout heldout.txt --reference path/to/Baichuan2-7B-Chat

    # rebuild the built-in default model's tokenizer (src/baichuan_tune/assets/default):
    baichuan-tune tokenizer train --builtin --vocab-size 4096 --reserved 200 --fill-vocab \\
        --model-max-length 1024 --output_dir src/baichuan_tune/assets/default

Inputs: .txt files (one text per line) and .json/.jsonl files (every string value of every record; a value
with line breaks is split into lines). Trainer settings are those of the published Baichuan2 tokenizer.model:
BPE, one token per digit, byte fallback, identity normalisation without a leading "▁"; ids 0/1/2 are
<unk>/<s>/</s>, then `--reserved` <reserved_N> tokens. Training is single-threaded and reproducible.
The output folder (tokenizer.model, tokenizer_config.json, special_tokens_map.json, tokenizer_train.yaml) loads
with BaichuanTokenizer / AutoTokenizer. The report gives tokens per character and characters per token on
held-out text (--heldout, or every `heldout_every`-th input line, kept out of training) for the new tokenizer and
for --reference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from ..config import ConfigError, opt, parse_config, save_config
from ..errors import DataError

USAGE = """usage: baichuan-tune tokenizer train [CONFIG.yaml] [--key value ...]   (train --help for its options)

commands:
  train      train a Baichuan2-style SentencePiece BPE tokenizer and report its compression"""


@dataclasses.dataclass
class TrainTokenizerConfig:
    input: list[str] = opt(factory=list, help="training text files (.txt lines, .json/.jsonl string fields); repeat --input or separate with commas")
    builtin: bool = opt(False, "also train on the built-in corpus (baichuan_tune.builtin.tokenizer_corpus)")
    output_dir: str = opt("", "output folder for tokenizer.model, tokenizer_config.json, special_tokens_map.json")
    vocab_size: int = opt(32000, "number of pieces, including <unk> <s> </s>, reserved tokens and 256 byte pieces")
    reserved: int = opt(200, "<reserved_N> tokens right after <unk> <s> </s> (ids 3..); >= 194 makes ids 195/196 reserved, as Baichuan2's chat roles need")
    fill_vocab: bool = opt(False, "if the text supports fewer pieces than vocab_size, append unused <reserved_N> pieces to reach it")
    heldout: str | None = opt(None, "held-out text file for the compression report (same formats as --input)")
    heldout_every: int = opt(20, "without --heldout: every N-th input line is held out of training for the report (0: report on training text)")
    reference: str | None = opt(None, "a tokenizer.model, or a folder holding one, to compare compression against")
    max_piece_length: int = opt(32, "longest piece in characters (Baichuan2: 32)")
    character_coverage: float = opt(0.9998, "share of characters that get pieces of their own; the rest use bytes (Baichuan2: 0.9998)")
    model_max_length: int = opt(4096, "context length written to tokenizer_config.json")

    def validate(self) -> None:
        if not self.output_dir:
            raise ConfigError("command line: 'output_dir' is required (the folder to write the tokenizer to)")
        if not self.input and not self.builtin:
            raise ConfigError("command line: give training text with --input FILE (repeatable) or --builtin")
        if self.reserved < 0 or self.heldout_every < 0 or self.max_piece_length < 1:
            raise ConfigError("command line: 'reserved', 'heldout_every' and 'max_piece_length' cannot be negative or 0")
        smallest = 3 + self.reserved + 256 + 1
        if self.vocab_size < smallest:
            raise ConfigError(f"command line: 'vocab_size' {self.vocab_size} leaves no room for learned pieces "
                              f"(<unk> <s> </s> + {self.reserved} reserved + 256 bytes need at least {smallest})")
        if not 0 < self.character_coverage <= 1:
            raise ConfigError("command line: 'character_coverage' must be in (0, 1]")


# --- reading text ---------------------------------------------------------------------------------------------

def _strings(value):
    """Every string value inside a JSON value (keys are names, not text)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _json_records(path: Path, text: str):
    if path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        return
    try:
        yield json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a .txt file, or of every string value in a .json/.jsonl file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    if path.suffix in (".json", ".jsonl"):
        values = [s for record in _json_records(path, text) for s in _strings(record)]
        lines = [line for value in values for line in value.splitlines()]
    else:
        lines = text.splitlines()
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise DataError(f"{path}: no text in it")
    return lines


def split_heldout(lines: list[str], every: int) -> tuple[list[str], list[str]]:
    if every <= 0:
        return lines, lines
    return ([line for i, line in enumerate(lines) if i % every != every - 1],
            [line for i, line in enumerate(lines) if i % every == every - 1])


# --- output ---------------------------------------------------------------------------------------------------

def write_tokenizer(model: bytes, cfg: TrainTokenizerConfig) -> Path:
    """Write the tokenizer files into cfg.output_dir: built in a staging folder, then each file renamed into place,
    so an existing folder (say, a checkpoint) keeps its other files and never holds a half-written one."""
    from ..models.tokenization_baichuan import VOCAB_FILE, BaichuanTokenizer

    out = Path(cfg.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tokenizer-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        (staging / VOCAB_FILE).write_bytes(model)
        tokenizer = BaichuanTokenizer(vocab_file=str(staging / VOCAB_FILE), model_max_length=cfg.model_max_length)
        tokenizer.save_pretrained(staging)
        save_config(cfg, staging / "tokenizer_train.yaml")
        out.mkdir(exist_ok=True)
        for name in (VOCAB_FILE, "tokenizer_config.json", "special_tokens_map.json", "tokenizer_train.yaml"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load_reference(path: str):
    from ..models.tokenization_baichuan import VOCAB_FILE, BaichuanTokenizer, check_sentencepiece_file

    path = Path(path)
    model = path / VOCAB_FILE if path.is_dir() else path
    return BaichuanTokenizer(vocab_file=str(check_sentencepiece_file(model)))


def report(rows: list[tuple[str, object]], heldout: list[str], heldout_source: str) -> str:
    from ..models.tokenization_baichuan import compression

    stats = [(name, len(tok), compression(tok, heldout)) for name, tok in rows]
    first, width = stats[0][2], max(len("tokenizer"), *(len(name) for name, _ in rows))
    lines = [f"compression on {heldout_source}: {first['lines']} lines, {first['chars']} characters",
             f"  {'tokenizer':<{width}} {'vocab':>7} {'tokens':>9} {'tokens/char':>12} {'chars/token':>12}"]
    for name, vocab, s in stats:
        lines.append(f"  {name:<{width}} {vocab:>7} {s['tokens']:>9} {s['tokens_per_char']:>12.4f}"
                     f" {s['chars_per_token']:>12.4f}")
    return "\n".join(lines)


# --- command --------------------------------------------------------------------------------------------------

def _merge_repeated(argv: list[str], key: str = "--input") -> list[str]:
    """`--input a --input b` -> `--input a,b` (the config parser keeps one value per key)."""
    values, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == key and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if argv[i].startswith(key + "="):
            values.append(argv[i].split("=", 1)[1])
        else:
            rest.append(argv[i])
        i += 1
    return rest + ([key, ",".join(values)] if values else [])


def train(argv: list[str]) -> int:
    from .. import builtin
    from ..models.tokenization_baichuan import BaichuanTokenizer, train_sentencepiece

    cfg = parse_config(TrainTokenizerConfig, _merge_repeated(argv), prog="baichuan-tune tokenizer train")
    reference = load_reference(cfg.reference) if cfg.reference else None  # fail on a bad path before training
    lines = [line for path in cfg.input for line in read_text_lines(path)]
    if cfg.builtin:
        lines += builtin.tokenizer_corpus()
    if cfg.heldout:
        training, heldout, source = lines, read_text_lines(cfg.heldout), f"held-out file {cfg.heldout}"
    else:
        training, heldout = split_heldout(lines, cfg.heldout_every)
        source = f"held-out text (every {cfg.heldout_every}th input line, not trained on)"
        if not heldout or not cfg.heldout_every:
            training, heldout, source = lines, lines, "the training text (nothing held out)"
    model = train_sentencepiece(training, cfg.vocab_size, cfg.reserved, cfg.fill_vocab, cfg.max_piece_length,
                                cfg.character_coverage)
    out = write_tokenizer(model, cfg)
    new = BaichuanTokenizer.from_pretrained(out)
    print(f"wrote {out}: {len(new)} pieces, trained on {len(training)} lines; "
          f"ids 195/196 = {' / '.join(new.convert_ids_to_tokens([195, 196])) if len(new) > 196 else 'n/a'}")
    if cfg.reserved < 194:
        print("note: ids 195/196 are not reserved tokens; the Baichuan2 chat format uses them (--reserved 194 or more)")
    rows = [(f"new: {out}", new)] + ([(f"reference: {cfg.reference}", reference)] if reference else [])
    print(report(rows, heldout, source))
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] != "train":
        raise ConfigError(f"unknown tokenizer command '{argv[0]}'; the tokenizer commands are: train")
    return train(argv[1:])
