"""Training data: read instruction and preference files, mix them, split off an eval set, tokenise in
parallel and cache the result on disk.

Reading normalises every record to a list of turns `(role, text)`: an optional system turn, then
alternating user/assistant turns (see `templates.py`); a pre-training record is `[("text", ...)]`.
Record forms, told apart by their fields:

- alpaca/BELLE: `instruction`, `input` (optional), `output`, optional `system` and `history`
  (a list of `[user, assistant]` pairs before this exchange); the prompt is instruction + "\\n" + input;
- the Baichuan2 fine-tune form: `conversations` = `[{"from": "human"|"gpt"|"system", "value": ...}]`;
- OpenAI-style `messages` = `[{"role": "system"|"user"|"assistant", "content": ...}]`;
- plain text `{"text": ...}`;
- preference pairs: `conversations` (ending with a user turn) or `messages`, or flat `prompt` (or
  `instruction` + `input`, with optional `system`/`history`), plus `chosen` and `rejected`, each a
  string or a `{from|role, value|content}` object.

Instruction data (sft) must carry no preference fields: a pair (`chosen`/`rejected`) or a boolean
`label`/`kto_tag` (KTO-style data: one answer judged good or bad) is refused, since sft would learn every
answer, the rejected and bad ones too. Pair data (rm, dpo) must have both answers; an unpaired labelled
record is named as such.

`dataset` entries are file paths (`.json` = a JSON list, `.jsonl` = one object per line), optionally
with a sample count `a.json:500` (draws 500 records, repeating the file when it holds fewer) or a ratio
`a.json:0.5` (half of it; `:2.0` = twice); `demo` is the built-in demo set. A bad record is a
DataError naming the file, record number (1-based; and line for JSONL) and field, or, with
`skip_bad_records`, skipped and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import opt
from ..errors import DataError

CACHE_FORMAT = 2  # bump when the cached arrays or the encoding rules change (2: per-template input_join)
DEMO_DATASET = "demo"
MAX_PROBLEMS = 20  # skipped-record messages kept for the log
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
PREFERENCE_LABELS = ("label", "kto_tag")  # a boolean: this record's answer is good (true) or bad (false)
FROM_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGE_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}

Turn = tuple[str, str]


@dataclass
class DataOptions:
    """Data options of sft, rm and dpo; a command's config inherits them (see `load_kwargs`)."""

    dataset: list[str] = opt(factory=list, help="data files (.json/.jsonl), each optionally path:COUNT or path:RATIO")
    template: Literal["baichuan2", "baichuan", "human_assistant", "base"] = opt("baichuan2", "chat format of the samples")
    cutoff_len: int = opt(1024, "maximum tokens per sample (and per packed row)")
    max_source_length: int = opt(0, "per-part truncation: maximum prompt tokens per round (0: off)")
    max_target_length: int = opt(0, "per-part truncation: maximum answer tokens per round (0: off)")
    max_samples: int = opt(0, "read at most this many records from each file (0: all)")
    val_size: float = opt(0.0, "eval split: a fraction (< 1) or a number of records (>= 1); 0: none")
    skip_bad_records: bool = opt(False, "skip malformed records (and count them) instead of stopping")
    preprocessing_num_workers: int = opt(2, "tokenisation processes (0: one per CPU core, at most 8)")
    cache_dir: str = opt("", "tokenised-data cache ('': inside the user cache, 'none': off)")
    overwrite_cache: bool = opt(False, "tokenise again even if a cached copy exists")
    name: str = opt("Baichuan", "replaces {{name}} in identity-style data")
    author: str = opt("Baichuan Inc.", "replaces {{author}} in identity-style data")

    def check_data_options(self) -> None:
        """Reject data options that would fail, or silently cut the data wrong, only after the model loaded."""
        from ..config import ConfigError

        for name in ("cutoff_len",):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_source_length", "max_target_length", "max_samples", "preprocessing_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (0 means off / all), got {getattr(self, name)}")
        if self.val_size < 0 or (self.val_size >= 1 and not float(self.val_size).is_integer()):
            raise ConfigError(f"val_size must be a fraction below 1 or a whole number of records, got {self.val_size}")
        for spec in self.dataset:
            source = parse_dataset_spec(spec)
            if source.path != DEMO_DATASET and not Path(source.path).is_file():
                raise ConfigError(f"{source.path}: data file not found")

    def load_kwargs(self, seed: int) -> dict:
        """Keyword arguments of `load_pair_data` (and, with SFTDataOptions' own, of `load_sft_data`)."""
        return dict(template=self.template, cutoff_len=self.cutoff_len, max_source_length=self.max_source_length,
                    max_target_length=self.max_target_length, max_samples=self.max_samples,
                    val_size=self.val_size, seed=seed, skip_bad_records=self.skip_bad_records,
                    num_workers=self.preprocessing_num_workers, cache_dir=self.cache_dir or None,
                    placeholders={"name": self.name, "author": self.author}, overwrite_cache=self.overwrite_cache)


@dataclass
class SFTDataOptions(DataOptions):
    """DataOptions plus what only instruction data takes (preference pairs always learn just their two answers,
    and a batch of pairs holds whole pairs, so rm and dpo offer neither)."""

    train_on: Literal["all", "last"] = opt("all", "multi-turn: learn every assistant answer, or only the last")
    packing: bool = opt(False, "pack short samples into rows of cutoff_len tokens (no attention across samples)")

    def load_kwargs(self, seed: int) -> dict:
        return {**super().load_kwargs(seed), "train_on": self.train_on}


