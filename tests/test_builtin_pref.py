"""The built-in preference pairs: distinct, deterministic, in the published form, chosen answers right."""

from __future__ import annotations

import re

from baichuan_tune.builtin import CAPITALS
from baichuan_tune.builtin_pref import demo_preference_records, demo_prompts


def test_records_are_distinct_deterministic_and_in_published_form():
    records = demo_preference_records(300, seed=3)
    assert records == demo_preference_records(300, seed=3)
    assert records != demo_preference_records(300, seed=4)
    keys = {(r["conversations"][0]["value"], r["chosen"]["value"], r["rejected"]["value"]) for r in records}
    assert len(keys) == 300
    for r in records:
        assert set(r) == {"conversations", "chosen", "rejected"}
        assert r["conversations"][0]["from"] == "human"
        assert r["chosen"]["from"] == r["rejected"]["from"] == "gpt"
        assert r["chosen"]["value"] != r["rejected"]["value"]


def test_chosen_answers_are_right_and_rejected_wrong():
    capital_of = {en: cap for en, cap, _, _ in CAPITALS} | {zh: zcap for _, _, zh, zcap in CAPITALS}
    checked = 0
    for r in demo_preference_records(400):
        prompt, chosen, rejected = r["conversations"][0]["value"], r["chosen"]["value"], r["rejected"]["value"]
        sums = re.fullmatch(r"What is (\d) plus (\d)\?|(\d)加(\d)等于多少？", prompt)
        if sums:
            a, b = (int(x) for x in sums.groups() if x is not None)
            assert re.search(rf"(is |等于){a + b}[.。]$", chosen)
            assert not re.search(rf"(is |等于){a + b}[.。]$", rejected)
            checked += 1
        country = re.fullmatch(r"What is the capital of (\w+)\?|(\w+)的首都是哪里？", prompt)
        if country:
            name = next(x for x in country.groups() if x is not None)
            assert capital_of[name] in chosen and capital_of[name] not in rejected
            checked += 1
    assert checked > 150


def test_demo_prompts():
    prompts = demo_prompts(40, seed=1)
    assert len(prompts) == 40 and prompts == demo_prompts(40, seed=1)
    assert all(isinstance(p, str) and p for p in prompts)
