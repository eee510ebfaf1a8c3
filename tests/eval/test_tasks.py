"""`baichuan_tune.eval.tasks`: the subject tables against the published mappings and archives.
"""

from __future__ import annotations

import json
import zipfile

import pytest

from baichuan_tune.eval.tasks import CATEGORIES, TASKS

from .helpers import CEVAL_ZIP, CMMLU_ZIP, data_file

# ----------------------------------------------------------------------------- subject tables


@pytest.mark.parametrize("task_name, parts, split", [("ceval", CEVAL_ZIP, "val"), ("cmmlu", CMMLU_ZIP, "test")])
def test_subject_tables_match_published_mapping_and_archive(shared_data, task_name, parts, split):
    task = TASKS[task_name]
    mapping = json.loads((data_file(shared_data, parts).parent / "mapping.json").read_text(encoding="utf-8"))
    assert task.subjects == {s: (m["name"], m["category"]) for s, m in mapping.items()}
    with zipfile.ZipFile(shared_data.joinpath(*parts)) as zf:
        stems = {n.split("/")[-1][:-4] for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".csv")}
    suffix = f"_{split}" if task.split_suffix else ""
    assert {s[: len(s) - len(suffix)] for s in stems} == set(task.subjects)
    assert len(task.subjects) == {"ceval": 52, "cmmlu": 67}[task_name]


def test_mmlu_table_is_hendrycks_categories():
    subjects = TASKS["mmlu"].subjects
    assert len(subjects) == 57
    counts = {c: sum(cat == c for _, cat in subjects.values()) for c in CATEGORIES}
    # hendrycks/test categories.py: 18 STEM, 12 social-science, 13 humanities and 14 other subjects
    assert counts == {"STEM": 18, "Social Sciences": 12, "Humanities": 13, "Other": 14}
    assert subjects["abstract_algebra"] == ("abstract algebra", "STEM")
    assert subjects["professional_law"][1] == "Humanities"
    assert subjects["econometrics"][1] == "Social Sciences"
    assert subjects["professional_accounting"][1] == "Other"
