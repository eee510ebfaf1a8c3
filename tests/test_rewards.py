"""The built-in rule rewards, checked on answers whose scores are counted by hand."""

from __future__ import annotations

import pytest

from baichuan_tune import rewards


def test_chinese_ratio():
    # "你好 ab": 4 non-space characters, 2 of them Chinese; "OK!" none; "" scores 0
    assert rewards.chinese_ratio([], ["你好 ab", "OK!", "", "东京。"]) == [2 / 4, 0.0, 0.0, 2 / 3]


def test_contains_keyword():
    assert rewards.contains_keyword([], ["in Paris", "paris", ""], keyword="Paris") == [1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="keyword"):
        rewards.contains_keyword([], ["x"])


def test_shorter_than():
    assert rewards.shorter_than([], ["a", "b", "c"], response_lengths=[3, 4, 8], max_tokens=4) == [1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match="response_lengths"):
        rewards.shorter_than([], ["a"])
