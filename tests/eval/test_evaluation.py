"""`baichuan_tune.eval.evaluation` on the real C-Eval and CMMLU archives in ../shared/data/eval, a synthetic MMLU
folder in the official layout, the real published tokenizers, test-double models whose answers are known,
and tiny random-weight models.

Oracles: prompts written out by hand from the CSV rows in the benchmarks' own format; answer keys read
with Python's csv module; letter ids from the SentencePiece files themselves; hand-computed averages.
"""

from __future__ import annotations

import csv
import io
import json
import math
import zipfile
from types import SimpleNamespace

import pytest
import torch

from baichuan_tune.eval import evaluation as ev
from baichuan_tune.errors import BaichuanTuneError, DataError
from conftest import need_shared, tiny_model

CEVAL_ZIP = ("eval", "ceval", "ceval.zip")
CMMLU_ZIP = ("eval", "cmmlu", "cmmlu.zip")


def data_file(shared_data, parts):
    return need_shared(shared_data.joinpath(*parts))


@pytest.fixture(scope="module")
def baichuan2_tokenizer():
    from conftest import REFERENCE
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    return BaichuanTokenizer(vocab_file=str(need_shared(REFERENCE / "baichuan2-13b-chat" / "tokenizer.model")))


def answer_key(zip_path, member: str, column: str) -> list[str]:
    """Gold letters of one subject file, read independently of the module."""
    with zipfile.ZipFile(zip_path) as zf:
        text = zf.read(member).decode("utf-8")
    return [row[column] for row in csv.DictReader(io.StringIO(text))]


# ----------------------------------------------------------------------------- subject tables


@pytest.mark.parametrize("task_name, parts, split", [("ceval", CEVAL_ZIP, "val"), ("cmmlu", CMMLU_ZIP, "test")])
def test_subject_tables_match_published_mapping_and_archive(shared_data, task_name, parts, split):
    task = ev.TASKS[task_name]
    mapping = json.loads((data_file(shared_data, parts).parent / "mapping.json").read_text(encoding="utf-8"))
    assert task.subjects == {s: (m["name"], m["category"]) for s, m in mapping.items()}
    with zipfile.ZipFile(shared_data.joinpath(*parts)) as zf:
        stems = {n.split("/")[-1][:-4] for n in zf.namelist() if n.startswith(f"{split}/") and n.endswith(".csv")}
    suffix = f"_{split}" if task.split_suffix else ""
    assert {s[: len(s) - len(suffix)] for s in stems} == set(task.subjects)
    assert len(task.subjects) == {"ceval": 52, "cmmlu": 67}[task_name]


def test_mmlu_table_is_hendrycks_categories():
    subjects = ev.TASKS["mmlu"].subjects
    assert len(subjects) == 57
    counts = {c: sum(cat == c for _, cat in subjects.values()) for c in ev.CATEGORIES}
    # hendrycks/test categories.py: 18 STEM, 12 social-science, 13 humanities and 14 other subjects
    assert counts == {"STEM": 18, "Social Sciences": 12, "Humanities": 13, "Other": 14}
    assert subjects["abstract_algebra"] == ("abstract algebra", "STEM")
    assert subjects["professional_law"][1] == "Humanities"
    assert subjects["econometrics"][1] == "Social Sciences"
    assert subjects["professional_accounting"][1] == "Other"


# ----------------------------------------------------------------------------- prompts


