"""The README's CPU pipeline as a user runs it, `baichuan-tune sft` then `baichuan-tune ppo` with no options,
lands near the figures the docs quote (docs/demo_figures.json). Minutes on a CPU, so marked slow:
`pytest -m slow` runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from baichuan_tune.commands import ppo, sft
from documented import REWARD_TOLERANCE, assert_near


@pytest.mark.slow
def test_sft_then_ppo_demo_lands_near_the_documented_figures(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ppo's demo starts from the sft demo's outputs/sft-demo here
    assert sft.main(["--report_to", "none"]) == 0
    assert ppo.main(["--report_to", "none"]) == 0
    out = Path("outputs/ppo-demo")
    results = json.loads((out / "train_results.json").read_text())
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in log if "reward" in r and "eval_reward" not in r]
    measured = {**results, "reward_first5": sum(rewards[:5]) / 5, "reward_last5": sum(rewards[-5:]) / 5}
    assert_near(measured, "ppo", absolute={key: REWARD_TOLERANCE for key in (
        "eval_reward_before", "eval_reward", "reward_first5", "reward_last5")})
    assert results["eval_reward"] - results["eval_reward_before"] >= 0.15  # the effect itself, as the fast test
