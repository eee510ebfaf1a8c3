"""The built-in preference pairs: distinct, deterministic, in the published form, chosen answers right."""

from __future__ import annotations

import re

from baichuan_tune.builtin import CAPITALS, COLOURS
from baichuan_tune.data.builtin_pref import demo_preference_records, demo_prompts


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
        colour = re.fullmatch(r"(?:Translate this colour into Chinese\.|把这个颜色翻译成中文。)\n(\w+)", prompt)
        if colour:
            zh = dict(COLOURS)[colour.group(1)]
            assert chosen.endswith((f"is {zh}.", f"是{zh}。")) and not rejected.endswith((f"is {zh}.", f"是{zh}。"))
            checked += 1
        country = re.fullmatch(r"What is the capital of (\w+)\?|(\w+)的首都是哪里？", prompt)
        if country:
            name = next(x for x in country.groups() if x is not None)
            assert capital_of[name] in chosen and capital_of[name] not in rejected
            checked += 1
    assert checked > 150
    assert not any("plus" in r["conversations"][0]["value"] for r in demo_preference_records(400))


def test_demo_prompts():
    prompts = demo_prompts(40, seed=1)
    assert len(prompts) == 40 and prompts == demo_prompts(40, seed=1)
    assert all(isinstance(p, str) and p for p in prompts)
