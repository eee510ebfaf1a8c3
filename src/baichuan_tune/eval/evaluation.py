"""Benchmark evaluation: C-Eval, CMMLU and MMLU n-shot multiple choice, and perplexity.

Each benchmark is read from its official archive or folder as published and prompted in the format of
its own repository, so numbers compare with the published ones:

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

Scoring (no generation): one forward pass per batch of left-padded prompts; the logits at the last prompt
position are read at the ids of the four answer letters *as they follow the answer prefix* ("答案：A" ends
in the piece "A", "Answer: A" in "▁A"), softmaxed over the four, and the argmax is the prediction.
Few-shot examples are the first n rows of the dev split in file order; a prompt longer than the context
drops examples from the end first (as hendrycks' and C-Eval's code do), and only then loses its head.

Perplexity: each document is tokenized on its own and cut into windows of `max_length` tokens; every token
after the first of its window is predicted, and ppl = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import csv
import io
import json
import math
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BaichuanTuneError, DataError
from ..serve.generation import context_length, model_device  # noqa: F401 - also this module's API (ev.context_length)

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "val", "test")
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")

# Subjects and their categories: C-Eval from its `subject_mapping.json`, CMMLU from its `src/categories.py`
# (its four subject groups; CMMLU's extra "China specific" overlay is not a fifth group here), MMLU from
# hendrycks/test `categories.py`. The Chinese names are the ones the prompts use.
_CEVAL_SUBJECTS = {
    "STEM": {
        "advanced_mathematics": "高等数学", "college_chemistry": "大学化学", "college_physics": "大学物理",
        "college_programming": "大学编程", "computer_architecture": "计算机组成", "computer_network": "计算机网络",
        "discrete_mathematics": "离散数学", "electrical_engineer": "注册电气工程师", "high_school_biology": "高中生物",
        "high_school_chemistry": "高中化学", "high_school_mathematics": "高中数学", "high_school_physics": "高中物理",
        "metrology_engineer": "注册计量师", "middle_school_biology": "初中生物", "middle_school_chemistry": "初中化学",
        "middle_school_mathematics": "初中数学", "middle_school_physics": "初中物理", "operating_system": "操作系统",
        "probability_and_statistics": "概率统计", "veterinary_medicine": "兽医学",
    },
    "Social Sciences": {
        "business_administration": "工商管理", "college_economics": "大学经济学", "education_science": "教育学",
        "high_school_geography": "高中地理", "high_school_politics": "高中政治",
        "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论",
        "marxism": "马克思主义基本原理", "middle_school_geography": "初中地理", "middle_school_politics": "初中政治",
        "teacher_qualification": "教师资格",
    },
    "Humanities": {
        "art_studies": "艺术学", "chinese_language_and_literature": "中国语言文学", "high_school_chinese": "高中语文",
        "high_school_history": "高中历史", "ideological_and_moral_cultivation": "思想道德修养与法律基础", "law": "法学",
        "legal_professional": "法律职业资格", "logic": "逻辑学", "middle_school_history": "初中历史",
        "modern_chinese_history": "近代史纲要", "professional_tour_guide": "导游资格",
    },
    "Other": {
        "accountant": "注册会计师", "basic_medicine": "基础医学", "civil_servant": "公务员", "clinical_medicine": "临床医学",
        "environmental_impact_assessment_engineer": "环境影响评价工程师", "fire_engineer": "注册消防工程师",
        "physician": "医师资格", "plant_protection": "植物保护", "sports_science": "体育学", "tax_accountant": "税务师",
        "urban_and_rural_planner": "注册城乡规划师",
    },
}
_CMMLU_SUBJECTS = {
    "STEM": {
        "anatomy": "解剖学", "astronomy": "天文学", "college_actuarial_science": "大学精算学",
        "college_engineering_hydrology": "大学工程水文学", "college_mathematics": "大学数学",
        "college_medical_statistics": "大学医学统计", "computer_science": "计算机科学", "conceptual_physics": "概念物理学",
        "electrical_engineering": "电气工程", "elementary_mathematics": "初等数学", "genetics": "遗传学",
        "high_school_biology": "高中生物", "high_school_chemistry": "高中化学", "high_school_mathematics": "高中数学",
        "high_school_physics": "高中物理学", "machine_learning": "机器学习", "virology": "病毒学",
    },
    "Social Sciences": {
        "ancient_chinese": "古汉语", "business_ethics": "商业伦理", "chinese_civil_service_exam": "中国公务员考试",
        "chinese_food_culture": "中国饮食文化", "chinese_foreign_policy": "中国外交政策",
        "chinese_teacher_qualification": "中国教师资格", "college_education": "大学教育学", "economics": "经济学",
        "education": "教育学", "elementary_chinese": "小学语文", "ethnology": "民族学", "high_school_geography": "高中地理",
        "high_school_politics": "高中政治", "journalism": "新闻学", "management": "管理学", "marketing": "市场营销",
        "modern_chinese": "现代汉语", "professional_accounting": "专业会计", "professional_psychology": "专业心理学",
        "public_relations": "公共关系", "security_study": "安全研究", "sociology": "社会学",
    },
    "Humanities": {
        "arts": "艺术学", "chinese_history": "中国历史", "chinese_literature": "中国文学", "college_law": "大学法律",
        "global_facts": "全球事实", "international_law": "国际法学", "jurisprudence": "法理学", "logical": "逻辑学",
        "marxist_theory": "马克思主义理论", "philosophy": "哲学", "professional_law": "专业法学", "world_history": "世界历史",
        "world_religions": "世界宗教",
    },
    "Other": {
        "agronomy": "农学", "chinese_driving_rule": "中国驾驶规则", "clinical_knowledge": "临床知识", "college_medicine": "大学医学",
        "computer_security": "计算机安全", "construction_project_management": "建设工程管理", "elementary_commonsense": "小学常识",
        "elementary_information_and_technology": "小学信息技术", "food_science": "食品科学", "human_sexuality": "人类性行为",
        "legal_and_moral_basis": "法律与道德基础", "nutrition": "营养学", "professional_medicine": "专业医学",
        "sports_science": "体育学", "traditional_chinese_medicine": "中医中药",
    },
}
_MMLU_SUBJECTS = {
    "STEM": (
        "abstract_algebra", "astronomy", "college_biology", "college_chemistry", "college_computer_science",
        "college_mathematics", "college_physics", "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics", "machine_learning",
    ),
    "Social Sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics", "high_school_macroeconomics",
        "high_school_microeconomics", "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ),
    "Humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history", "high_school_world_history",
        "international_law", "jurisprudence", "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ),
    "Other": (
        "anatomy", "business_ethics", "clinical_knowledge", "college_medicine", "global_facts", "human_aging",
        "management", "marketing", "medical_genetics", "miscellaneous", "nutrition", "professional_accounting",
        "professional_medicine", "virology",
    ),
}


def _flatten(by_category: dict) -> dict[str, tuple[str, str]]:
    """{category: {subject: name}} or {category: (subject, ...)} -> {subject: (prompt name, category)}."""
    out = {}
    for category, subjects in by_category.items():
        if isinstance(subjects, dict):
            out.update({subject: (name, category) for subject, name in subjects.items()})
        else:  # MMLU names a subject by its words: "abstract_algebra" -> "abstract algebra"
            out.update({subject: (subject.replace("_", " "), category) for subject in subjects})
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    """One benchmark: its files, its prompt format and how its average is taken."""

    name: str
    title: str
    header: str  # first line(s) of every prompt, with {subject}
    question_prefix: str  # written before each question
    answer_prefix: str  # written after the choices; the answer letter follows it
    answer_sep: str  # between the answer prefix and the letter
    splits: tuple[str, ...]
    split_suffix: bool  # files are named <subject>_<split>.csv (else <subject>.csv)
    has_header: bool  # first CSV row names the columns
    average: str  # "subject": mean of subject accuracies; "question": over all questions
    subjects: dict[str, tuple[str, str]] = field(repr=False)

    def category(self, subject: str) -> str:
        return self.subjects[subject][1]


TASKS: dict[str, Task] = {
    "ceval": Task(
        "ceval", "C-Eval", "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n", "", "\n答案：", "",
        SPLITS, True, True, "subject", _flatten(_CEVAL_SUBJECTS),
    ),
    "cmmlu": Task(
        "cmmlu", "CMMLU", "以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\n\n", "题目：", "\n答案是：", "",
        ("dev", "test"), False, True, "subject", _flatten(_CMMLU_SUBJECTS),
    ),
    "mmlu": Task(
        # Two spaces after "about": hendrycks' format_subject writes a space before every word of the subject.
        "mmlu", "MMLU", "The following are multiple choice questions (with answers) about  {subject}.\n\n", "",
        "\nAnswer:", " ", SPLITS, True, False, "question", _flatten(_MMLU_SUBJECTS),
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise BaichuanTuneError(f"unknown task '{name}' (known: {', '.join(TASKS)}, ppl)")
    return TASKS[name]


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


# ----------------------------------------------------------------------------- scoring


def _batches(order: list[int], lengths: list[int], batch_size: int, max_batch_tokens: int):
    """Consecutive runs of `order` (longest first) with at most batch_size rows and padded tokens."""
    batch: list[int] = []
    for i in order:
        width = max(lengths[j] for j in batch + [i])
        if batch and (len(batch) >= batch_size or width * (len(batch) + 1) > max_batch_tokens):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], letter_ids: list[int], pad_id: int, batch_size: int = 8,
                  max_batch_tokens: int = 32768, share_prefix: bool = False) -> torch.Tensor:
    """Probabilities of the answer letters at the end of each prompt: [N, 4] (fp32, on CPU).

    Prompts are sorted longest first so a batch wastes little on padding, left-padded so the answer
    position is the last column for every row (the model restarts positions after the padding), and
    only the last position's logits are computed. With `share_prefix`, the token prefix that all prompts
    share (a subject's header and few-shot examples) runs once and its KV cache serves every batch.
    """
    prefix_len = common_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
    if prefix_len >= MIN_SHARED_PREFIX:
        return _score_after_prefix(model, prompts, prefix_len, letter_ids, pad_id, batch_size, max_batch_tokens)
    device = model_device(model)
    lengths = [len(p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    probs = torch.empty(len(prompts), len(letter_ids))
    letters = torch.tensor(letter_ids, device=device)
    for batch in _batches(order, lengths, batch_size, max_batch_tokens):
        width = max(lengths[i] for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, width - lengths[i]:] = torch.tensor(prompts[i])
            mask[row, width - lengths[i]:] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1)
        logits = out.logits[:, -1].index_select(-1, letters).float()  # [B, 4]
        probs[batch] = torch.softmax(logits, dim=-1).cpu()
    return probs


# A shared prefix shorter than this is not worth a separate forward pass and a cache copy per batch.
MIN_SHARED_PREFIX = 16


def common_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    first, n = prompts[0], min(len(p) for p in prompts) - 1
    for p in prompts[1:]:
        i = 0
        while i < n and p[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _cache_kwarg() -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); pass the KV cache by the current name."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _body_and_head(model):
    """The decoder stack and the output head of a causal LM, also inside a PEFT wrapper (whose adapter
    layers sit in those modules, so they still apply)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.base_model, base.get_output_embeddings()


def _score_after_prefix(model, prompts, prefix_len, letter_ids, pad_id, batch_size, max_batch_tokens):
    """Run the shared prefix once, then the right-padded rests of the prompts in batches on its KV cache.

    transformers' DynamicCache holds the prefix keys/values; each batch gets them expanded (a view) to its
    rows. The attention mask covers prefix + rest; right padding keeps every real token at its position.
    The head runs only on each row's last real position (its hidden state is gathered first), since the
    rests end at different columns.
    """
    from transformers.cache_utils import DynamicCache

    body, head = _body_and_head(model)
    device, name = model_device(model), _cache_kwarg()
    prefix = torch.tensor([prompts[0][:prefix_len]], device=device)
    cache = getattr(body(input_ids=prefix, use_cache=True), name)
    layers = [(layer.keys, layer.values) for layer in cache.layers]  # each [1, H, P, D]
    rests = [p[prefix_len:] for p in prompts]
    lengths = [len(r) for r in rests]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    probs = torch.empty(len(prompts), len(letter_ids))
    letters = torch.tensor(letter_ids, device=device)
    with_prefix = [n + prefix_len for n in lengths]  # a row's cached prefix counts towards the token budget
    for batch in _batches(order, with_prefix, batch_size, max_batch_tokens):
        rows, width = len(batch), max(lengths[i] for i in batch)
        ids = torch.full((rows, width), pad_id, dtype=torch.long)
        mask = torch.zeros((rows, prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(rests[i])
            mask[row, prefix_len: prefix_len + lengths[i]] = 1
        batch_cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                                   for k, v in layers])
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=True,
                      **{name: batch_cache}).last_hidden_state  # [B, W, hidden]
        last = torch.tensor([lengths[i] - 1 for i in batch], device=device)
        logits = head(hidden[torch.arange(rows, device=device), last])  # [B, vocab]
        probs[batch] = torch.softmax(logits.index_select(-1, letters).float(), dim=-1).cpu()
    return probs


