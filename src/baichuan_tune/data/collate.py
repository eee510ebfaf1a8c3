"""Batches for training: right padding, greedy packing of short samples, and preference pairs.

The model reads `attention_mask` as segment ids: 0 is padding, equal non-zero ids attend to each other
(causally), and RoPE positions restart where the id changes. A plain batch has ids 1/0; a packed row
numbers its samples 1, 2, 3, ... The loss compares logits[:, :-1] with labels[:, 1:], so the label at
the first position of every packed sample is -100: no sample is a target of the one before it.
"""

from __future__ import annotations

import bisect
from typing import Sequence

import numpy as np
import torch

IGNORE_INDEX = -100
PAD_TOKEN_ID = 0  # <unk>, the pad of every published Baichuan tokenizer


def collate_padded(features: Sequence[dict], pad_token_id: int = PAD_TOKEN_ID,
                   pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad `input_ids` (and `labels` when present) into [B, T] tensors with an attention mask.

    A feature's own `attention_mask` (segment ids of a packed row) is kept; otherwise it is 1 on tokens.
    Padding gets id `pad_token_id`, label -100 and mask 0.
    """
    if not features:
        raise ValueError("collate_padded needs at least one feature")
    length = max(len(f["input_ids"]) for f in features)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = len(features)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    has_labels = all("labels" in f for f in features)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        input_ids[i, :n] = torch.as_tensor(np.asarray(f["input_ids"], dtype=np.int64))
        mask = f.get("attention_mask")
        attention_mask[i, :n] = 1 if mask is None else torch.as_tensor(np.asarray(mask, dtype=np.int64))
        if has_labels:
            labels[i, :n] = torch.as_tensor(np.asarray(f["labels"], dtype=np.int64))
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if has_labels:
        out["labels"] = labels
    return out


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Greedy packing: sample indices grouped into rows of at most `capacity` tokens.

    Each row starts with the longest sample left and then repeatedly takes the longest sample that still
    fits (ties: lowest index first). Deterministic; O(n log n) plus O(distinct lengths) per removal.
    """
    buckets: dict[int, list[int]] = {}
    for i in range(len(lengths) - 1, -1, -1):  # reversed, so pop() yields ascending indices
        n = min(int(lengths[i]), capacity)
        if n > 0:
            buckets.setdefault(n, []).append(i)
    available = sorted(buckets)
    rows = []
    while available:
        row, room = [], capacity
        while True:
            k = bisect.bisect_right(available, room) - 1
            if k < 0:
                break
            n = available[k]
            row.append(buckets[n].pop())
            room -= n
            if not buckets[n]:
                del available[k]
        rows.append(row)
    return rows


class PackedDataset:
    """Rows of several samples each, built on access; item = input_ids, labels, attention_mask (segment ids)."""

    def __init__(self, dataset, cutoff_len: int):
        if cutoff_len <= 0:
            raise ValueError("packing needs cutoff_len > 0")
        self.dataset, self.cutoff_len = dataset, cutoff_len
        lengths = dataset.lengths() if hasattr(dataset, "lengths") else [len(f["input_ids"]) for f in dataset]
        self.rows = pack_lengths(lengths, cutoff_len)
        self._row_lengths = [sum(min(int(lengths[j]), cutoff_len) for j in row) for row in self.rows]

    def lengths(self) -> list[int]:
        """Tokens in each packed row."""
        return self._row_lengths

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int | slice):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return pack_row([self.dataset[j] for j in self.rows[i]], self.cutoff_len)


def pack_row(samples: Sequence[dict], cutoff_len: int) -> dict[str, np.ndarray]:
    """Concatenate samples into one row; segment ids 1..k in attention_mask; -100 at each sample's start."""
    ids, labels, segments = [], [], []
    for seg, sample in enumerate(samples, 1):
        n = min(len(sample["input_ids"]), cutoff_len)  # a longer sample is cut, as cutoff_len would have
        sample_labels = np.asarray(sample["labels"][:n], dtype=np.int64).copy()
        sample_labels[:1] = IGNORE_INDEX
        ids.append(np.asarray(sample["input_ids"][:n], dtype=np.int64))
        labels.append(sample_labels)
        segments.append(np.full(n, seg, dtype=np.int64))
    return {"input_ids": np.concatenate(ids), "labels": np.concatenate(labels), "attention_mask": np.concatenate(segments)}


