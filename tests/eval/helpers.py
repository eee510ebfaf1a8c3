"""Data, tokenizer and answer keys shared by the eval tests."""

from __future__ import annotations

import csv
import io
import zipfile
from types import SimpleNamespace

import torch
from conftest import need_shared

from baichuan_tune.eval.scoring import (
    SubjectResult,
    evaluate,
)

CEVAL_ZIP = ("eval", "ceval", "ceval.zip")
CMMLU_ZIP = ("eval", "cmmlu", "cmmlu.zip")


def data_file(shared_data, parts):
    return need_shared(shared_data.joinpath(*parts))




def answer_key(zip_path, member: str, column: str) -> list[str]:
    """Gold letters of one subject file, read independently of the module."""
    with zipfile.ZipFile(zip_path) as zf:
        text = zf.read(member).decode("utf-8")
    return [row[column] for row in csv.DictReader(io.StringIO(text))]


def write_mmlu(root, subjects=("abstract_algebra", "anatomy"), n_test=4):
    """A small MMLU folder in the official layout: data/{dev,val,test}/<subject>_<split>.csv, no header."""
    rows = {}
    for subject in subjects:
        for split, n in (("dev", 5), ("val", 2), ("test", n_test)):
            folder = root / "data" / split
            folder.mkdir(parents=True, exist_ok=True)
            body = [[f"{subject} {split} question {i}, with a comma?", f"a{i}", f"b{i}", f"c{i}", f"d{i}",
                     "ABCD"[i % 4]] for i in range(n)]
            with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(body)
            rows[(subject, split)] = body
    return rows


# ----------------------------------------------------------------------------- test-double models


class PreferenceModel(torch.nn.Module):
    """A causal LM double: at the last position it puts the highest logit on `choose(text)`'s token.

    `choose` receives the decoded prompt, so a double can answer from the question text itself.
    """

    def __init__(self, tokenizer, choose, vocab_size=125696, context=4096):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the double a device
        self.tokenizer, self.choose, self.vocab_size = tokenizer, choose, vocab_size
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.calls = []

    def forward(self, input_ids, attention_mask, use_cache=False, logits_to_keep=0):
        self.calls.append(tuple(input_ids.shape))
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()].tolist()
            logits[row, 0, self.choose(self.tokenizer.decode(ids))] = 10.0
        return SimpleNamespace(logits=logits)


def run_double(task, data, tokenizer, choose, **kw):
    model = PreferenceModel(tokenizer, choose)  # sees whole prompts: no shared-prefix cache
    return evaluate(model, tokenizer, task, data, split=kw.pop("split", "val"), progress=False,
                       share_prefix=False, **kw), model


def gold_by_question(zip_path, members, column="answer", question="question"):
    gold = {}
    for member in members:
        with zipfile.ZipFile(zip_path) as zf:
            for row in csv.DictReader(io.StringIO(zf.read(member).decode("utf-8"))):
                gold[row[question]] = row[column]
    return gold


def asked_question(prompt: str) -> str:
    """The question text of the last example in a prompt (the one being asked)."""
    last = prompt.rsplit("\n\n", 1)[-1]
    return last.split("\nA. ")[0].removeprefix("题目：")


def fake_result(subject, category, questions, correct):
    return SubjectResult(subject, subject, category, questions, correct, 0, 0, 0, [])


class UniformModel(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))