def test_ceval_prompt_of_a_known_question_is_the_official_five_shot_format(shared_data):
    task = ev.TASKS["ceval"]
    (data,) = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"])
    prompt = ev.build_prompt(task, data.name, data.shots[:5], data.questions[0])
    expected = (
        "以下是中国关于基础医学考试的单项选择题，请选出其中的正确答案。\n\n"
        "下列选项中，符合原癌基因概念的是____\nA. 是正常基因\nB. 是细胞癌基因\nC. 是肿瘤抑制基因\nD. 凋亡调节基因\n答案：A\n\n"
        "栓塞时常伴有DIC发生，主要见于____\nA. 脂肪栓塞\nB. 空气栓塞\nC. 血栓栓塞\nD. 羊水栓塞\n答案：D\n\n"
        "急性细菌性痢疾早期的结肠病变为____\nA. 假膜性炎\nB. 浆液性炎\nC. 卡他性炎\nD. 表面化脓性炎\n答案：C\n\n"
        "下列各项，属于肿瘤的是____\nA. 错构瘤\nB. 动脉瘤\nC. 室壁瘤\nD. 骨软骨瘤\n答案：D\n\n"
        "血吸虫虫卵引起的病变主要发生在____\nA. 大肠壁和肝脏\nB. 肠系膜静脉\nC. 门静脉\nD. 肺和肠\n答案：A\n\n"
        "不属于第二信使的物质是____\nA. cAMP\nB. cGMP\nC. $IP_3$\nD. 胰岛素\n答案："
    )
    assert prompt == expected
    assert data.questions[0].answer == "D"


def test_cmmlu_prompt_of_a_known_question_is_the_official_format(shared_data):
    task = ev.TASKS["cmmlu"]
    (data,) = ev.load_benchmark(task, data_file(shared_data, CMMLU_ZIP), "test", ["agronomy"])
    prompt = ev.build_prompt(task, data.name, data.shots[:2], data.questions[0])
    expected = (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：肉牛屠宰后，胴体的哪个部位肉质较好\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案是：C\n\n"
        "题目：下列鸭品种中，产蛋量最高的品种是\nA. 高邮鸭\nB. 北京鸭\nC. 樱桃谷鸭\nD. 绍鸭\n答案是：D\n\n"
        "题目：在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是\n"
        "A. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案是："
    )
    assert prompt == expected
    assert [q.id for q in data.questions[:2]] == ["0", "1"] and data.questions[0].answer == "B"


def write_mmlu(root, subjects=("abstract_algebra", "anatomy"), n_test=4):
    """A small MMLU folder in the official layout: data/{dev,val,test}/<subject>_<split>.csv, no header."""
    rows = {}
    for subject in subjects:
        for split, n in (("dev", 5), ("val", 2), ("test", n_test)):
            folder = root / "data" / split
            folder.mkdir(parents=True, exist_ok=True)
            body = [[f"{subject} {split} question {i}, with a comma?", f"a{i}", f"b{i}", f"c{i}", f"d{i}",
                     "ABCD"[i % 4]] for i in range(n)]
            with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(body)
            rows[(subject, split)] = body
    return rows


def test_mmlu_official_layout_and_prompt(tmp_path):
    write_mmlu(tmp_path)
    task = ev.TASKS["mmlu"]
    data = ev.load_benchmark(task, tmp_path, "test")
    assert [d.subject for d in data] == ["abstract_algebra", "anatomy"]
    assert [d.category for d in data] == ["STEM", "Other"]
    first = data[0]
    assert len(first.questions) == 4 and first.questions[1].answer == "B"
    assert first.questions[0].question == "abstract_algebra test question 0, with a comma?"
    prompt = ev.build_prompt(task, first.name, first.shots[:1], first.questions[0])
    assert prompt == (
        "The following are multiple choice questions (with answers) about  abstract algebra.\n\n"
        "abstract_algebra dev question 0, with a comma?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer: A\n\n"
        "abstract_algebra test question 0, with a comma?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"
    )


# ----------------------------------------------------------------------------- answer letters