def pack_examples(dataset, cutoff_len: int) -> PackedDataset:
    """The samples of `dataset` packed greedily into rows of at most `cutoff_len` tokens."""
    return PackedDataset(dataset, cutoff_len)


def collate_pairs(features: Sequence[dict], pad_token_id: int = PAD_TOKEN_ID,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Preference features -> one right-padded batch of 2B rows: the B chosen rows, then the B rejected.

    Row i is prompt + chosen answer of feature i, row B + i prompt + rejected answer; labels are -100
    on the prompt and padding, so a loss reads only the answers (and their eos).
    """
    rows = []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            prompt = np.asarray(f["prompt_ids"], dtype=np.int64)
            answer = np.asarray(f[key], dtype=np.int64)
            labels = np.concatenate([np.full(len(prompt), IGNORE_INDEX, dtype=np.int64), answer])
            labels[:1] = IGNORE_INDEX
            rows.append({"input_ids": np.concatenate([prompt, answer]), "labels": labels})
    return collate_padded(rows, pad_token_id, pad_to_multiple_of)


def fuse_micro_batches(micro_batches: Sequence[Sequence[dict]], max_tokens: int,
                       z_loss: bool = False) -> dict[str, torch.Tensor] | None:
    """One packed [1, T] row of every sample of an accumulation group, with per-token loss weights that
    make its weighted loss the plain loop's: the mean over micro-batches of each one's token-mean loss.

    A label of micro-batch m (of G) weighs 1 / (G * its labelled tokens). With `z_loss`, each sample's
    shifted positions weigh 1 / (G * the micro-batch's shifted positions), which is exact only without
    padding, so then every micro-batch's samples must have one length. None (run the plain loop) for
    packed features, a micro-batch without labels, more than `max_tokens` tokens or a single micro-batch
    (no launches to save: its padded batch stays as it is).
    """
    samples = [f for mb in micro_batches for f in mb]
    total = sum(len(f["input_ids"]) for f in samples)
    if len(micro_batches) < 2 or total > max_tokens or any("attention_mask" in f for f in samples):
        return None
    groups = len(micro_batches)
    rows, ce_w, z_w = [], [], []
    for mb in micro_batches:
        labels = [np.asarray(f["labels"], dtype=np.int64) for f in mb]
        labelled = sum(int((lab[1:] != IGNORE_INDEX).sum()) for lab in labels)
        lengths = {len(lab) for lab in labels}
        if labelled == 0 or (z_loss and len(lengths) > 1) or min(lengths) < 2:
            return None
        positions = sum(len(lab) - 1 for lab in labels)
        for f, lab in zip(mb, labels):
            lab = lab.copy()
            lab[:1] = IGNORE_INDEX  # the first token is nobody's target, as in a row of its own
            rows.append((np.asarray(f["input_ids"], dtype=np.int64), lab))
            ce_w.append(np.where(lab != IGNORE_INDEX, 1.0 / (groups * labelled), 0.0))
            z = np.full(len(lab), 1.0 / (groups * positions))
            z[0] = 0.0  # the logit before a sample's first token belongs to the sample before
            z_w.append(z)
    out = {"input_ids": torch.from_numpy(np.concatenate([r[0] for r in rows]))[None],
           "labels": torch.from_numpy(np.concatenate([r[1] for r in rows]))[None],
           "attention_mask": torch.from_numpy(np.concatenate(
               [np.full(len(r[0]), k, dtype=np.int64) for k, r in enumerate(rows, 1)]))[None],
           "loss_weights": torch.from_numpy(np.concatenate(ce_w)).float()[None]}
    if z_loss:
        out["z_loss_weights"] = torch.from_numpy(np.concatenate(z_w)).float()[None]
    return out
