"""`baichuan_tune.eval.scoring` on the real C-Eval and CMMLU archives, test-double models whose answers are
known (answer keys read with Python's csv module), and tiny random-weight models (batched and shared-prefix
scores against one-by-one scoring).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import benchmark_script, need_shared, tiny_model

from baichuan_tune.eval.prompts import answer_token_ids, build_prompt
from baichuan_tune.eval.reading import load_benchmark
from baichuan_tune.eval.scoring import (
    _batches,
    common_prefix_length,
    evaluate,
    score_prompts,
)
from baichuan_tune.eval.summary import summarize
from baichuan_tune.eval.tasks import TASKS

from .helpers import (
    CEVAL_ZIP,
    CMMLU_ZIP,
    answer_key,
    asked_question,
    data_file,
    gold_by_question,
    run_double,
    write_mmlu,
)


@pytest.mark.parametrize("task_name, parts, split, subjects, members, cols", [
    ("ceval", CEVAL_ZIP, "val", ["basic_medicine", "law"],
     ["val/basic_medicine_val.csv", "val/law_val.csv"], ("answer", "question")),
    ("cmmlu", CMMLU_ZIP, "test", ["agronomy", "arts"],
     ["test/agronomy.csv", "test/arts.csv"], ("Answer", "Question")),
])
def test_forced_letter_gives_the_expected_accuracy(shared_data, baichuan2_tokenizer, task_name, parts, split,
                                                   subjects, members, cols):
    task = TASKS[task_name]
    zip_path = data_file(shared_data, parts)
    data = load_benchmark(task, zip_path, split, subjects, max_questions=12)
    letter_ids = answer_token_ids(task, baichuan2_tokenizer)
    gold = gold_by_question(zip_path, members, *cols)

    oracle, _ = run_double(task, data, baichuan2_tokenizer,
                           lambda text: letter_ids["ABCD".index(gold[asked_question(text)])], split=split)
    assert [r.correct for r in oracle] == [12, 12]
    assert summarize(task, oracle)["overall"]["accuracy"] == 100.0

    wrong, _ = run_double(task, data, baichuan2_tokenizer,
                          lambda text: letter_ids[("ABCD".index(gold[asked_question(text)]) + 1) % 4], split=split)
    assert [r.correct for r in wrong] == [0, 0]
    assert summarize(task, wrong)["overall"]["accuracy"] == 0.0

    always_c, _ = run_double(task, data, baichuan2_tokenizer, lambda text: letter_ids[2], split=split)
    for result, member in zip(always_c, members):
        key = answer_key(zip_path, member, cols[0])[:12]
        assert all(p["prediction"] == "C" for p in result.predictions)
        assert result.correct == key.count("C")
        assert result.accuracy == pytest.approx(100 * key.count("C") / 12)


def test_mmlu_forced_letter_with_synthetic_folder(tmp_path, baichuan2_tokenizer):
    rows = write_mmlu(tmp_path, n_test=8)
    task = TASKS["mmlu"]
    data = load_benchmark(task, tmp_path, "test")
    letter_ids = answer_token_ids(task, baichuan2_tokenizer)
    gold = {r[0]: r[5] for (_, split), body in rows.items() if split == "test" for r in body}
    results, model = run_double(task, data, baichuan2_tokenizer,
                                lambda text: letter_ids["ABCD".index(gold[asked_question(text)])], split="test",
                                batch_size=3)
    assert [r.correct for r in results] == [8, 8]
    assert max(shape[0] for shape in model.calls) == 3  # batched: 3 prompts per forward pass at most


# ----------------------------------------------------------------------------- splits, lengths, errors


def test_dev_split_never_uses_a_question_as_its_own_example(shared_data, baichuan2_tokenizer):
    task = TASKS["ceval"]
    data = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "dev", ["basic_medicine"])
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


def test_dropped_examples_are_counted_per_subject(shared_data, baichuan2_tokenizer):
    task = TASKS["ceval"]
    data = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"], max_questions=4)
    lengths = [len(baichuan2_tokenizer.encode(build_prompt(task, data[0].name, data[0].shots[:4], q)))
               for q in data[0].questions]
    results, _ = run_double(task, data, baichuan2_tokenizer, lambda text: 0, max_length=max(lengths))
    # every prompt fits with 4 examples (one dropped); those that also fit 5 keep them
    fits_five = sum(len(baichuan2_tokenizer.encode(build_prompt(task, data[0].name, data[0].shots, q)))
                    <= max(lengths) for q in data[0].questions)
    assert results[0].shots_dropped == results[0].prompts_shortened == 4 - fits_five
    assert summarize(task, results)["shots_dropped"] == 4 - fits_five


# ----------------------------------------------------------------------------- real tiny models


@pytest.mark.parametrize("preset", ["tiny-baichuan2-7b", "tiny-baichuan2-13b"])
def test_batched_left_padded_scores_equal_one_by_one(preset):
    model = tiny_model(preset)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 12, 17)]
    letters = [10, 11, 12, 13]
    batched = score_prompts(model, prompts, letters, pad_id=0, batch_size=4)
    single = score_prompts(model, prompts, letters, pad_id=0, batch_size=1)
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
    assert common_prefix_length(prompts) >= 40
    plain = score_prompts(model, prompts, letters, pad_id=0, batch_size=4)
    for batch_size in (1, 3, 8):
        shared = score_prompts(model, prompts, letters, pad_id=0, batch_size=batch_size, share_prefix=True)
        assert torch.allclose(shared, plain, atol=1e-5)


def test_shared_prefix_on_real_ceval_prompts(shared_data, baichuan2_tokenizer):
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696, max_position_embeddings=4096)
    task = TASKS["ceval"]
    data = load_benchmark(task, data_file(shared_data, CEVAL_ZIP), "val", ["basic_medicine"], max_questions=4)
    kw = dict(split="val", batch_size=3, progress=False)
    shared = evaluate(model, baichuan2_tokenizer, task, data, share_prefix=True, **kw)
    plain = evaluate(model, baichuan2_tokenizer, task, data, share_prefix=False, **kw)
    for a, b in zip(shared, plain):
        assert torch.allclose(torch.tensor([p["probs"] for p in a.predictions]),
                              torch.tensor([p["probs"] for p in b.predictions]), atol=1e-4)
    prompts = [baichuan2_tokenizer.encode(build_prompt(task, data[0].name, data[0].shots, q))
               for q in data[0].questions]
    examples = build_prompt(task, data[0].name, data[0].shots, data[0].questions[0]).rsplit("\n\n", 1)[0]
    assert common_prefix_length(prompts) >= len(baichuan2_tokenizer.encode(examples))  # all five are shared


def test_token_budget_splits_batches():
    lengths = [10, 10, 10, 10]
    assert list(_batches([0, 1, 2, 3], lengths, batch_size=8, max_batch_tokens=25)) == [[0, 1], [2, 3]]
    assert list(_batches([0, 1, 2, 3], lengths, batch_size=3, max_batch_tokens=1000)) == [[0, 1, 2], [3]]


def test_speed_benchmark_runs_on_cpu(shared_data, tmp_path, capsys):
    """benchmarks/bench_eval.py end to end at the tiny shape (on a GPU it runs the Baichuan2-7B shape)."""
    from conftest import REFERENCE

    bench = benchmark_script("bench_eval")
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