def test_answer_letter_ids_follow_the_answer_prefix_with_real_tokenizers(shared_reference):
    import sentencepiece as spm

    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    for folder in ("baichuan2-13b-chat", "baichuan-7b"):
        path = shared_reference / folder / "tokenizer.model"
        tok = BaichuanTokenizer(vocab_file=str(need_shared(path)))
        sp = spm.SentencePieceProcessor(model_file=str(path))
        bare = [sp.piece_to_id(letter) for letter in "ABCD"]  # "答案：A" ends in the piece "A"
        spaced = [sp.piece_to_id("▁" + letter) for letter in "ABCD"]  # "Answer: A" ends in "▁A"
        assert ev.answer_token_ids(ev.TASKS["ceval"], tok) == bare
        assert ev.answer_token_ids(ev.TASKS["cmmlu"], tok) == bare
        assert ev.answer_token_ids(ev.TASKS["mmlu"], tok) == spaced
        assert len(set(bare + spaced)) == 8
    # Why the letter is not encoded alone: Baichuan-7B's tokenizer prefixes "▁" (FACTS.md), giving the MMLU id.
    assert tok.encode("A", add_special_tokens=False) == [spaced[0]]


# ----------------------------------------------------------------------------- test-double models


class PreferenceModel(torch.nn.Module):
    """A causal LM double: at the last position it puts the highest logit on `choose(text)`'s token.

    `choose` receives the decoded prompt, so a double can answer from the question text itself.
    """

    def __init__(self, tokenizer, choose, vocab_size=125696, context=4096):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the double a device
        self.tokenizer, self.choose, self.vocab_size = tokenizer, choose, vocab_size
        self.config = SimpleNamespace(max_position_embeddings=context)
        self.calls = []

    def forward(self, input_ids, attention_mask, use_cache=False, logits_to_keep=0):
        self.calls.append(tuple(input_ids.shape))
        logits = torch.zeros(input_ids.shape[0], 1, self.vocab_size)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row][attention_mask[row].bool()].tolist()
            logits[row, 0, self.choose(self.tokenizer.decode(ids))] = 10.0
        return SimpleNamespace(logits=logits)


def run_double(task, data, tokenizer, choose, **kw):
    model = PreferenceModel(tokenizer, choose)  # sees whole prompts: no shared-prefix cache
    return ev.evaluate(model, tokenizer, task, data, split=kw.pop("split", "val"), progress=False,
                       share_prefix=False, **kw), model


def gold_by_question(zip_path, members, column="answer", question="question"):
    gold = {}
    for member in members:
        with zipfile.ZipFile(zip_path) as zf:
            for row in csv.DictReader(io.StringIO(zf.read(member).decode("utf-8"))):
                gold[row[question]] = row[column]
    return gold


def asked_question(prompt: str) -> str:
    """The question text of the last example in a prompt (the one being asked)."""
    last = prompt.rsplit("\n\n", 1)[-1]
    return last.split("\nA. ")[0].removeprefix("题目：")


@pytest.mark.parametrize("task_name, parts, split, subjects, members, cols", [
    ("ceval", CEVAL_ZIP, "val", ["basic_medicine", "law"],
     ["val/basic_medicine_val.csv", "val/law_val.csv"], ("answer", "question")),
    ("cmmlu", CMMLU_ZIP, "test", ["agronomy", "arts"],
     ["test/agronomy.csv", "test/arts.csv"], ("Answer", "Question")),
])
def test_forced_letter_gives_the_expected_accuracy(shared_data, baichuan2_tokenizer, task_name, parts, split,
                                                   subjects, members, cols):
    task = ev.TASKS[task_name]
    zip_path = data_file(shared_data, parts)
    data = ev.load_benchmark(task, zip_path, split, subjects, max_questions=12)
    letter_ids = ev.answer_token_ids(task, baichuan2_tokenizer)
    gold = gold_by_question(zip_path, members, *cols)

    oracle, _ = run_double(task, data, baichuan2_tokenizer,
                           lambda text: letter_ids["ABCD".index(gold[asked_question(text)])], split=split)
    assert [r.correct for r in oracle] == [12, 12]
    assert ev.summarize(task, oracle)["overall"]["accuracy"] == 100.0

    wrong, _ = run_double(task, data, baichuan2_tokenizer,
                          lambda text: letter_ids[("ABCD".index(gold[asked_question(text)]) + 1) % 4], split=split)
    assert [r.correct for r in wrong] == [0, 0]
    assert ev.summarize(task, wrong)["overall"]["accuracy"] == 0.0

    always_c, _ = run_double(task, data, baichuan2_tokenizer, lambda text: letter_ids[2], split=split)
    for result, member in zip(always_c, members):
        key = answer_key(zip_path, member, cols[0])[:12]
        assert all(p["prediction"] == "C" for p in result.predictions)
        assert result.correct == key.count("C")
        assert result.accuracy == pytest.approx(100 * key.count("C") / 12)


