"""`baichuan-tune demo`: says that the built-in model's weights are random, and shows the sft demo's answers."""

from __future__ import annotations

import re

import pytest

from baichuan_tune.commands import demo, sft

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT = "What is the capital of Japan?"  # one of the sft demo's own prompts


def test_random_weights_are_announced_and_the_sft_demo_is_suggested(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo.main(["--max_new_tokens", "3"]) == 0
    printed = capsys.readouterr().out
    assert "weights are random" in printed and printed.count("> ") == 2
    assert "`baichuan-tune sft` (no options" in printed and "after `baichuan-tune sft`" not in printed


def test_after_the_sft_demo_its_trained_answers_are_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    # the sft demo itself (a few steps of it), which writes outputs/sft-demo and prints its answers after training
    assert sft.main(["--max_steps", "4", "--report_to", "none", "--cache_dir", "none", "--plot_loss", "false"]) == 0
    after = re.search(rf"> {re.escape(PROMPT)}\n  before: .*\n  after:  (.*)\n", capsys.readouterr().out).group(1)
    assert demo.main(["--prompt", PROMPT, "--max_new_tokens", "32"]) == 0
    printed = capsys.readouterr().out
    assert "weights are random" in printed
    trained = printed.split("after `baichuan-tune sft`", 1)[1]
    assert "outputs/sft-demo" in trained and "baichuan2 chat format" in trained
    assert f"> {PROMPT}\n{after}\n" in trained  # the answer the sft demo printed for the same prompt


def test_an_own_model_gets_no_built_in_notes(tmp_path, monkeypatch, capsys):
    from baichuan_tune.builtin import default_model_dir

    monkeypatch.chdir(tmp_path)
    assert demo.main(["--model", str(default_model_dir()), "--max_new_tokens", "2", "--prompt", "hi"]) == 0
    printed = capsys.readouterr().out
    assert "random" not in printed and "baichuan-tune sft" not in printed
