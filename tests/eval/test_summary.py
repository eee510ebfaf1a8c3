"""`baichuan_tune.eval.summary`: category tables and averages against hand-computed values; the submission file.
"""

from __future__ import annotations

import pytest

from baichuan_tune.eval.prompts import answer_token_ids
from baichuan_tune.eval.reading import load_benchmark
from baichuan_tune.eval.summary import format_table, submission, summarize
from baichuan_tune.eval.tasks import TASKS

from .helpers import CEVAL_ZIP, data_file, fake_result, run_double


def test_category_table_sums(shared_data, baichuan2_tokenizer):
    task = TASKS["ceval"]
    subjects = ["basic_medicine", "law", "logic", "college_physics", "marxism"]
    data = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", subjects, max_questions=6)
    letter_a = answer_token_ids(task, baichuan2_tokenizer)[0]
    results, _ = run_double(task, data, baichuan2_tokenizer, lambda text: letter_a)
    summary = summarize(task, results)
    cats = summary["categories"]
    assert set(cats) == {"Other", "Humanities", "STEM", "Social Sciences"}
    assert sum(c["subjects"] for c in cats.values()) == summary["overall"]["subjects"] == 5
    assert sum(c["questions"] for c in cats.values()) == summary["overall"]["questions"] == 30
    assert sum(c["correct"] for c in cats.values()) == summary["overall"]["correct"]
    assert cats["Humanities"]["subjects"] == 2  # law and logic
    text = format_table(task, summary)
    assert "Average" in text and "basic_medicine" in text


def test_averages_are_hand_computed():
    results = [fake_result("a", "STEM", 4, 3), fake_result("b", "STEM", 2, 1), fake_result("c", "Other", 1, 0)]
    ceval = summarize(TASKS["ceval"], results)
    # STEM: subjects 75% and 50% -> mean 62.5; questions 4/6
    assert ceval["categories"]["STEM"]["subject_mean"] == pytest.approx(62.5)
    assert ceval["categories"]["STEM"]["question_accuracy"] == pytest.approx(400 / 6)
    assert ceval["categories"]["STEM"]["accuracy"] == pytest.approx(62.5)  # C-Eval: mean over subjects
    assert ceval["overall"]["accuracy"] == pytest.approx((75 + 50 + 0) / 3)
    mmlu = summarize(TASKS["mmlu"], results)
    assert mmlu["overall"]["accuracy"] == pytest.approx(400 / 7)  # MMLU: over all questions
    assert set(ceval["categories"]) == {"STEM", "Other"}


def test_ceval_test_split_has_no_answers_and_gives_a_submission(shared_data, baichuan2_tokenizer):
    task = TASKS["ceval"]
    data = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "test", ["law"], max_questions=3)
    letter_c = answer_token_ids(task, baichuan2_tokenizer)[2]
    results, _ = run_double(task, data, baichuan2_tokenizer, lambda text: letter_c, split="test")
    summary = summarize(task, results)
    assert summary["overall"]["accuracy"] is None and results[0].correct is None
    assert submission(results) == {"law": {"0": "C", "1": "C", "2": "C"}}