def test_mmlu_forced_letter_with_synthetic_folder(tmp_path, baichuan2_tokenizer):
    rows = write_mmlu(tmp_path, n_test=8)
    task = ev.TASKS["mmlu"]
    data = ev.load_benchmark(task, tmp_path, "test")
    letter_ids = ev.answer_token_ids(task, baichuan2_tokenizer)
    gold = {r[0]: r[5] for (_, split), body in rows.items() if split == "test" for r in body}
    results, model = run_double(task, data, baichuan2_tokenizer,
                                lambda text: letter_ids["ABCD".index(gold[asked_question(text)])], split="test",
                                batch_size=3)
    assert [r.correct for r in results] == [8, 8]
    assert max(shape[0] for shape in model.calls) == 3  # batched: 3 prompts per forward pass at most


def test_category_table_sums(shared_data, baichuan2_tokenizer):
    task = ev.TASKS["ceval"]
    subjects = ["basic_medicine", "law", "logic", "college_physics", "marxism"]
    data = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", subjects, max_questions=6)
    letter_a = ev.answer_token_ids(task, baichuan2_tokenizer)[0]
    results, _ = run_double(task, data, baichuan2_tokenizer, lambda text: letter_a)
    summary = ev.summarize(task, results)
    cats = summary["categories"]
    assert set(cats) == {"Other", "Humanities", "STEM", "Social Sciences"}
    assert sum(c["subjects"] for c in cats.values()) == summary["overall"]["subjects"] == 5
    assert sum(c["questions"] for c in cats.values()) == summary["overall"]["questions"] == 30
    assert sum(c["correct"] for c in cats.values()) == summary["overall"]["correct"]
    assert cats["Humanities"]["subjects"] == 2  # law and logic
    text = ev.format_table(task, summary)
    assert "Average" in text and "basic_medicine" in text


def fake_result(subject, category, questions, correct):
    return ev.SubjectResult(subject, subject, category, questions, correct, 0, 0, 0, [])


def test_averages_are_hand_computed():
    results = [fake_result("a", "STEM", 4, 3), fake_result("b", "STEM", 2, 1), fake_result("c", "Other", 1, 0)]
    ceval = ev.summarize(ev.TASKS["ceval"], results)
    # STEM: subjects 75% and 50% -> mean 62.5; questions 4/6
    assert ceval["categories"]["STEM"]["subject_mean"] == pytest.approx(62.5)
    assert ceval["categories"]["STEM"]["question_accuracy"] == pytest.approx(400 / 6)
    assert ceval["categories"]["STEM"]["accuracy"] == pytest.approx(62.5)  # C-Eval: mean over subjects
    assert ceval["overall"]["accuracy"] == pytest.approx((75 + 50 + 0) / 3)
    mmlu = ev.summarize(ev.TASKS["mmlu"], results)
    assert mmlu["overall"]["accuracy"] == pytest.approx(400 / 7)  # MMLU: over all questions
    assert set(ceval["categories"]) == {"STEM", "Other"}


# ----------------------------------------------------------------------------- splits, lengths, errors


