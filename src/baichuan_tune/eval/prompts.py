"""Benchmark prompts in the format of each benchmark's own repository, so numbers compare with the published ones:

- C-Eval (hkust-nlp/ceval, `code/evaluator_series/evaluators/llama.py`, `resources/tutorial.md`):
  "以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n", then per example
  "{question}\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\n答案：{X}\\n\\n"; the asked question ends at "答案：".
  Average = mean of the subject accuracies (the C-Eval paper's "Average").
- CMMLU (haonan-li/CMMLU, `src/mp_utils.py`): "以下是关于{科目}的单项选择题，请直接给出正确答案的选项。\\n\\n",
  then "题目：{question}\\nA. ...\\n答案是：{X}\\n\\n". Average = mean of the subject accuracies.
- MMLU (hendrycks/test, `evaluate_flan.py`, also Baichuan-7B's `evaluation/evaluate_mmlu.py`):
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n", then
  "{question}\\nA. ...\\nAnswer: {X}\\n\\n". The subject is written as that code writes it: a space before
  each word, so "about  abstract algebra." has two spaces. Average = over all questions.

Few-shot examples are the first n rows of the dev split in file order; a prompt longer than the context
drops examples from the end first (as hendrycks' and C-Eval's code do), and only then loses its head.
"""

from __future__ import annotations

from ..errors import BaichuanTuneError
from .reading import Question
from .tasks import LETTERS, Task

# ----------------------------------------------------------------------------- prompts


def format_example(task: Task, q: Question, with_answer: bool) -> str:
    text = task.question_prefix + q.question
    text += "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices))
    text += task.answer_prefix
    return (text + f"{task.answer_sep}{q.answer}\n\n") if with_answer else text


def build_prompt(task: Task, subject_name: str, shots: list[Question], q: Question) -> str:
    head = task.header.format(subject=subject_name)
    return head + "".join(format_example(task, s, True) for s in shots) + format_example(task, q, False)


def encode_prompt(task: Task, tokenizer, subject_name: str, shots: list[Question], q: Question,
                  max_length: int) -> tuple[list[int], int, bool]:
    """(token ids, few-shot examples dropped, head truncated): drop examples from the end until it fits."""
    k = len(shots)
    while True:
        ids = tokenizer.encode(build_prompt(task, subject_name, shots[:k], q), verbose=False)  # we check length
        if len(ids) <= max_length or k == 0:
            break
        k -= 1
    truncated = len(ids) > max_length
    return (ids[-max_length:] if truncated else ids), len(shots) - k, truncated


def answer_token_ids(task: Task, tokenizer) -> list[int]:
    """Ids of A/B/C/D as the tokenizer writes them right after the answer prefix.

    Baichuan2's tokenizer gives "答案：A" -> ..., "A" and "Answer: A" -> ..., "▁A"; Baichuan-7B's gives the
    same pieces after its leading "▁". Encoding a letter alone would give Baichuan-7B's "▁A" for C-Eval,
    a token the model never sees after "答案：".
    """
    context = tokenizer.encode(task.answer_prefix, add_special_tokens=False)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(task.answer_prefix + task.answer_sep + letter, add_special_tokens=False)
        if len(full) != len(context) + 1 or full[: len(context)] != context:
            raise BaichuanTuneError(
                f"this tokenizer does not write '{letter}' after {task.answer_prefix!r} as one separate token "
                f"({context} -> {full}); letter scoring needs one token per answer"
            )
        ids.append(full[-1])
    return ids