@dataclass
class SubjectResult:
    subject: str
    name: str
    category: str
    questions: int
    correct: int | None  # None where the split has no answers
    shots_dropped: int  # few-shot examples dropped to fit the context, summed over questions
    prompts_shortened: int  # prompts that lost at least one example
    truncated: int  # prompts cut from the left even with no examples
    predictions: list[dict]

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None or not self.questions else 100.0 * self.correct / self.questions


def evaluate_subject(model, tokenizer, task: Task, data: SubjectData, letter_ids: list[int], n_shot: int,
                     max_length: int, batch_size: int, max_batch_tokens: int, eval_split: str,
                     share_prefix: bool = True) -> SubjectResult:
    prompts, dropped = [], []
    truncated = 0
    for q in data.questions:
        # Evaluating dev itself: a question is never its own example.
        pool = [s for s in data.shots if s is not q] if eval_split == "dev" else data.shots
        ids, n_dropped, cut = encode_prompt(task, tokenizer, data.name, pool[:n_shot], q, max_length)
        prompts.append(ids)
        dropped.append(n_dropped)
        truncated += cut
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probs = torch.empty(len(prompts), len(letter_ids))
    for n_dropped in sorted(set(dropped)):  # prompts with the same examples share a prefix
        group = [i for i, d in enumerate(dropped) if d == n_dropped]
        probs[group] = score_prompts(model, [prompts[i] for i in group], letter_ids, pad_id, batch_size,
                                     max_batch_tokens, share_prefix)
    preds = probs.argmax(dim=-1).tolist()
    has_answers = all(q.answer is not None for q in data.questions)
    predictions = [
        {"id": q.id, "prediction": LETTERS[p], "answer": q.answer, "probs": [round(x, 6) for x in row]}
        for q, p, row in zip(data.questions, preds, probs.tolist())
    ]
    correct = sum(LETTERS[p] == q.answer for q, p in zip(data.questions, preds)) if has_answers else None
    return SubjectResult(data.subject, data.name, data.category, len(data.questions), correct,
                         sum(dropped), sum(d > 0 for d in dropped), truncated, predictions)