def test_dev_split_never_uses_a_question_as_its_own_example(shared_data, baichuan2_tokenizer):
    task = ev.TASKS["ceval"]
    data = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "dev", ["basic_medicine"])
    seen = []

    def record(text):
        seen.append(text)
        return 0

    run_double(task, data, baichuan2_tokenizer, record, split="dev")
    assert len(seen) == 5
    for text in seen:
        asked = asked_question(text)
        examples = text.split("\n\n")[1:-1]
        assert len(examples) == 4 and not any(e.startswith(asked + "\n") for e in examples)


def test_ceval_test_split_has_no_answers_and_gives_a_submission(shared_data, baichuan2_tokenizer):
    task = ev.TASKS["ceval"]
    data = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "test", ["law"], max_questions=3)
    letter_c = ev.answer_token_ids(task, baichuan2_tokenizer)[2]
    results, _ = run_double(task, data, baichuan2_tokenizer, lambda text: letter_c, split="test")
    summary = ev.summarize(task, results)
    assert summary["overall"]["accuracy"] is None and results[0].correct is None
    assert ev.submission(results) == {"law": {"0": "C", "1": "C", "2": "C"}}


def test_long_prompts_drop_examples_from_the_end_then_lose_their_head(shared_data, baichuan2_tokenizer):
    task = ev.TASKS["ceval"]
    (data,) = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"])
    q = data.questions[0]
    full = baichuan2_tokenizer.encode(ev.build_prompt(task, data.name, data.shots, q))
    three = baichuan2_tokenizer.encode(ev.build_prompt(task, data.name, data.shots[:3], q))
    ids, dropped, cut = ev.encode_prompt(task, baichuan2_tokenizer, data.name, data.shots, q, len(three))
    assert (ids, dropped, cut) == (three, 2, False)
    ids, dropped, cut = ev.encode_prompt(task, baichuan2_tokenizer, data.name, data.shots, q, len(full))
    assert (ids, dropped, cut) == (full, 0, False)
    zero = baichuan2_tokenizer.encode(ev.build_prompt(task, data.name, [], q))
    ids, dropped, cut = ev.encode_prompt(task, baichuan2_tokenizer, data.name, data.shots, q, 10)
    assert (dropped, cut) == (5, True) and ids == zero[-10:]


def test_dropped_examples_are_counted_per_subject(shared_data, baichuan2_tokenizer):
    task = ev.TASKS["ceval"]
    data = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"], max_questions=4)
    lengths = [len(baichuan2_tokenizer.encode(ev.build_prompt(task, data[0].name, data[0].shots[:4], q)))
               for q in data[0].questions]
    results, _ = run_double(task, data, baichuan2_tokenizer, lambda text: 0, max_length=max(lengths))
    # every prompt fits with 4 examples (one dropped); those that also fit 5 keep them
    fits_five = sum(len(baichuan2_tokenizer.encode(ev.build_prompt(task, data[0].name, data[0].shots, q)))
                    <= max(lengths) for q in data[0].questions)
    assert results[0].shots_dropped == results[0].prompts_shortened == 4 - fits_five
    assert ev.summarize(task, results)["shots_dropped"] == 4 - fits_five


