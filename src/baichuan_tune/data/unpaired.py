"""Unpaired preference data for `baichuan-tune kto`: answers labelled desirable (true) or undesirable (false).

Accepted records (any mix, in .json lists or .jsonl files):

- OpenAI `messages` ending with the assistant answer, plus a boolean `label` (LLaMA-Factory's `kto_tag`
  layout; the field may also be called `kto_tag`);
- Baichuan2 `conversations` (or alpaca `instruction`/`input`/`output`) plus a boolean `label`;
- preference pairs in every form `rm`/`dpo` read: each pair gives two unpaired records, its chosen answer
  labelled true and its rejected answer false. Both halves of a pair stay on the same side of the
  train / eval split, so a held-out prompt is never trained on.

Each record also gets a fixed *mismatched* answer: another record's answer to this record's prompt, for
KTO's reference point z0 (the KL estimate of Ethayarajh et al. 2024, sec. 4.1). Mismatches follow a
seeded rotation of the split's records, so they are the same on every run and every process, and the
reference log-probabilities of freeze/full training can be computed once (as `dpo` does). A sample is
stored as `dpo`'s pair columns (`prompt_ids`, `chosen_ids` = the answer, `rejected_ids` = the
mismatched answer) plus `label`, so the pair batching and the reference code of `dpo` serve it as is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from . import loading, sources
from .formats import PREFERENCE_LABELS, Turn, _Bad, pair_fields, sft_turns


@dataclass(slots=True)
class UnpairedExample:
    """One record's labelled answers to one prompt: one item, or two for a split preference pair."""

    prompt: list[Turn]
    answers: list[tuple[str, bool]]  # (answer text, desirable)
    where: str


def unpaired_fields(obj: Any, input_join: str = "\n") -> tuple[list[Turn], list[tuple[str, bool]]]:
    """One record -> (prompt turns, [(answer, desirable)]); raises formats._Bad(field, problem)."""
    if not isinstance(obj, dict):
        raise _Bad("record", f"expected a JSON object, got {type(obj).__name__}")
    if "chosen" in obj or "rejected" in obj:
        prompt, chosen, rejected = pair_fields(obj, input_join)
        return prompt, [(chosen, True), (rejected, False)]
    key = next((k for k in PREFERENCE_LABELS if k in obj), None)
    if key is None:
        raise _Bad("label", "missing: kto learns from answers labelled good (\"label\": true) or bad (false), or "
                            "from chosen/rejected pairs")
    if not isinstance(obj[key], bool):
        raise _Bad(key, f"expected true or false, got {obj[key]!r}")
    turns = sft_turns(obj, input_join, preference_fields=True)  # ends with the assistant answer
    if turns[0][0] == "text":
        raise _Bad("text", "plain text has no prompt and answer; give messages, conversations or instruction/output")
    return turns[:-1], [(turns[-1][1], obj[key])]


class UnpairedDataset(list):
    """Tokenised samples (dicts of prompt_ids, chosen_ids, rejected_ids, label) with their lengths."""

    def lengths(self) -> list[int]:
        return [len(s["prompt_ids"]) + len(s["chosen_ids"]) for s in self]


def _items(records: list) -> list[tuple[list[Turn], str, bool]]:
    return [(rec.prompt, answer, label) for rec in records for answer, label in rec.answers]


def _mismatches(count: int, seed: int) -> list[int]:
    """partner[i] != i for count > 1: item i borrows the answer of the next item of a seeded shuffle."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    partner = [0] * count
    for k, i in enumerate(order):
        partner[i] = order[(k + 1) % count]
    return partner


def tokenize_unpaired(records: list, tokenizer, template: str, *, cutoff_len: int, max_source_length: int = 0,
                      max_target_length: int = 0, seed: int = 42) -> tuple[UnpairedDataset, int, int]:
    """(samples, truncated, dropped): each item with its mismatched answer, cut as `dpo` cuts a pair."""
    from .templates import TemplateError, get_template

    tpl = get_template(template)
    items = _items(records)
    partner = _mismatches(len(items), seed)
    out, truncated, dropped = UnpairedDataset(), 0, 0
    for i, (prompt, answer, label) in enumerate(items):
        try:
            prompt_ids, ids, other, cut = tpl.encode_pair(tokenizer, prompt, answer, items[partner[i]][1],
                                                          cutoff_len=cutoff_len, max_source_length=max_source_length,
                                                          max_target_length=max_target_length)
        except TemplateError as exc:
            raise DataError(f"{_where(records, i)}, {exc}") from None
        truncated += cut
        if not ids or not other:  # nothing left to score after truncation
            dropped += 1
            continue
        out.append({"prompt_ids": prompt_ids, "chosen_ids": ids, "rejected_ids": other, "label": label})
    return out, truncated, dropped


def _where(records: list, item: int) -> str:
    for rec in records:
        if item < len(rec.answers):
            return rec.where
        item -= len(rec.answers)
    return "record"


def load_unpaired_data(files, tokenizer, *, template: str = "baichuan2", cutoff_len: int = 1024,
                       max_source_length: int = 0, max_target_length: int = 0, max_samples: int = 0,
                       val_size: float = 0.0, seed: int = 42, skip_bad_records: bool = False, placeholders=None,
                       **_cache_options) -> tuple[UnpairedDataset, UnpairedDataset, loading.DataReport]:
    """Read, split (by record) and tokenise unpaired data: (train, eval, data line). Takes
    `DataOptions.load_kwargs()`; the cache options are accepted and unused (tokenised in this process)."""
    from .templates import get_template

    input_join = get_template(template).input_join
    loaded = sources.load_dataset(files, kind="unpaired", max_samples=max_samples, val_size=val_size, seed=seed,
                                  placeholders=placeholders, skip_bad_records=skip_bad_records, input_join=input_join)
    answers = sum(len(rec.answers) for rec in loaded.train)
    if answers < 2:
        raise DataError(f"{', '.join(map(str, loaded.counts))}: {answers} training answer(s); kto needs at least 2 "
                        "(each answer's KL estimate borrows another record's answer)")
    common = dict(cutoff_len=cutoff_len, max_source_length=max_source_length, max_target_length=max_target_length)
    train, cut_train, drop_train = tokenize_unpaired(loaded.train, tokenizer, template, seed=seed, **common)
    held, cut_eval, drop_eval = tokenize_unpaired(loaded.eval, tokenizer, template, seed=seed + 1, **common)
    if not train:
        raise DataError(f"{', '.join(map(str, loaded.counts))}: no training answer left after tokenisation "
                        f"(cutoff_len {cutoff_len} too small?)")
    good = sum(s["label"] for s in train)
    report = loading.data_report(loaded.read, len(train), len(held), "samples", drawn=loaded.drawn,
                                 skipped=loaded.skipped, problems=loaded.problems, truncated=cut_train + cut_eval,
                                 dropped=drop_train + drop_eval,
                                 notes=[f"{good} desirable / {len(train) - good} undesirable training answers"])
    report.counts.update(desirable=good, undesirable=len(train) - good)
    return train, held, report