def evaluate(model, tokenizer, task: Task, subjects: list[SubjectData], *, split: str, n_shot: int = 5,
             max_length: int | None = None, batch_size: int = 8, max_batch_tokens: int = 32768,
             share_prefix: bool = True, progress: bool = True) -> list[SubjectResult]:
    """Score every subject; a progress bar runs over subjects. `share_prefix`: see `score_prompts`."""
    from tqdm.auto import tqdm

    max_length = max_length or context_length(model)
    letter_ids = answer_token_ids(task, tokenizer)
    results = []
    bar = tqdm(subjects, desc=f"{task.title} {split}", unit="subject", disable=not progress)
    for data in bar:
        bar.set_postfix_str(data.subject)
        results.append(evaluate_subject(model, tokenizer, task, data, letter_ids, n_shot, max_length,
                                        batch_size, max_batch_tokens, split, share_prefix))
    bar.close()
    return results


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


# ----------------------------------------------------------------------------- perplexity


def read_texts(path, text_field: str = "text") -> list[str]:
    """Documents of a .txt file (the whole file is one document) or a .jsonl/.json file (one per record)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix not in (".jsonl", ".json"):
        return [text] if text.strip() else []
    if path.suffix == ".json":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a list of records")
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: record {number}: not valid JSON ({exc.msg})") from None
    return [_record_text(rec, number, path, text_field) for number, rec in enumerate(records, start=1)]


def _record_text(record, number: int, path: Path, text_field: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        raise DataError(f"{path}: record {number}: no field '{text_field}' (choose it with --text-field)")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{path}: record {number}: field '{text_field}' is {type(value).__name__}, expected text")
    return value


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str], max_length: int | None = None, batch_size: int = 4,
               progress: bool = True) -> dict:
    """exp(mean NLL) over every predicted token of `texts` (windows of `max_length` tokens); a progress bar
    runs over the batches of windows."""
    from tqdm.auto import tqdm

    max_length = max_length or context_length(model)
    windows = []
    for text in texts:
        ids = tokenizer.encode(text, verbose=False)  # long documents are cut into windows below
        windows += [ids[i: i + max_length] for i in range(0, len(ids), max_length)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise DataError("no document has two or more tokens to score")
    device = model_device(model)
    windows.sort(key=len, reverse=True)
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        batch = windows[start: start + batch_size]
        width = len(batch[0])
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, w in enumerate(batch):  # right padding: the pads sit after every real token
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        for row, w in enumerate(batch):
            n = len(w)
            target = ids[row, 1:n].to(logits.device)
            total_nll += F.cross_entropy(logits[row, : n - 1].float(), target, reduction="sum").item()
            total_tokens += n - 1
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll_per_token": nll, "tokens": total_tokens, "documents": len(texts),
            "windows": len(windows), "max_length": max_length}