def test_data_errors_name_file_record_and_field(tmp_path, shared_data):
    write_mmlu(tmp_path)
    bad = tmp_path / "data" / "test" / "anatomy_test.csv"
    bad.write_text('q0,a,b,c,d,A\n"q1",a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: record 2: field 'answer' is 'E'"):
        ev.load_benchmark(ev.TASKS["mmlu"], tmp_path, "test")
    bad.write_text("q0,a,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: record 1: 4 fields, expected 6"):
        ev.load_benchmark(ev.TASKS["mmlu"], tmp_path, "test")
    bad.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"anatomy_test\.csv: no questions in it"):
        ev.load_benchmark(ev.TASKS["mmlu"], tmp_path, "test")
    bad.write_text("q0,a,b,c,d,A\n", encoding="utf-8")
    for n in (0, -1):  # [:0] would leave no questions, [:-1] would silently drop the last one
        with pytest.raises(BaichuanTuneError, match=f"max_questions must be at least 1, got {n}"):
            ev.load_benchmark(ev.TASKS["mmlu"], tmp_path, "test", max_questions=n)
    with pytest.raises(BaichuanTuneError, match="CMMLU has no 'val' split"):
        ev.load_benchmark(ev.TASKS["cmmlu"], data_file(shared_data, CMMLU_ZIP), "val")
    with pytest.raises(BaichuanTuneError, match="did you mean 'basic_medicine'"):
        ev.load_benchmark(ev.TASKS["ceval"], data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicin"])
    with pytest.raises(DataError, match="not found"):
        ev.load_benchmark(ev.TASKS["ceval"], tmp_path / "missing.zip", "val")
    with pytest.raises(DataError, match="no 'val' split of C-Eval here"):
        ev.load_benchmark(ev.TASKS["ceval"], data_file(shared_data, CMMLU_ZIP), "val")


# ----------------------------------------------------------------------------- real tiny models


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_batched_left_padded_scores_equal_one_by_one(preset):
    model = tiny_model(preset)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 12, 17)]
    letters = [10, 11, 12, 13]
    batched = ev.score_prompts(model, prompts, letters, pad_id=0, batch_size=4)
    single = ev.score_prompts(model, prompts, letters, pad_id=0, batch_size=1)
    assert torch.allclose(batched, single, atol=1e-5)
    # and one-by-one equals reading the model's own full logits at the last position
    with torch.no_grad():
        direct = model(torch.tensor([prompts[3]])).logits[0, -1, letters].softmax(-1)
    assert torch.allclose(single[3], direct, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan-13b"])
def test_shared_prefix_cache_gives_the_same_scores(preset):
    model = tiny_model(preset)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(3, 512, (40,), generator=gen).tolist()
    # rests of equal lengths too: a batch with no padding at all must still be causal inside the rest
    prompts = [prefix + torch.randint(3, 512, (n,), generator=gen).tolist() for n in (7, 7, 7, 3, 12, 1, 7)]
    letters = [10, 11, 12, 13]
    assert ev.common_prefix_length(prompts) >= 40
    plain = ev.score_prompts(model, prompts, letters, pad_id=0, batch_size=4)
    for batch_size in (1, 3, 8):
        shared = ev.score_prompts(model, prompts, letters, pad_id=0, batch_size=batch_size, share_prefix=True)
        assert torch.allclose(shared, plain, atol=1e-5)


def test_shared_prefix_on_real_ceval_prompts(shared_data, baichuan2_tokenizer):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696, max_position_embeddings=4096)
    task = ev.TASKS["ceval"]
    data = ev.load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"], max_questions=4)
    kw = dict(split="val", batch_size=3, progress=False)
    shared = ev.evaluate(model, baichuan2_tokenizer, task, data, share_prefix=True, **kw)
    plain = ev.evaluate(model, baichuan2_tokenizer, task, data, share_prefix=False, **kw)
    for a, b in zip(shared, plain):
        assert torch.allclose(torch.tensor([p["probs"] for p in a.predictions]),
                              torch.tensor([p["probs"] for p in b.predictions]), atol=1e-4)
    prompts = [baichuan2_tokenizer.encode(ev.build_prompt(task, data[0].name, data[0].shots, q))
               for q in data[0].questions]
    examples = ev.build_prompt(task, data[0].name, data[0].shots, data[0].questions[0]).rsplit("\n\n", 1)[0]
    assert ev.common_prefix_length(prompts) >= len(baichuan2_tokenizer.encode(examples))  # all five are shared


def test_token_budget_splits_batches():
    lengths = [10, 10, 10, 10]
    assert list(ev._batches([0, 1, 2, 3], lengths, batch_size=8, max_batch_tokens=25)) == [[0, 1], [2, 3]]
    assert list(ev._batches([0, 1, 2, 3], lengths, batch_size=3, max_batch_tokens=1000)) == [[0, 1, 2], [3]]


