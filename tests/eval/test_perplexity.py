"""`baichuan_tune.eval.perplexity`: against a uniform model (ppl = vocabulary size) and the model's own loss.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_model

from baichuan_tune.errors import DataError
from baichuan_tune.eval.perplexity import perplexity, read_texts

from .helpers import UniformModel


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(baichuan2_tokenizer):
    texts = ["一段中文文本，用来计算困惑度。", "Some English text as a second document, a little longer than the first."]
    result = perplexity(UniformModel(125696), baichuan2_tokenizer, texts, max_length=8, batch_size=3)
    assert result["perplexity"] == pytest.approx(125696, rel=1e-4)
    n_tokens = [len(baichuan2_tokenizer.encode(t)) for t in texts]
    windows = [min(8, n - i) for n in n_tokens for i in range(0, n, 8)]
    assert result["tokens"] == sum(w - 1 for w in windows if w >= 2)


def test_perplexity_equals_the_models_own_loss():
    model = tiny_model("tiny-baichuan-13b")
    tokenizer = SimpleNamespace(encode=lambda text, **kw: [int(x) for x in text.split()])
    docs = [list(range(5, 45)), list(range(100, 117))]
    result = perplexity(model, tokenizer, [" ".join(map(str, d)) for d in docs], max_length=64, batch_size=2)
    with torch.no_grad():
        nll = [model(torch.tensor([d]), labels=torch.tensor([d])).loss.item() * (len(d) - 1) for d in docs]
    assert result["nll_per_token"] == pytest.approx(sum(nll) / (39 + 16), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / 55), rel=1e-5)


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nwith two lines\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt") == ["one document\nwith two lines\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"content": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl: record 2: no field 'text'"):
        read_texts(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"content": "y"}\n{"content": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl: record 2: field 'content' is int, expected text"):
        read_texts(tmp_path / "c.jsonl", text_field="content")
    (tmp_path / "d.json").write_text('[{"text": "p"}, {"text": "q"}]', encoding="utf-8")
    assert read_texts(tmp_path / "d.json") == ["p", "q"]
    (tmp_path / "e.txt").write_bytes("中文".encode("gbk"))
    with pytest.raises(DataError, match=r"e\.txt: not UTF-8 text"):
        read_texts(tmp_path / "e.txt")
