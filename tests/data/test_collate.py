"""Padding, packing and pair batches; packed rows give the model the same loss as the samples alone."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from baichuan_tune.data.collate import collate_padded, collate_pairs, pack_examples, pack_lengths, pack_row
from baichuan_tune.data.sources import load_dataset
from baichuan_tune.data.cache import tokenize_dataset

IGN = -100


@functools.lru_cache(maxsize=None)
def _b2_tokenizer(folder: str):
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer.from_pretrained(folder)


@pytest.fixture
def belle(shared_reference, shared_data):
    """The first 200 BELLE records tokenised with the Baichuan2 tokenizer (cutoff 256)."""
    tok = _b2_tokenizer(str(shared_reference / "baichuan2-13b-chat"))
    records = load_dataset(str(shared_data / "belle_dev1k.jsonl"), max_samples=200).train
    return tokenize_dataset(records, tok, "baichuan2", cutoff_len=256, num_workers=1)


def test_collate_padded_by_hand():
    batch = collate_padded([{"input_ids": [5, 6, 7], "labels": [IGN, 6, 7]}, {"input_ids": [8], "labels": [IGN]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, 6, 7], [IGN, IGN, IGN]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long
    padded = collate_padded([{"input_ids": [5, 6, 7]}], pad_to_multiple_of=4)
    assert padded["input_ids"].tolist() == [[5, 6, 7, 0]] and "labels" not in padded


def test_collate_padded_real_samples(belle):
    batch = collate_padded(belle[:8])
    lengths = belle.lengths()[:8]
    assert batch["input_ids"].shape == (8, lengths.max())
    assert batch["attention_mask"].sum(1).tolist() == lengths.tolist()
    for i, n in enumerate(lengths):
        assert batch["input_ids"][i, :n].tolist() == belle[i]["input_ids"].tolist()
        assert (batch["input_ids"][i, n:] == 0).all() and (batch["labels"][i, n:] == IGN).all()


def test_pack_lengths_by_hand():
    # row 1: 8 (index 2) then the longest that fits the 2 left: 2 (index 3)
    # row 2: 5 (index 0) then 4 (index 4); row 3: 3 (index 1)
    assert pack_lengths([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert pack_lengths([4, 4, 4], 8) == [[0, 1], [2]]  # ties: lowest index first


def test_pack_lengths_real_lengths(belle):
    lengths = belle.lengths()
    rows = pack_lengths(lengths, 1024)
    assert sorted(i for row in rows for i in row) == list(range(len(belle)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    # greedy packing of these short samples leaves little room: within one row of the lower bound
    assert len(rows) <= -(-int(lengths.sum()) // 1024) + 1


def test_packed_rows_segments_and_labels(belle):
    packed = pack_examples(belle, 1024)
    seen = 0
    for r in range(len(packed)):
        row = packed[r]
        samples = [belle[i] for i in packed.rows[r]]
        assert row["input_ids"].tolist() == [t for s in samples for t in s["input_ids"].tolist()]
        starts = np.cumsum([0] + [len(s["input_ids"]) for s in samples])
        for seg, (s, start) in enumerate(zip(samples, starts), 1):
            end = start + len(s["input_ids"])
            assert (row["attention_mask"][start:end] == seg).all()
            assert row["labels"][start] == IGN  # nothing predicts a sample's first token across the boundary
            assert row["labels"][start + 1 : end].tolist() == s["labels"][1:].tolist()
        seen += len(samples)
    assert seen == len(belle)
    batch = collate_padded(packed[:4])
    assert batch["attention_mask"].max() > 1 and set(batch["attention_mask"][0].unique().tolist()) >= {1, 2}


def test_pack_row_masks_a_label_that_would_cross():
    """A first label that is not -100 (e.g. a foreign dataset) is masked, so the shift cannot cross."""
    row = pack_row([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4], "labels": [3, 4]}], 8)
    assert row["labels"].tolist() == [IGN, 2, IGN, 4]
    assert row["attention_mask"].tolist() == [1, 1, 2, 2]


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_packed_loss_equals_separate_losses(belle, preset):
    """Oracle: the model on each sample alone. Packing must give the same token-summed loss (RoPE and ALiBi)."""
    from conftest import tiny_model

    model = tiny_model(preset)
    vocab = model.config.vocab_size

    def small(sample):  # the tiny model has 512 ids; keep the layout, fold the ids
        ids = sample["input_ids"][:40] % vocab
        labels = np.where(sample["labels"][:40] == IGN, IGN, sample["labels"][:40] % vocab)
        return {"input_ids": ids, "labels": labels}

    samples = [s for s in map(small, belle[:50]) if (s["labels"] != IGN).sum() > 5][:3]  # answers within 40 tokens
    assert len(samples) == 3
    separate = 0.0
    with torch.no_grad():
        for s in samples:
            batch = collate_padded([s])
            n = int((batch["labels"][:, 1:] != IGN).sum())
            separate += float(model(**batch).loss) * n
        packed = collate_padded([pack_row(samples, 128)])
        packed_loss = float(model(**packed).loss)
    n_packed = int((packed["labels"][:, 1:] != IGN).sum())
    assert n_packed == sum(int((s["labels"][1:] != IGN).sum()) for s in samples)
    assert packed_loss * n_packed == pytest.approx(separate, rel=1e-5)
    # The authors' layout writes eos as labels[0]; alone it is never read, but naively concatenated it
    # would make each sample's first token a target of the previous sample's eos. pack_row masks it.
    authors = [{**s, "labels": np.concatenate([[2], s["labels"][1:]])} for s in samples]
    with torch.no_grad():
        assert float(model(**collate_padded([pack_row(authors, 128)])).loss) == pytest.approx(packed_loss, rel=1e-6)
        naive = {**pack_row(authors, 128), "labels": np.concatenate([s["labels"] for s in authors])}
        naive_batch = collate_padded([naive])
        naive_loss = float(model(**naive_batch).loss) * int((naive_batch["labels"][:, 1:] != IGN).sum())
    assert naive_loss != pytest.approx(separate, rel=1e-3)


def test_collate_pairs_by_hand():
    batch = collate_pairs([{"prompt_ids": [9, 195, 7, 196], "chosen_ids": [5, 2], "rejected_ids": [6, 6, 2]},
                           {"prompt_ids": [195, 8, 196], "chosen_ids": [4, 2], "rejected_ids": [3, 2]}])
    assert batch["input_ids"].tolist() == [[9, 195, 7, 196, 5, 2, 0], [195, 8, 196, 4, 2, 0, 0],
                                           [9, 195, 7, 196, 6, 6, 2], [195, 8, 196, 3, 2, 0, 0]]
    assert batch["labels"].tolist() == [[IGN, IGN, IGN, IGN, 5, 2, IGN], [IGN, IGN, IGN, 4, 2, IGN, IGN],
                                        [IGN, IGN, IGN, IGN, 6, 6, 2], [IGN, IGN, IGN, 3, 2, IGN, IGN]]
    assert batch["attention_mask"].tolist() == [[1] * 6 + [0], [1] * 5 + [0] * 2, [1] * 7, [1] * 5 + [0] * 2]


def test_collate_pairs_real_dpo(shared_reference, shared_data):
    tok = _b2_tokenizer(str(shared_reference / "baichuan2-13b-chat"))
    records = load_dataset(str(shared_data / "dpo_zh_demo.json"), kind="pair", max_samples=4).train
    pairs = tokenize_dataset(records, tok, "baichuan2", cutoff_len=512, num_workers=1)
    batch = collate_pairs(pairs[:4])
    assert batch["input_ids"].shape[0] == 8
    for i in range(4):
        p, c, r = (pairs[i][k].tolist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        for row, answer in ((i, c), (4 + i, r)):
            n = len(p) + len(answer)
            assert batch["input_ids"][row, :n].tolist() == p + answer
            assert batch["labels"][row, :n].tolist() == [IGN] * len(p) + answer
            assert answer[-1] == 2 or len(p) + len(answer) == 512


def test_fuse_micro_batches_weights_each_label_by_its_micro_batch_by_hand():
    from baichuan_tune.data.collate import fuse_micro_batches

    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}  # 2 labelled tokens
    b = {"input_ids": [8, 9], "labels": [8, 9]}  # the first label is nobody's target: 1 counts
    c = {"input_ids": [3, 4, 5, 6], "labels": [-100, -100, 5, 6]}  # 2
    fused = fuse_micro_batches([[a], [b, c]], max_tokens=9)
    assert fused["input_ids"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 5, 6]]
    assert fused["attention_mask"].tolist() == [[1, 1, 1, 2, 2, 3, 3, 3, 3]]
    assert fused["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, 5, 6]]
    # group of 2: micro-batch 1 has 2 labels -> 1/4 each; micro-batch 2 has 1 + 2 labels -> 1/6 each
    q, s = 1 / 4, 1 / 6
    assert fused["loss_weights"][0].tolist() == pytest.approx([0, q, q, 0, s, 0, 0, s, s])
    assert "z_loss_weights" not in fused
    # z-loss: 3 and 2 shifted positions -> 1/(2*3), 1/(2*2); none before a sample's start
    zfused = fuse_micro_batches([[c], [a]], max_tokens=9, z_loss=True)
    assert zfused["z_loss_weights"][0].tolist() == pytest.approx([0, s, s, s, 0, q, q])
    assert zfused["loss_weights"][0].tolist() == pytest.approx([0, 0, q, q, 0, q, q])
    assert fuse_micro_batches([[a], [b, c]], max_tokens=8) is None  # too many tokens
    assert fuse_micro_batches([[a]], max_tokens=9) is None  # nothing to fuse
    assert fuse_micro_batches([[a], [{"input_ids": [1, 2], "labels": [-100, -100]}]], 9) is None  # 0/0 loss
    assert fuse_micro_batches([[a, b], [c]], 9, z_loss=True) is None  # padding inside a micro-batch under z-loss
    assert fuse_micro_batches([[a, b]], 9) is None  # one micro-batch: no launches to save
    packed = {**a, "attention_mask": [1, 1, 2]}
    assert fuse_micro_batches([[packed], [b]], 9) is None