class UniformModel(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(max_position_embeddings=64)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab_size))


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(baichuan2_tokenizer):
    texts = ["一段中文文本，用来计算困惑度。", "Some English text as a second document, a little longer than the first."]
    result = ev.perplexity(UniformModel(125696), baichuan2_tokenizer, texts, max_length=8, batch_size=3)
    assert result["perplexity"] == pytest.approx(125696, rel=1e-4)
    n_tokens = [len(baichuan2_tokenizer.encode(t)) for t in texts]
    windows = [min(8, n - i) for n in n_tokens for i in range(0, n, 8)]
    assert result["tokens"] == sum(w - 1 for w in windows if w >= 2)


def test_perplexity_equals_the_models_own_loss():
    model = tiny_model("tiny-baichuan-13b")
    tokenizer = SimpleNamespace(encode=lambda text, **kw: [int(x) for x in text.split()])
    docs = [list(range(5, 45)), list(range(100, 117))]
    result = ev.perplexity(model, tokenizer, [" ".join(map(str, d)) for d in docs], max_length=64, batch_size=2)
    with torch.no_grad():
        nll = [model(torch.tensor([d]), labels=torch.tensor([d])).loss.item() * (len(d) - 1) for d in docs]
    assert result["nll_per_token"] == pytest.approx(sum(nll) / (39 + 16), rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / 55), rel=1e-5)


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nwith two lines\n", encoding="utf-8")
    assert ev.read_texts(tmp_path / "a.txt") == ["one document\nwith two lines\n"]
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\n\n{"content": "y"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.jsonl: record 2: no field 'text'"):
        ev.read_texts(tmp_path / "b.jsonl")
    (tmp_path / "c.jsonl").write_text('{"content": "y"}\n{"content": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.jsonl: record 2: field 'content' is int, expected text"):
        ev.read_texts(tmp_path / "c.jsonl", text_field="content")
    (tmp_path / "d.json").write_text('[{"text": "p"}, {"text": "q"}]', encoding="utf-8")
    assert ev.read_texts(tmp_path / "d.json") == ["p", "q"]
    (tmp_path / "e.txt").write_bytes("中文".encode("gbk"))
    with pytest.raises(DataError, match=r"e\.txt: not UTF-8 text"):
        ev.read_texts(tmp_path / "e.txt")


def test_speed_benchmark_runs_on_cpu(shared_data, tmp_path, capsys):
    """benchmarks/bench_eval.py end to end at the tiny shape (on a GPU it runs the Baichuan2-7B shape)."""
    import importlib.util
    from pathlib import Path

    from conftest import REFERENCE

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_eval.py"
    spec = importlib.util.spec_from_file_location("bench_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main([
        "--data", str(data_file(shared_data, CEVAL_ZIP)),
        "--tokenizer", str(need_shared(REFERENCE / "baichuan2-13b-chat" / "tokenizer.model")),
        "--preset", "tiny-baichuan2-7b", "--device", "cpu", "--modes", "fp32", "--prefix", "shared,full",
        "--max-subjects", "2", "--max-questions", "2", "--json", str(out),
    ]) == 0
    rows = json.loads(out.read_text())
    assert [(r["mode"], r["prefix"], r["questions"]) for r in rows] == [("fp32", "shared", 4), ("fp32", "full", 4)]
    assert all(r["seconds"] > 0 and r["questions_per_s"] > 0 and r["device"] == "cpu" for r in rows)
    assert "predicted differently" not in capsys.readouterr().out  # same answers with and without the cache


def test_tar_archive_like_hendrycks_data_tar(tmp_path):
    import tarfile

    write_mmlu(tmp_path / "src")
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(tmp_path / "src" / "data", arcname="data")
    from_tar = ev.load_benchmark(ev.TASKS["mmlu"], archive, "val")
    from_folder = ev.load_benchmark(ev.TASKS["mmlu"], tmp_path / "src", "val")
    assert from_tar == from_folder and [len(d.questions) for d in from_tar] == [2, 2]
