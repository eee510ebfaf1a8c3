"""`baichuan_tune.eval.reading`: the official archive and folder layouts, and errors naming file, record and field.
"""

from __future__ import annotations

import pytest

from baichuan_tune.errors import BaichuanTuneError, DataError
from baichuan_tune.eval.prompts import build_prompt
from baichuan_tune.eval.reading import load_benchmark
from baichuan_tune.eval.tasks import TASKS

from .helpers import CEVAL_ZIP, CMMLU_ZIP, data_file, write_mmlu


def test_mmlu_official_layout_and_prompt(tmp_path):
    write_mmlu(tmp_path)
    task = TASKS["mmlu"]
    data = load_benchmark(task, tmp_path, "test")
    assert [d.subject for d in data] == ["abstract_algebra", "anatomy"]
    assert [d.category for d in data] == ["STEM", "Other"]
    first = data[0]
    assert len(first.questions) == 4 and first.questions[1].answer == "B"
    assert first.questions[0].question == "abstract_algebra test question 0, with a comma?"
    prompt = build_prompt(task, first.name, first.shots[:1], first.questions[0])
    assert prompt == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "abstract_algebra dev question 0, with a comma?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "abstract_algebra test question 0, with a comma?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"
    )


def test_data_errors_name_file_record_and_field(tmp_path, shared_data):
    write_mmlu(tmp_path)
    bad = tmp_path / "data" / "test" / "anatomy_test.csv"
    bad.write_text('q0,a,b,c,d,A\n"q1",a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: record 2: field 'answer' is 'E'"):
        load_benchmark(TASKS["mmlu"], tmp_path, "test")
    bad.write_text("q0,a,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: record 1: 4 fields, expected 6"):
        load_benchmark(TASKS["mmlu"], tmp_path, "test")
    bad.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: no questions in it"):
        load_benchmark(TASKS["mmlu"], tmp_path, "test")
    bad.write_text("q0,a,b,c,d,A\n", encoding="utf-8")
    for n in (0, -1):  # [:0] would leave no questions, [:-1] would silently drop the last one
        with pytest.raises(BaichuanTuneError, match=f"max_questions must be at least 1, got {n}"):
            load_benchmark(TASKS["mmlu"], tmp_path, "test", max_questions=n)
    with pytest.raises(BaichuanTuneError, match="CMMLU has no 'val' split"):
        load_benchmark(TASKS["cmmlu"], data_file(shared_data, CMMLU_ZIP), "val")
    with pytest.raises(BaichuanTuneError, match="did you mean 'basic_medicine'"):
        load_benchmark(TASKS["ceval"], data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicin"])
    with pytest.raises(DataError, match="not found"):
        load_benchmark(TASKS["ceval"], tmp_path / "missing.zip", "val")
    with pytest.raises(DataError, match="no 'val' split of C-Eval here"):
        load_benchmark(TASKS["ceval"], data_file(shared_data, CMMLU_ZIP), "val")


def test_tar_archive_like_hendrycks_data_tar(tmp_path):
    import tarfile

    write_mmlu(tmp_path / "src")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "data", arcname="data")
    from_tar = load_benchmark(TASKS["mmlu"], archive, "val")
    from_folder = load_benchmark(TASKS["mmlu"], tmp_path / "src", "val")
    assert from_tar == from_folder and [len(d.questions) for d in from_tar] == [2, 2]
