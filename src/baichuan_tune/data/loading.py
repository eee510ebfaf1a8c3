"""Training data in one call for the trainers: read instruction and preference files, mix them, split off an
eval set, tokenise in parallel and cache the result on disk, with the one data line every command prints.

The pieces: `formats.py` (one record -> turns), `sources.py` (files and dataset specs -> records),
`encoding.py` (records -> token ids), `cache.py` (the on-disk cache).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..config import opt
from ..errors import DataError
from .cache import default_cache_dir, tokenize_dataset
from .encoding import TokenizedDataset
from .sources import DEMO_DATASET, LoadedData, load_dataset, parse_dataset_spec


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
