"""Benchmark results: per-category and average accuracies as each benchmark's paper averages them, the
printed table, and the per-question submission file.
"""

from __future__ import annotations

from .scoring import SubjectResult
from .tasks import CATEGORIES, Task

# ----------------------------------------------------------------------------- summaries


def _group(task: Task, results: list[SubjectResult]) -> dict:
    scored = [r for r in results if r.correct is not None]
    questions = sum(r.questions for r in results)
    group = {"subjects": len(results), "questions": questions}
    if not scored or len(scored) < len(results):
        return group | {"correct": None, "accuracy": None, "question_accuracy": None, "subject_mean": None}
    correct = sum(r.correct for r in scored)
    question_acc = 100.0 * correct / questions if questions else 0.0
    subject_mean = sum(r.accuracy for r in scored) / len(scored)
    headline = subject_mean if task.average == "subject" else question_acc
    return group | {"correct": correct, "accuracy": headline, "question_accuracy": question_acc,
                    "subject_mean": subject_mean}


def summarize(task: Task, results: list[SubjectResult]) -> dict:
    """Per subject, per category and overall. `accuracy` is the task's own average (see module doc);
    both `subject_mean` and `question_accuracy` are given. Accuracies are percentages."""
    categories = {c: _group(task, [r for r in results if r.category == c]) for c in CATEGORIES}
    return {
        "average": "mean over subjects" if task.average == "subject" else "over all questions",
        "overall": _group(task, results),
        "categories": {c: g for c, g in categories.items() if g["subjects"]},
        "subjects": {
            r.subject: {"name": r.name, "category": r.category, "questions": r.questions, "correct": r.correct,
                        "accuracy": r.accuracy, "shots_dropped": r.shots_dropped,
                        "prompts_shortened": r.prompts_shortened, "truncated": r.truncated}
            for r in results
        },
        "shots_dropped": sum(r.shots_dropped for r in results),
        "prompts_shortened": sum(r.prompts_shortened for r in results),
        "truncated": sum(r.truncated for r in results),
    }


def _pct(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(task: Task, summary: dict, show_subjects: bool = True) -> str:
    """The on-screen table: subjects by category, then categories and the average."""
    lines = []
    if show_subjects:
        lines.append(f"{'subject':<42} {'category':<16} {'questions':>9} {'accuracy':>9}")
        for category in CATEGORIES:
            for subject, s in summary["subjects"].items():
                if s["category"] == category:
                    lines.append(f"{subject:<42} {category:<16} {s['questions']:>9} {_pct(s['accuracy']):>9}")
        lines.append("")
    lines.append(f"{'category':<16} {'subjects':>8} {'questions':>9} {'accuracy':>9} {'subj-mean':>9} "
                 f"{'q-weighted':>10}")
    rows = list(summary["categories"].items()) + [("Average", summary["overall"])]
    for name, g in rows:
        lines.append(f"{name:<16} {g['subjects']:>8} {g['questions']:>9} {_pct(g['accuracy']):>9} "
                     f"{_pct(g['subject_mean']):>9} {_pct(g['question_accuracy']):>10}")
    lines.append(f"({task.title} average = {summary['average']}; accuracies in %)")
    return "\n".join(lines)


def submission(results: list[SubjectResult]) -> dict:
    """Predictions as {subject: {id: letter}}, the form C-Eval's leaderboard takes for its test split."""
    return {r.subject: {p["id"]: p["prediction"] for p in r.predictions} for r in results}
