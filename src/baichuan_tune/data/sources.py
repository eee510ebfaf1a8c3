"""Dataset files -> records: reading `.json`/`.jsonl`, dataset specs with sample counts or ratios, mixing
several files, placeholders, and the held-out split.

`dataset` entries are file paths (`.json` = a JSON list, `.jsonl` = one object per line), optionally
with a sample count `a.json:500` (draws 500 records, repeating the file when it holds fewer) or a ratio
`a.json:0.5` (half of it; `:2.0` = twice); `demo` is the built-in demo set. A bad record is a
DataError naming the file, record number (1-based; and line for JSONL) and field, or, with
`skip_bad_records`, skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import DataError
from .formats import (
    Example,
    PairExample,
    Turn,
    _Bad,
    _type_name,
    pair_fields,
    sft_turns,
)

CACHE_FORMAT = 2  # bump when the cached arrays or the encoding rules change (2: per-template input_join)


DEMO_DATASET = "demo"


MAX_PROBLEMS = 20  # skipped-record messages kept for the log


PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


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
