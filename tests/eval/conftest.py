"""Fixtures shared by the eval tests."""

from __future__ import annotations

import pytest
from conftest import need_shared


@pytest.fixture(scope="module")
def baichuan2_tokenizer():
    from conftest import REFERENCE

    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer(vocab_file=str(need_shared(REFERENCE / "baichuan2-13b-chat" / "tokenizer.model")))
