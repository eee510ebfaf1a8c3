"""Tokenised datasets cached on disk, keyed by the data files, the tokenizer, the template and the encoding
options, so a second run (or the other processes of a torchrun group) reads arrays instead of tokenising
again; `tokenize_dataset` is the cached entry point.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..errors import DataError
from .encoding import (
    PAIR_COLUMNS,
    SFT_COLUMNS,
    TokenizedDataset,
    _assemble,
    _EncodeOptions,
    _run_chunks,
    _worker_count,
    records_fingerprint,
    tokenizer_fingerprint,
)
from .formats import PairExample
from .sources import CACHE_FORMAT, _hash_json


def default_cache_dir() -> Path:
    from ..builtin import cache_home

    return cache_home() / "data-cache"


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