@dataclass(slots=True)
class Example:
    """One training conversation; `where` names its file and record for error messages."""

    turns: list[Turn]
    where: str


@dataclass(slots=True)
class PairExample:
    """One preference record: a prompt (ending with a user turn) and two answers."""

    prompt: list[Turn]
    chosen: str
    rejected: str
    where: str


class RecordList(list):
    """A list of records that remembers where it came from: `fingerprint` (the cache key) and `kind`."""

    fingerprint: str | None = None
    kind: str = "sft"


@dataclass
class LoadedData:
    train: RecordList
    eval: RecordList
    skipped: int = 0
    problems: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # per file: training records (after counts/ratios)
    unfilled_placeholders: list[str] = field(default_factory=list)
    read: dict[str, int] = field(default_factory=dict)  # per file: good records read (both splits)
    drawn: dict[str, int] = field(default_factory=dict)  # per file with a count or ratio: its training records


class _Bad(Exception):
    """A problem in one record; the reader adds the file and record number."""

    def __init__(self, field_name: str, problem: str):
        super().__init__(problem)
        self.field = field_name
        self.problem = problem


@dataclass(frozen=True)
class DataSource:
    path: str
    count: int | None = None
    ratio: float | None = None


def parse_dataset_spec(spec: str) -> DataSource:
    """`path`, `path:COUNT` or `path:RATIO` (a number with a decimal point) -> DataSource."""
    spec = str(spec).strip()
    path, sep, suffix = spec.rpartition(":")
    if sep and path and re.fullmatch(r"\d+", suffix):
        if int(suffix) == 0:
            raise DataError(f"dataset '{spec}': the sample count must be at least 1")
        return DataSource(path, count=int(suffix))
    if sep and path and re.fullmatch(r"\d*\.\d+|\d+\.\d*", suffix):
        if float(suffix) <= 0:
            raise DataError(f"dataset '{spec}': the ratio must be positive")
        return DataSource(path, ratio=float(suffix))
    return DataSource(spec)


# ----------------------------------------------------------------------------- reading files


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__
    )


def _is_json_list(path: Path) -> bool:
    """A file whose first non-blank character is '[' is one JSON list; anything else is read as JSONL."""
    with open(path, "rb") as fh:
        while chunk := fh.read(4096):
            stripped = chunk.lstrip()
            if stripped:
                return stripped.startswith(b"[") or stripped.startswith(b"\xef\xbb\xbf[")
    return False


