"""`baichuan_tune.eval.prompts`: prompts in each benchmark's own format, written out by hand from the CSV rows,
and letter ids from the SentencePiece files themselves.
"""

from __future__ import annotations

from conftest import need_shared

from baichuan_tune.eval.prompts import answer_token_ids, build_prompt, encode_prompt
from baichuan_tune.eval.reading import load_benchmark
from baichuan_tune.eval.tasks import TASKS

from .helpers import CEVAL_ZIP, CMMLU_ZIP, data_file

# ----------------------------------------------------------------------------- prompts


def test_ceval_prompt_of_a_known_question_is_the_official_five_shot_format(shared_data):
    task = TASKS["ceval"]
    (data,) = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"])
    prompt = build_prompt(task, data.name, data.shots[:5], data.questions[0])
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
    task = TASKS["cmmlu"]
    (data,) = load_benchmark(task, data_file(shared_data, CMMLU_ZIP), "test", ["agronomy"])
    prompt = build_prompt(task, data.name, data.shots[:2], data.questions[0])
    expected = (
        "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：肉牛屠宰后，胴体的哪个部位肉质较好\nA. 胸\nB. 腹\nC. 大腿\nD. 小腿\n答案是：C\n\n"
        "题目：下列鸭品种中，产蛋量最高的品种是\nA. 高邮鸭\nB. 北京鸭\nC. 樱桃谷鸭\nD. 绍鸭\n答案是：D\n\n"
        "题目：在农业生产中被当作极其重要的劳动对象发挥作用，最主要的不可替代的基本生产资料是\n"
        "A. 农业生产工具\nB. 土地\nC. 劳动力\nD. 资金\n答案是："
    )
    assert prompt == expected
    assert [q.id for q in data.questions[:2]] == ["0", "1"] and data.questions[0].answer == "B"


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
        assert answer_token_ids(TASKS["ceval"], tok) == bare
        assert answer_token_ids(TASKS["cmmlu"], tok) == bare
        assert answer_token_ids(TASKS["mmlu"], tok) == spaced
        assert len(set(bare + spaced)) == 8
    # Why the letter is not encoded alone: Baichuan-7B's tokenizer prefixes "▁" (FACTS.md), giving the MMLU id.
    assert tok.encode("A", add_special_tokens=False) == [spaced[0]]


def test_long_prompts_drop_examples_from_the_end_then_lose_their_head(shared_data, baichuan2_tokenizer):
    task = TASKS["ceval"]
    (data,) = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"])
    q = data.questions[0]
    full = baichuan2_tokenizer.encode(build_prompt(task, data.name, data.shots, q))
    three = baichuan2_tokenizer.encode(build_prompt(task, data.name, data.shots[:3], q))
    ids, dropped, cut = encode_prompt(task, baichuan2_tokenizer, data.name, data.shots, q, len(three))
    assert (ids, dropped, cut) == (three, 2, False)
    ids, dropped, cut = encode_prompt(task, baichuan2_tokenizer, data.name, data.shots, q, len(full))
    assert (ids, dropped, cut) == (full, 0, False)
    zero = baichuan2_tokenizer.encode(build_prompt(task, data.name, [], q))
    ids, dropped, cut = encode_prompt(task, baichuan2_tokenizer, data.name, data.shots, q, 10)
    assert (dropped, cut) == (5, True) and ids == zero[-10:]
