"""Records -> token ids: the template's encoder (with a checked sentencepiece fast path), in parallel worker
processes, into the columns the collators read; and the fingerprints that key the on-disk cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .formats import Example, PairExample
from .sources import MAX_PROBLEMS

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