def _open_text(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    return open(path, encoding="utf-8-sig")


def iter_json_records(path: str | Path):
    """Yield `(where, object, line_error)` for each record of a .json list or .jsonl file.

    `where` is "FILE: record N" (with "(line L)" for JSONL). A line that is not valid JSON yields
    `line_error` (and object None), so the caller can stop or skip; a broken .json list is a DataError.
    """
    path = Path(path)
    try:
        with _open_text(path) as fh:
            if _is_json_list(path):
                yield from _iter_json_list(path, fh)
                return
            record = 0
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                record += 1
                where = f"{path}: record {record} (line {line_no})"
                try:
                    yield where, json.loads(line), None
                except json.JSONDecodeError as exc:
                    yield where, None, f"{path}: line {line_no}: invalid JSON ({exc.msg} at column {exc.colno})"
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _iter_json_list(path: Path, fh):
    try:
        data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {_type_name(data)}")
    for i, obj in enumerate(data, 1):
        yield f"{path}: record {i}", obj, None


# ----------------------------------------------------------------------------- one record -> turns


def _string(obj: dict, key: str, *, required: bool = True, nonempty: bool = False, name: str | None = None) -> str:
    name = name or key
    if key not in obj or obj[key] is None:
        if required:
            raise _Bad(name, "missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(name, f"expected a string, got {_type_name(value)}")
    if nonempty and not value.strip():
        raise _Bad(name, "empty")
    return value


def _role_list(items: Any, name: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[tuple[str, str, str]]:
    """`[{role_key: ..., text_key: ...}]` -> [(role, text, field name)]."""
    if not isinstance(items, list):
        raise _Bad(name, f"expected a list of turns, got {_type_name(items)}")
    turns = []
    for i, item in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(item, dict):
            raise _Bad(where, f"expected an object with '{role_key}' and '{text_key}', got {_type_name(item)}")
        role = _string(item, role_key, name=f"{where}.{role_key}")
        if role not in roles:
            raise _Bad(f"{where}.{role_key}", f"unknown role '{role}' (expected one of {', '.join(roles)})")
        turns.append((roles[role], _string(item, text_key, name=f"{where}.{text_key}"), f"{where}.{text_key}"))
    return turns


def _history(obj: dict) -> list[tuple[str, str, str]]:
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise _Bad("history", f"expected a list of [user, assistant] pairs, got {_type_name(history)}")
    turns = []
    for i, pair in enumerate(history):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok:
            raise _Bad(f"history[{i}]", f"expected a [user, assistant] pair of strings, got {json.dumps(pair, ensure_ascii=False)[:80]}")
        turns += [("user", pair[0], f"history[{i}][0]"), ("assistant", pair[1], f"history[{i}][1]")]
    return turns


def _alpaca_prompt(obj: dict, input_join: str = "\n") -> list[tuple[str, str, str]]:
    """system, history and the instruction (+ input_join + input) of an alpaca/BELLE or flat preference record."""
    turns = []
    system = _string(obj, "system", required=False)
    if system:
        turns.append(("system", system, "system"))
    turns += _history(obj)
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", required=False)
    prompt = f"{instruction}{input_join}{extra}" if extra else instruction
    if not prompt.strip():
        raise _Bad("instruction", "empty prompt (instruction and input are both empty)")
    return turns + [("user", prompt, "instruction")]


def _check_alternation(turns: list[tuple[str, str, str]], end: str) -> None:
    """[system] user assistant user ... ending with `end`; answers must not be empty."""
    body = turns[1:] if turns and turns[0][0] == "system" else turns
    if any(role == "system" for role, _, _ in body):
        name = next(n for role, _, n in body if role == "system")
        raise _Bad(name, "a system turn may only come first")
    for i, (role, text, name) in enumerate(body):
        expected = "a user" if i % 2 == 0 else "an assistant"
        if role != expected.split()[1]:
            raise _Bad(name, f"expected {expected} turn here, got {role} (turns must alternate user/assistant)")
        if role == "assistant" and not text.strip():
            raise _Bad(name, "empty answer")
    if not body:
        raise _Bad("record", "no user turn")
    if body[-1][0] != end:
        raise _Bad(body[-1][2], f"the conversation must end with {'an assistant answer' if end == 'assistant' else 'a user turn'}")


def _listed_turns(obj: dict) -> list[tuple[str, str, str]] | None:
    """The turns of a Baichuan2 `conversations` or OpenAI `messages` record; None for the other forms."""
    if "conversations" in obj:
        return _role_list(obj["conversations"], "conversations", "from", "value", FROM_ROLES)
    if "messages" in obj:
        return _role_list(obj["messages"], "messages", "role", "content", MESSAGE_ROLES)
    return None


def _refuse_preference_fields(obj: dict) -> None:
    """Instruction data with preference fields: sft learns every answer it is given, whatever the label."""
    for key in ("chosen", "rejected"):
        if key in obj:
            raise _Bad(key, "a preference pair (chosen/rejected answers): sft would learn the rejected answer too; "
                            "train on pairs with `baichuan-tune rm` or `baichuan-tune dpo`")
    for key in PREFERENCE_LABELS:
        if isinstance(obj.get(key), bool):
            raise _Bad(key, "a preference label (true/false) marks KTO-style data, for KTO training ("
                            "`baichuan-tune kto`); sft would learn every answer, the bad ones too. Use rm/dpo with "
                            "paired chosen/rejected data, or drop the field to train on every answer")


def sft_turns(obj: Any, input_join: str = "\n", preference_fields: bool = False) -> list[Turn]:
    """Normalise one instruction/chat/text record to turns; raises _Bad(field, problem).

    `preference_fields`: allow chosen/rejected or a preference label (ppo reads prompts and drops the answers)."""
    if not isinstance(obj, dict):
        raise _Bad("record", f"expected a JSON object, got {_type_name(obj)}")
    if not preference_fields:
        _refuse_preference_fields(obj)
    if (turns := _listed_turns(obj)) is not None:
        pass
    elif "instruction" in obj or "output" in obj:
        turns = _alpaca_prompt(obj, input_join)
        turns.append(("assistant", _string(obj, "output"), "output"))
    elif "text" in obj:
        return [("text", _string(obj, "text", nonempty=True))]
    else:
        raise _Bad("record", f"no known fields in {sorted(obj)[:6]} (expected instruction/output, conversations, messages or text)")
    _check_alternation(turns, end="assistant")
    return [(role, text) for role, text, _ in turns]


def _answer(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, dict):
        role = value.get("from", value.get("role", "assistant"))
        if FROM_ROLES.get(role) != "assistant":
            raise _Bad(f"{key}.from", f"expected an assistant answer, got role '{role}'")
        text_key = "value" if "value" in value else "content"
        return _string(value, text_key, nonempty=True, name=f"{key}.{text_key}")
    return _string(obj, key, nonempty=True)


def _require_a_pair(obj: dict) -> None:
    """A record with neither answer is no pair: say so (not that its conversation ends with an answer)."""
    if "chosen" in obj or "rejected" in obj:
        return
    label = next((key for key in PREFERENCE_LABELS if isinstance(obj.get(key), bool)), None)
    if label is not None:
        raise _Bad(label, "an unpaired preference record (one answer labelled good or bad, KTO-style data for KTO "
                          "training with `baichuan-tune kto`); rm and dpo learn from pairs: give each prompt a "
                          "'chosen' and a 'rejected' answer")
    raise _Bad("chosen", "missing: rm and dpo learn from preference pairs, a prompt with a 'chosen' and a 'rejected' "
                         "answer (instruction data with one answer is for `baichuan-tune sft`)")


def pair_fields(obj: Any, input_join: str = "\n") -> tuple[list[Turn], str, str]:
    """Normalise one preference record to (prompt turns, chosen, rejected); raises _Bad(field, problem)."""
    if not isinstance(obj, dict):
        raise _Bad("record", f"expected a JSON object, got {_type_name(obj)}")
    _require_a_pair(obj)
    if (turns := _listed_turns(obj)) is not None:
        pass
    elif "prompt" in obj:
        turns = [("system", s, "system") for s in [_string(obj, "system", required=False)] if s] + _history(obj)
        turns.append(("user", _string(obj, "prompt", nonempty=True), "prompt"))
    elif "instruction" in obj:
        turns = _alpaca_prompt(obj, input_join)
    else:
        raise _Bad("record", f"no prompt field in {sorted(obj)[:6]} (expected conversations, messages, prompt or instruction)")
    _check_alternation(turns, end="user")
    chosen, rejected = _answer(obj, "chosen"), _answer(obj, "rejected")
    return [(role, text) for role, text, _ in turns], chosen, rejected


# ----------------------------------------------------------------------------- files -> records


def parse_placeholders(items: list[str] | dict[str, str] | None) -> dict[str, str]:
    """`["name=Bot", "author=Lab"]` (or a dict) -> {"name": "Bot", "author": "Lab"}."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): str(v) for k, v in items.items()}
    values = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise DataError(f"placeholder '{item}' must be written name=value")
        values[key.strip()] = value
    return values


class _Filler:
    """Replaces {{name}} placeholders and remembers the names it had no value for."""

    def __init__(self, values: dict[str, str]):
        self.values = values
        self.unfilled: set[str] = set()

    def _sub(self, match: re.Match) -> str:
        name = match.group(1)
        if name in self.values:
            return self.values[name]
        self.unfilled.add(name)
        return match.group(0)

    def __call__(self, text: str) -> str:
        return PLACEHOLDER.sub(self._sub, text) if "{{" in text else text

    def turns(self, turns: list[Turn]) -> list[Turn]:
        return [(role, self(text)) for role, text in turns]


@dataclass
class _FileRecords:
    source: DataSource
    records: list = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)


def _demo_objects():
    from ..builtin import demo_sft_records

    for i, obj in enumerate(demo_sft_records(), 1):
        yield f"{DEMO_DATASET}: record {i}", obj, None


def _read_source(source: DataSource, kind: str, max_samples: int, fill: _Filler, skip_bad: bool,
                 input_join: str = "\n") -> _FileRecords:
    """Read, normalise and check one file's records (the first `max_samples` good ones when > 0)."""
    out = _FileRecords(source)
    is_demo = source.path == DEMO_DATASET and not Path(source.path).exists()
    objects = _demo_objects() if is_demo else iter_json_records(source.path)
    for where, obj, line_error in objects:
        try:
            if line_error:
                raise DataError(line_error)
            out.records.append(_make_record(obj, where, kind, fill, input_join))
        except (_Bad, DataError) as exc:
            message = f"{where}, field '{exc.field}': {exc.problem}" if isinstance(exc, _Bad) else str(exc)
            if not skip_bad:
                raise DataError(message) from None
            out.skipped += 1
            if len(out.problems) < MAX_PROBLEMS:
                out.problems.append(message)
        if max_samples and len(out.records) >= max_samples:
            break
    if not out.records:
        raise DataError(f"{source.path}: no usable records" + (f" ({out.skipped} skipped as bad)" if out.skipped else ""))
    return out


def _make_record(obj: Any, where: str, kind: str, fill: _Filler, input_join: str = "\n"):
    if kind == "pair":
        prompt, chosen, rejected = pair_fields(obj, input_join)
        return PairExample(fill.turns(prompt), fill(chosen), fill(rejected), where)
    if kind == "unpaired":  # kto's labelled answers (data/unpaired.py)
        from .unpaired import UnpairedExample, unpaired_fields

        prompt, answers = unpaired_fields(obj, input_join)
        return UnpairedExample(fill.turns(prompt), [(fill(a), label) for a, label in answers], where)
    return Example(fill.turns(sft_turns(obj, input_join, preference_fields=kind == "prompt")), where)


def _resample(records: list, n: int, rng: random.Random) -> list:
    """`n` records: whole copies of the list, then a seeded draw (in file order) for the remainder."""
    copies, rest = divmod(n, len(records))
    picked = sorted(rng.sample(range(len(records)), rest))
    return records * copies + [records[i] for i in picked]


def _eval_indices(total: int, val_size: float, seed: int) -> set[int]:
    if not val_size:
        return set()
    if val_size < 0 or (val_size >= 1 and not float(val_size).is_integer()):
        raise DataError(f"val_size must be a fraction below 1 or a whole number of records, got {val_size}")
    count = int(val_size) if val_size >= 1 else max(1, round(val_size * total))
    if count >= total:
        raise DataError(f"val_size {val_size} takes {count} of {total} records and leaves none for training")
    return set(random.Random(seed).sample(range(total), count))


def _source_state(source: DataSource) -> list:
    path = Path(source.path)
    if source.path == DEMO_DATASET and not path.exists():
        from ..builtin import demo_sft_records

        return [DEMO_DATASET, _hash_json(demo_sft_records()), source.count, source.ratio]
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, source.count, source.ratio]


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def load_dataset(dataset: str | list[str], *, kind: Literal["sft", "pair", "prompt", "unpaired"] = "sft", max_samples: int = 0,
                 val_size: float = 0.0, seed: int = 42, placeholders=None, skip_bad_records: bool = False,
                 input_join: str = "\n") -> LoadedData:
    """Read and check every file of `dataset`, split off the eval set, then apply per-file counts/ratios.

    `input_join` goes between an alpaca record's instruction and input (the template's `input_join`).
    `kind`: "sft" (Examples), "pair" (PairExamples) or "prompt" (Examples whose answers ppo drops, so
    preference fields are allowed).

    The eval split is drawn (seeded) from all records read, before any resampling, so a repeated
    record never lands on both sides; per-file counts and ratios then apply to each file's training
    records. `max_samples` caps the records read from each file (the first ones).
    """
    specs = [dataset] if isinstance(dataset, (str, Path)) else list(dataset)
    if not specs:
        raise DataError("no dataset given")
    sources = [parse_dataset_spec(s) for s in specs]
    fill = _Filler(parse_placeholders(placeholders))
    files = [_read_source(src, kind, max_samples, fill, skip_bad_records, input_join) for src in sources]
    total = sum(len(f.records) for f in files)
    eval_ids = _eval_indices(total, val_size, seed)
    rng = random.Random(seed)
    train, eval_, counts, read, drawn, start = RecordList(), RecordList(), {}, {}, {}, 0
    for f in files:
        ids = range(start, start + len(f.records))
        start += len(f.records)
        eval_ += [r for i, r in zip(ids, f.records) if i in eval_ids]
        kept = [r for i, r in zip(ids, f.records) if i not in eval_ids]
        if kept and (f.source.count or f.source.ratio):
            kept = _resample(kept, f.source.count or max(1, round(f.source.ratio * len(kept))), rng)
        train += kept
        counts[f.source.path] = counts.get(f.source.path, 0) + len(kept)
        read[f.source.path] = read.get(f.source.path, 0) + len(f.records)
        if f.source.count or f.source.ratio:
            drawn[f.source.path] = drawn.get(f.source.path, 0) + len(kept)
    state = [CACHE_FORMAT, kind, [_source_state(s) for s in sources], max_samples, val_size, seed,
             sorted(fill.values.items()), skip_bad_records, input_join]
    train.kind = eval_.kind = kind
    train.fingerprint = _hash_json(state + ["train"])
    eval_.fingerprint = _hash_json(state + ["eval"])
    return LoadedData(train, eval_, skipped=sum(f.skipped for f in files),
                      problems=[p for f in files for p in f.problems][:MAX_PROBLEMS], counts=counts,
                      unfilled_placeholders=sorted(fill.unfilled), read=read, drawn=drawn)


# ----------------------------------------------------------------------------- tokenisation

SFT_COLUMNS = ("input_ids", "labels")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
PROBE_TEXT = "Hello world 12345 世界上第二高的山峰是哪座？\n\t <reserved_106> {{x}}"


class TokenizedDataset:
    """Token id sequences stored as flat int32 arrays with offsets; item i is a dict of int32 arrays.

    An sft set has the columns input_ids and labels; a preference set prompt_ids, chosen_ids and
    rejected_ids. `stats` holds what tokenisation counted (samples, tokens, truncated, dropped, ...).
    """

    def __init__(self, flat: dict, offsets: dict, stats: dict | None = None):
        self.flat, self.offsets = flat, offsets
        self.columns = tuple(flat)
        self.stats = dict(stats or {})

    def __len__(self) -> int:
        return len(self.offsets[self.columns[0]]) - 1

    def __getitem__(self, i: int | slice) -> dict | list[dict]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return {c: self.flat[c][self.offsets[c][i] : self.offsets[c][i + 1]] for c in self.columns}

    def lengths(self, column: str | None = None):
        """Tokens per sample of `column` (default: the first; for pairs prompt + the longer answer)."""
        import numpy as np

        if column is None and self.columns == PAIR_COLUMNS:
            sizes = [np.diff(self.offsets[c]) for c in PAIR_COLUMNS]
            return sizes[0] + np.maximum(sizes[1], sizes[2])
        return np.diff(self.offsets[column or self.columns[0]])


@dataclass
class _EncodeOptions:
    template: str
    train_on: str = "all"
    cutoff_len: int = 0
    max_source_length: int = 0
    max_target_length: int = 0


FAST_PATH_PROBES = (PROBE_TEXT, " leading", "trailing ", "a  b\n\nc", " 你好 ", "12345", "Hello world", "。\n\nAssistant: ")


class _SentencePieceFastPath:
    """Calls the tokenizer's SentencePiece model directly on text that holds no special-token string.

    Hand-written because transformers' Python tokenizers map every piece back to its id in Python, about
    three quarters of the tokenisation time here, while the SentencePiece model returns ids itself. Used
    only when both give the same ids on probe texts; text containing a special token's string (which
    the tokenizer turns into the special id) goes through the tokenizer.
    """

    def __init__(self, tokenizer, sp_model, specials: list[str]):
        self.tokenizer, self.sp_model, self.specials = tokenizer, sp_model, specials
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id

    @classmethod
    def wrap(cls, tokenizer):
        sp_model = getattr(tokenizer, "sp_model", None)
        added = getattr(tokenizer, "added_tokens_encoder", None)
        if sp_model is None or not hasattr(sp_model, "encode") or not isinstance(added, dict):
            return tokenizer
        fast = cls(tokenizer, sp_model, [t for t in added if t])
        for text in FAST_PATH_PROBES:
            plain = text.replace("<reserved_106>", "")
            if fast.encode(plain) != list(tokenizer.encode(plain, add_special_tokens=False)):
                return tokenizer
        return fast

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if add_special_tokens or any(t in text for t in self.specials):
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        return self.sp_model.encode(text)


class _Encoder:
    """Encodes chunks of records into flat arrays; one lives in each worker process."""

    def __init__(self, tokenizer, options: _EncodeOptions):
        from .templates import get_template

        self.tokenizer = _SentencePieceFastPath.wrap(tokenizer)
        self.template = get_template(options.template)
        self.options = options

    def _sft(self, rec: Example):
        o = self.options
        enc = self.template.encode(self.tokenizer, rec.turns, train_on=o.train_on, cutoff_len=o.cutoff_len,
                                   max_source_length=o.max_source_length, max_target_length=o.max_target_length)
        return (enc.input_ids, enc.labels), enc.truncated, enc.num_targets > 0

    def _pair(self, rec: PairExample):
        o = self.options
        *ids, truncated = self.template.encode_pair(self.tokenizer, rec.prompt, rec.chosen, rec.rejected,
                                                    cutoff_len=o.cutoff_len, max_source_length=o.max_source_length,
                                                    max_target_length=o.max_target_length)
        return tuple(ids), truncated, bool(ids[1]) and bool(ids[2])

    def chunk(self, records: list) -> dict:
        """{"columns": {name: (flat int32, lengths int32)}, counts..., "errors": [message]}."""

        from .templates import TemplateError

        pair = bool(records) and isinstance(records[0], PairExample)
        names = PAIR_COLUMNS if pair else SFT_COLUMNS
        seqs = {c: [] for c in names}
        out = {"truncated": 0, "no_target": 0, "errors": []}
        for rec in records:
            try:
                ids, truncated, has_target = (self._pair if pair else self._sft)(rec)
            except TemplateError as exc:
                out["errors"].append(f"{rec.where}, {exc}")
                continue
            out["truncated"] += truncated
            if not has_target:  # truncation left nothing to learn: a NaN loss if it were kept
                out["no_target"] += 1
                continue
            for c, seq in zip(names, ids):
                seqs[c].append(seq)
        out["columns"] = {c: _flatten(v) for c, v in seqs.items()}
        return out


def _flatten(seqs: list[list[int]]):
    """Sequences -> (flat int32 array, int32 lengths)."""
    import itertools

    import numpy as np

    lengths = np.array([len(x) for x in seqs], dtype=np.int32)
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


_WORKER: dict = {}


def _init_worker(tokenizer, options: _EncodeOptions) -> None:
    # Under fork (Linux) the tokenizer is inherited, not pickled; under spawn it is pickled once per worker.
    _WORKER["encoder"] = _Encoder(tokenizer, options)


def _encode_in_worker(task) -> dict:
    """Encode a chunk: a (start, end) range of the records inherited at fork, or a list of records."""
    if isinstance(task, tuple):
        start, end = task
        return _WORKER["encoder"].chunk(_WORKER["records"][start:end])
    return _WORKER["encoder"].chunk(task)


def _file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's model file (when it names one), class, special ids and a probe encoding."""
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    for attr in ("vocab_file", "model_file"):
        path = getattr(tokenizer, attr, None)
        if isinstance(path, (str, os.PathLike)) and Path(path).is_file():
            h.update(_file_sha256(path).encode())
    probe = [tokenizer.bos_token_id, tokenizer.eos_token_id, list(tokenizer.encode(PROBE_TEXT, add_special_tokens=False))]
    h.update(json.dumps(probe).encode())
    return h.hexdigest()


def records_fingerprint(records) -> str:
    """The fingerprint `load_dataset` attached (files, sizes, mtimes, options), else a hash of the content."""
    fingerprint = getattr(records, "fingerprint", None)
    if fingerprint:
        return fingerprint
    h = hashlib.sha256()
    for rec in records:
        h.update(json.dumps(dataclasses.astuple(rec), ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def default_cache_dir() -> Path:
    from ..builtin import cache_home

    return cache_home() / "data-cache"


def _worker_count(num_workers: int) -> int:
    if num_workers and num_workers > 0:
        return num_workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 8))


def _run_chunks(records: list, tokenizer, options: _EncodeOptions, workers: int, chunk_size: int) -> list[dict]:
    import multiprocessing

    from tqdm import tqdm

    ranges = [(i, min(i + chunk_size, len(records))) for i in range(0, len(records), chunk_size)]
    bar = dict(total=len(ranges), desc="tokenising", unit="chunk", disable=None, leave=False)
    if workers <= 1 or len(ranges) <= 1:
        encoder = _Encoder(tokenizer, options)
        return [encoder.chunk(records[a:b]) for a, b in tqdm(ranges, **bar)]
    context = multiprocessing.get_context()
    forked = context.get_start_method() == "fork"
    # Forked workers inherit the record list, so only index ranges cross the pipe; otherwise send records.
    tasks = ranges if forked else [records[a:b] for a, b in ranges]
    _WORKER["records"] = records if forked else None
    try:
        with context.Pool(workers, initializer=_init_worker, initargs=(tokenizer, options)) as pool:
            return list(tqdm(pool.imap(_encode_in_worker, tasks), **bar))
    finally:
        _WORKER.pop("records", None)


def _assemble(parts: list[dict], columns: tuple[str, ...], skip_bad: bool) -> TokenizedDataset:
    import numpy as np

    errors = [e for p in parts for e in p["errors"]]
    if errors and not skip_bad:
        raise DataError(errors[0])
    flat, offsets = {}, {}
    for c in columns:
        flat[c] = np.concatenate([np.zeros(0, np.int32)] + [p["columns"][c][0] for p in parts])
        lengths = np.concatenate([np.zeros(0, np.int32)] + [p["columns"][c][1] for p in parts])
        offsets[c] = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    stats = {"truncated": sum(p["truncated"] for p in parts), "no_target": sum(p["no_target"] for p in parts),
             "bad_records": len(errors), "problems": errors[:MAX_PROBLEMS]}
    stats["samples"] = len(offsets[columns[0]]) - 1
    stats["tokens"] = int(sum(len(flat[c]) for c in columns if c != "labels"))
    if "labels" in flat:
        stats["target_tokens"] = int((flat["labels"] != -100).sum())
    return TokenizedDataset(flat, offsets, stats)


def _save_cache(path: Path, dataset: TokenizedDataset, replace: bool) -> None:
    """Write the arrays into a unique temporary folder, then rename it into place in one step.

    Not io_utils.atomic_dir: several ranks of one run may tokenise the same data at once, and that
    helper shares one temporary name between writers. Here each writer has its own folder; the first
    rename wins and the others discard theirs.
    """
    import shutil
    import tempfile

    import numpy as np

    from ..io_utils import apply_umask, atomic_write_json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        for c in dataset.columns:
            np.save(tmp / f"{c}.npy", dataset.flat[c], allow_pickle=False)
            np.save(tmp / f"{c}.offsets.npy", dataset.offsets[c], allow_pickle=False)
        atomic_write_json(tmp / "meta.json", {"format": CACHE_FORMAT, "columns": list(dataset.columns), "stats": dataset.stats})
        apply_umask(tmp)  # mkdtemp makes an owner-only folder
        if replace and path.exists():
            shutil.rmtree(path, ignore_errors=True)  # overwrite_cache, or a broken copy
        os.rename(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "meta.json").is_file():
            raise


def _load_cache(path: Path) -> TokenizedDataset | None:
    """The cached set, or None when the folder is incomplete or unreadable (then it is rebuilt)."""
    import numpy as np

    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != CACHE_FORMAT:
            return None
        flat = {c: np.load(path / f"{c}.npy", mmap_mode="r", allow_pickle=False) for c in meta["columns"]}
        offsets = {c: np.load(path / f"{c}.offsets.npy", allow_pickle=False) for c in meta["columns"]}
    except (OSError, ValueError, KeyError):
        return None
    return TokenizedDataset(flat, offsets, meta.get("stats"))


def tokenize_dataset(records: list, tokenizer, template, *, train_on: str = "all", cutoff_len: int = 0,
                     max_source_length: int = 0, max_target_length: int = 0, num_workers: int = 1,
                     cache_dir: str | Path | None = None, overwrite_cache: bool = False,
                     skip_bad_records: bool = False, chunk_size: int = 500) -> TokenizedDataset:
    """Encode `records` (Examples or PairExamples) with `template` in `num_workers` processes (0: auto).

    With `cache_dir`, the result is stored under a key hashed from the records' fingerprint (their
    files' paths, sizes and mtimes plus loading options, or their content), the template, the
    tokenizer's model file and every option here; the same call again loads it instead of encoding.
    Samples left without any target token (truncation) are dropped and counted in `stats`.
    """
    import time

    from .templates import Template, get_template

    name = template.name if isinstance(template, Template) else str(template)
    get_template(name)
    if train_on not in ("all", "last"):
        raise DataError(f"train_on must be 'all' or 'last', got {train_on!r}")
    options = _EncodeOptions(name, train_on, int(cutoff_len or 0), int(max_source_length or 0), int(max_target_length or 0))
    pair = isinstance(records[0], PairExample) if records else getattr(records, "kind", "sft") == "pair"
    columns = PAIR_COLUMNS if pair else SFT_COLUMNS
    path, replace = None, overwrite_cache
    if cache_dir and str(cache_dir).lower() != "none":
        key = _hash_json([CACHE_FORMAT, records_fingerprint(records), dataclasses.asdict(options),
                          tokenizer_fingerprint(tokenizer), skip_bad_records, columns])
        path = Path(cache_dir) / f"{'pair' if pair else 'sft'}-{key[:32]}"
        if not overwrite_cache and (path / "meta.json").is_file():
            cached = _load_cache(path)
            if cached is not None:
                cached.stats["cache"] = "hit"
                return cached
            replace = True
    start = time.perf_counter()
    workers = _worker_count(num_workers)
    dataset = _assemble(_run_chunks(list(records), tokenizer, options, workers, chunk_size), columns, skip_bad_records)
    seconds = time.perf_counter() - start
    dataset.stats.update(seconds=round(seconds, 3), workers=workers, records=len(records),
                         records_per_second=round(len(records) / seconds, 1) if seconds > 0 else None)
    if path is not None:
        _save_cache(path, dataset, replace)
    dataset.stats["cache"] = "miss" if path is not None else "off"
    return dataset


# ----------------------------------------------------------------------------- one call for the trainers


class DataReport(str):
    """The data log line, carrying the counts a run records in train_results.json."""

    counts: dict


def data_report(read: dict[str, int], train: int, eval_: int, unit: str, *, drawn: dict[str, int] | None = None,
                skipped: int = 0, problems: list[str] | tuple = (), truncated: int = 0, dropped: int = 0,
                notes: list[str] | tuple = ()) -> DataReport:
    """The data line of every training command, counted the same way in each: the good records read from each
    file (and how many a path:COUNT or path:RATIO drew for training), then the train / eval split in `unit`
    (samples, pairs or prompts, as used: after dropping what truncation left with nothing to learn), then
    what was skipped, truncated or dropped; `notes` follow. Its `counts` go into train_results.json."""
    drawn = drawn or {}
    files = ", ".join(f"{Path(p).name}: {n} records" + (f" ({drawn[p]} drawn for training)" if p in drawn else "")
                      for p, n in read.items())
    parts = [f"data: {files}; {train} train / {eval_} eval {unit}"]
    if skipped:
        parts.append(f"{skipped} bad records skipped (first: {problems[0]})")
    if truncated or dropped:
        parts.append(f"{truncated} truncated, {dropped} dropped with nothing left to learn")
    report = DataReport("; ".join([*parts, *notes]))
    report.counts = {"data_records": sum(read.values()), f"train_{unit}": train, f"eval_{unit}": eval_,
                     "skipped_records": skipped, "truncated_samples": truncated, "dropped_samples": dropped}
    return report


def _report(loaded: LoadedData, sets: list[TokenizedDataset], unit: str) -> DataReport:
    """data_report of a read and tokenised dataset, with the placeholder warning and the tokenisation speed."""
    problems = loaded.problems + [p for s in sets for p in s.stats.get("problems", [])]
    notes = []
    if loaded.unfilled_placeholders:
        names = ", ".join("{{" + n + "}}" for n in loaded.unfilled_placeholders)
        notes.append(f"WARNING: no value for placeholders {names} (left as written)")
    stats = sets[0].stats
    rate = f", {stats['records_per_second']} records/s with {stats['workers']} workers" if stats.get("cache") != "hit" else ""
    notes.append(f"tokenised: cache {stats.get('cache')}{rate}")
    return data_report(loaded.read, len(sets[0]), len(sets[1]), unit, drawn=loaded.drawn,
                       skipped=loaded.skipped + sum(s.stats.get("bad_records", 0) for s in sets), problems=problems,
                       truncated=sum(s.stats.get("truncated", 0) for s in sets),
                       dropped=sum(s.stats.get("no_target", 0) for s in sets), notes=notes)


def _load_and_tokenize(kind: str, files, tokenizer, *, template, cutoff_len, max_source_length, max_target_length,
                       train_on, max_samples, val_size, seed, skip_bad_records, num_workers, cache_dir, placeholders,
                       overwrite_cache):
    from .templates import get_template

    input_join = get_template(template).input_join  # an unknown name fails before any file is read
    loaded = load_dataset(files, kind=kind, max_samples=max_samples, val_size=val_size, seed=seed,
                          placeholders=placeholders, skip_bad_records=skip_bad_records, input_join=input_join)
    cache = default_cache_dir() if cache_dir is None or str(cache_dir) == "" else cache_dir
    common = dict(train_on=train_on, cutoff_len=cutoff_len, max_source_length=max_source_length,
                  max_target_length=max_target_length, num_workers=num_workers, cache_dir=cache,
                  overwrite_cache=overwrite_cache, skip_bad_records=skip_bad_records)
    sets = [tokenize_dataset(part, tokenizer, template, **common) for part in (loaded.train, loaded.eval)]
    if len(sets[0]) == 0:
        raise DataError(f"{', '.join(map(str, loaded.counts))}: no training sample left after tokenisation "
                        f"(cutoff_len {cutoff_len} too small?)")
    return sets[0], sets[1], _report(loaded, sets, "pairs" if kind == "pair" else "samples")


def load_sft_data(files, tokenizer, *, template: str = "baichuan2", cutoff_len: int = 1024, max_source_length: int = 0,
                  max_target_length: int = 0, train_on: str = "all", max_samples: int = 0, val_size: float = 0.0,
                  seed: int = 42, skip_bad_records: bool = False, num_workers: int = 0, cache_dir=None,
                  placeholders=None, overwrite_cache: bool = False) -> tuple[TokenizedDataset, TokenizedDataset, str]:
    """Read, split and tokenise instruction data: (train set, eval set (maybe empty), one-line report).

    `cache_dir` None or "" uses the baichuan-tune cache folder, "none" turns caching off.
    """
    return _load_and_tokenize("sft", files, tokenizer, template=template, cutoff_len=cutoff_len,
                              max_source_length=max_source_length, max_target_length=max_target_length,
                              train_on=train_on, max_samples=max_samples, val_size=val_size, seed=seed,
                              skip_bad_records=skip_bad_records, num_workers=num_workers, cache_dir=cache_dir,
                              placeholders=placeholders, overwrite_cache=overwrite_cache)


def load_pair_data(files, tokenizer, *, template: str = "baichuan2", cutoff_len: int = 1024, max_source_length: int = 0,
                   max_target_length: int = 0, train_on: str = "all", max_samples: int = 0, val_size: float = 0.0, seed: int = 42,
                   skip_bad_records: bool = False, num_workers: int = 0, cache_dir=None, placeholders=None,
                   overwrite_cache: bool = False) -> tuple[TokenizedDataset, TokenizedDataset, str]:
    """Read, split and tokenise preference pairs (columns prompt_ids, chosen_ids, rejected_ids) for rm/dpo.

    `train_on` is accepted so both loaders take `DataOptions.load_kwargs()`; pairs always learn only the answers.
    """
    return _load_and_tokenize("pair", files, tokenizer, template=template, cutoff_len=cutoff_len,
                              max_source_length=max_source_length, max_target_length=max_target_length,
                              train_on=train_on, max_samples=max_samples, val_size=val_size, seed=seed,
                              skip_bad_records=skip_bad_records, num_workers=num_workers, cache_dir=cache_dir,
                              placeholders=placeholders, overwrite_cache=overwrite_cache)
