"""The demo figures in README.md and docs/alignment.md are the ones docs/demo_figures.json records: written by
scripts/demo_figures.py, never by hand (the demo tests compare that file with what the demos measure)."""

from __future__ import annotations

import pytest

from documented import FIGURES, ROOT, script


def test_docs_show_the_recorded_figures():
    demo_figures = script()
    assert demo_figures.stale_blocks(FIGURES) == [], "run: python scripts/demo_figures.py --render"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ppo = FIGURES["ppo"]
    assert f"reward {ppo['eval_reward_before']:.2f} -> {ppo['eval_reward']:.2f}" in readme


def test_a_hand_edit_is_caught_and_rewritten(tmp_path):
    demo_figures = script()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    edited = text.replace("pairwise accuracy", "pairwise accuracy 0.99 ->", 1)
    assert demo_figures.block(edited, "pipeline") != demo_figures.render("pipeline", FIGURES)
    assert demo_figures.rewrite(edited, "pipeline", demo_figures.render("pipeline", FIGURES)) == text
    with pytest.raises(ValueError, match="expected one"):
        demo_figures.block("no markers here", "pipeline")
