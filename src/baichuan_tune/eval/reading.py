"""Benchmark data read from its official archive or folder as published: one CSV per subject and split,
checked column by column (a bad file or row is one error naming it).
"""

from __future__ import annotations

import csv
import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import BaichuanTuneError, DataError
from .tasks import LETTERS, SPLITS, Task

# ----------------------------------------------------------------------------- reading the data


@dataclass
class Question:
    subject: str
    id: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str | None  # None where the split publishes no answers (C-Eval test)


@dataclass
class SubjectData:
    subject: str
    name: str  # as written in the prompt
    category: str
    shots: list[Question]  # the dev split, in file order
    questions: list[Question]  # the evaluated split


class _Files:
    """The CSV files of a folder, a .zip or a .tar(.gz) archive, by their relative POSIX path."""

    def __init__(self, path: Path):
        self.path, self._tar = path, {}
        if path.is_dir():
            names = [p.relative_to(path).as_posix() for p in path.rglob("*.csv")]
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".csv")]
        elif path.is_file() and tarfile.is_tarfile(path):
            self._tar = self._read_tar(path)  # one pass: a .tar.gz cannot seek to a member
            names = list(self._tar)
        elif not path.exists():
            raise DataError(f"{path}: not found (give the benchmark's folder or its .zip/.tar archive)")
        else:
            raise DataError(f"{path}: not a folder, .zip or .tar archive")
        # macOS archive litter (__MACOSX/, ._name) is not data
        self._names = sorted(n for n in names if "__MACOSX" not in n and not n.rsplit("/", 1)[-1].startswith("._"))

    @staticmethod
    def _read_tar(path: Path) -> dict[str, bytes]:
        """The CSVs of the dev/val/test folders (MMLU's data.tar also holds a large auxiliary_train)."""
        out = {}
        with tarfile.open(path) as tf:
            for member in tf:
                parts = member.name.split("/")
                if member.isfile() and member.name.endswith(".csv") and len(parts) > 1 and parts[-2] in SPLITS:
                    out[member.name] = tf.extractfile(member).read()
        return out

    def names(self) -> list[str]:
        return self._names

    def label(self, name: str) -> str:
        return str(self.path / name) if self.path.is_dir() else f"{self.path}:{name}"

    def read_text(self, name: str) -> str:
        if self.path.is_dir():
            raw = (self.path / name).read_bytes()
        elif self._tar:
            raw = self._tar[name]
        else:
            with zipfile.ZipFile(self.path) as zf:
                raw = zf.read(name)
        try:
            return raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{self.label(name)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _split_files(files: _Files, task: Task, split: str) -> dict[str, str]:
    """{subject: file name} of one split: the CSVs directly inside the shallowest folder named `split`."""
    by_dir: dict[str, dict[str, str]] = {}
    for name in files.names():
        parts = name.split("/")
        if len(parts) >= 2 and parts[-2] == split:
            stem = parts[-1][: -len(".csv")]
            if task.split_suffix and stem.endswith(f"_{split}"):
                stem = stem[: -len(split) - 1]
            by_dir.setdefault("/".join(parts[:-1]), {})[stem] = name
    if not by_dir:
        found = sorted({n.split("/")[-2] for n in files.names() if "/" in n})
        raise DataError(
            f"{files.path}: no '{split}' split of {task.title} here (folders with CSV files: "
            f"{', '.join(found) or 'none'}; {task.title} publishes {', '.join(task.splits)})"
        )
    return by_dir[min(by_dir, key=lambda d: (d.count("/"), d))]


def _columns(header: list[str], label: str) -> dict[str, int | None]:
    lower = [h.strip().lower() for h in header]
    cols: dict[str, int | None] = {}
    for key in ("question", *(c.lower() for c in LETTERS)):
        if key not in lower:
            raise DataError(f"{label}: no '{key}' column (header: {','.join(header)})")
        cols[key] = lower.index(key)
    cols["answer"] = lower.index("answer") if "answer" in lower else None
    cols["id"] = lower.index("id") if "id" in lower else (0 if lower and lower[0] == "" else None)
    return cols


def parse_csv(task: Task, text: str, subject: str, label: str) -> list[Question]:
    """Questions of one subject file; DataError names the file, record number and field on bad input."""
    rows = list(csv.reader(io.StringIO(text)))
    if task.has_header:
        if not rows:
            raise DataError(f"{label}: empty file (expected a header row)")
        cols, rows, first = _columns(rows[0], label), rows[1:], 2
    else:
        cols, first = {"question": 0, "a": 1, "b": 2, "c": 3, "d": 4, "answer": 5, "id": None}, 1
    width = 1 + max(v for v in cols.values() if v is not None)
    out = []
    for number, row in enumerate(rows, start=first):
        if not row:
            continue  # a blank line
        if len(row) < width:
            raise DataError(f"{label}: record {number}: {len(row)} fields, expected {width}")
        answer = row[cols["answer"]].strip().upper() if cols["answer"] is not None else None
        if answer is not None and answer not in LETTERS:
            raise DataError(f"{label}: record {number}: field 'answer' is {answer!r}, expected one of A, B, C, D")
        qid = row[cols["id"]].strip() if cols["id"] is not None else str(len(out))
        choices = tuple(row[cols[c.lower()]] for c in LETTERS)
        out.append(Question(subject, qid, row[cols["question"]], choices, answer))
    return out


def _pick_subjects(task: Task, available: list[str], wanted: list[str] | None, path: Path) -> list[str]:
    if not wanted:
        return sorted(s for s in available if s in task.subjects)
    chosen = []
    for subject in wanted:
        if subject not in task.subjects:
            import difflib

            hint = difflib.get_close_matches(subject, list(task.subjects), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise BaichuanTuneError(f"--subjects: '{subject}' is not a {task.title} subject{suggestion}")
        if subject not in available:
            raise DataError(f"{path}: no file for subject '{subject}' in this split")
        chosen.append(subject)
    return sorted(set(chosen))


def load_benchmark(task: Task, path, split: str, subjects: list[str] | None = None,
                   max_questions: int | None = None, need_shots: bool = True) -> list[SubjectData]:
    """Read one split (and the dev split for few-shot examples) of a benchmark, subject by subject."""
    if split not in task.splits:
        raise BaichuanTuneError(f"{task.title} has no '{split}' split (it publishes {', '.join(task.splits)})")
    if max_questions is not None and max_questions < 1:  # [:0] or [:-1] would silently drop questions
        raise BaichuanTuneError(f"max_questions must be at least 1, got {max_questions}")
    files = _Files(Path(path))
    eval_files = _split_files(files, task, split)
    dev_files = _split_files(files, task, "dev") if need_shots else {}
    out = []
    for subject in _pick_subjects(task, list(eval_files), subjects, files.path):
        name, category = task.subjects[subject]
        questions = parse_csv(task, files.read_text(eval_files[subject]), subject, files.label(eval_files[subject]))
        if not questions:  # a subject without questions has no accuracy to average
            raise DataError(f"{files.label(eval_files[subject])}: no questions in it")
        shots = []
        if split == "dev":
            shots = questions  # the same objects, so a question is recognised and left out of its own examples
        elif need_shots:
            if subject not in dev_files:
                raise DataError(f"{files.path}: no dev file for subject '{subject}' (few-shot examples come from dev)")
            shots = parse_csv(task, files.read_text(dev_files[subject]), subject, files.label(dev_files[subject]))
        out.append(SubjectData(subject, name, category, shots, questions[:max_questions]))
    if not out:
        raise DataError(f"{files.path}: no {task.title} subject files in the '{split}' split")
    return out
