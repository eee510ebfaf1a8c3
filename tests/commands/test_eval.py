"""`baichuan-tune eval` end to end: a tiny random-weight checkpoint with the real Baichuan2 tokenizer, the real
C-Eval and CMMLU archives, results.json written, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest

from baichuan_tune import cli
from baichuan_tune.commands import eval as eval_command
from conftest import REFERENCE, need_shared, tiny_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Baichuan2-7B-shaped model with the published Baichuan2 vocabulary and tokenizer."""
    from baichuan_tune.models.checkpoint import save_pretrained_atomic
    from baichuan_tune.models.tokenization_baichuan import BaichuanTokenizer

    vocab = need_shared(REFERENCE / "baichuan2-13b-chat" / "tokenizer.model")
    tokenizer = BaichuanTokenizer(vocab_file=str(vocab))
    model = tiny_model("tiny-baichuan2-7b", vocab_size=125696, max_position_embeddings=1024)
    return save_pretrained_atomic(model, tokenizer, tmp_path_factory.mktemp("eval") / "tiny-baichuan2")


def test_ceval_val_end_to_end(checkpoint, shared_data, tmp_path, capsys):
    data = need_shared(shared_data / "eval" / "ceval" / "ceval.zip")
    out = tmp_path / "out"
    code = eval_command.main([
        "--model", str(checkpoint), "--task", "ceval", "--split", "val", "--data", str(data),
        "--subjects", "basic_medicine", "law", "college_physics", "--max-questions", "4", "--batch-size", "3",
        "--max-length", "300", "--output_dir", str(out), "--progress", "false",
    ])
    assert code == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["subjects"]) == ["basic_medicine", "college_physics", "law"]
    assert results["overall"]["questions"] == 12 and results["n_shot"] == 5
    cats = results["categories"]
    assert set(cats) == {"Other", "STEM", "Humanities"}
    assert sum(c["correct"] for c in cats.values()) == results["overall"]["correct"]
    subject_accs = [s["accuracy"] for s in results["subjects"].values()]
    assert results["overall"]["accuracy"] == pytest.approx(sum(subject_accs) / 3)  # C-Eval: mean over subjects
    # a 300-token context: the long five-shot prompts of law and college physics drop examples, and say so
    assert results["shots_dropped"] == sum(s["shots_dropped"] for s in results["subjects"].values()) > 0
    assert results["subjects"]["law"]["prompts_shortened"] > 0
    predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    assert [len(v) for v in predictions.values()] == [4, 4, 4]
    assert all(p["prediction"] in "ABCD" and abs(sum(p["probs"]) - 1) < 1e-4 for p in predictions["law"])
    printed = capsys.readouterr().out
    assert "Average" in printed and "basic_medicine" in printed and "questions/s" in printed
    assert f"note: {results['shots_dropped']} few-shot examples dropped" in printed


def test_cmmlu_test_through_the_cli(checkpoint, shared_data, tmp_path, capsys):
    data = need_shared(shared_data / "eval" / "cmmlu" / "cmmlu.zip")
    code = cli.main([
        "eval", "--model", str(checkpoint), "--task", "cmmlu", "--split", "test", "--data", str(data),
        "--subjects", "agronomy,arts", "--max-questions", "3", "--n-shot", "2", "--output_dir", str(tmp_path),
        "--show-subjects", "false", "--progress", "false",
    ])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["overall"]["questions"] == 6 and results["n_shot"] == 2
    assert "agronomy" not in capsys.readouterr().out  # category table only


def test_ceval_test_split_writes_a_submission(checkpoint, shared_data, tmp_path):
    data = need_shared(shared_data / "eval" / "ceval" / "ceval.zip")
    code = eval_command.main([
        "--model", str(checkpoint), "--task", "ceval", "--split", "test", "--data", str(data), "--subjects", "law",
        "--max-questions", "2", "--n-shot", "1", "--output_dir", str(tmp_path), "--progress", "false",
    ])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert results["overall"]["accuracy"] is None
    submission = json.loads((tmp_path / "submission.json").read_text(encoding="utf-8"))
    assert list(submission) == ["law"] and sorted(submission["law"]) == ["0", "1"]


def test_perplexity_end_to_end(checkpoint, shared_data, tmp_path):
    source = need_shared(shared_data / "c4_demo.jsonl")
    small = tmp_path / "c4_small.jsonl"
    small.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    code = eval_command.main(["--model", str(checkpoint), "--task", "ppl", "--data", str(small),
                              "--max-length", "64", "--output_dir", str(tmp_path / "ppl")])
    assert code == 0
    result = json.loads((tmp_path / "ppl" / "results.json").read_text(encoding="utf-8"))
    assert result["documents"] == 3 and result["tokens"] > 100
    # random weights: near-uniform over 125,696 pieces, so the perplexity is of that order
    assert 1e4 < result["perplexity"] < 1e6


def test_bad_input_is_one_line_error(checkpoint, shared_data, tmp_path, capsys):
    cmmlu = need_shared(shared_data / "eval" / "cmmlu" / "cmmlu.zip")
    model = ["--model", str(checkpoint)]
    assert cli.main(["eval", *model, "--task", "cmmlu", "--split", "val", "--data", str(cmmlu)]) == 2
    assert "error: CMMLU has no 'val' split" in capsys.readouterr().err
    assert cli.main(["eval", "--model", str(checkpoint), "--task", "ceval"]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "ceval", "--data", str(cmmlu), "--quantization_bit", "3"]) == 2
    assert "--quantization_bit must be 4 or 8" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "bleu", "--data", str(cmmlu)]) == 2
    assert "must be one of" in capsys.readouterr().err
    assert cli.main(["eval", "--task", "cmmlu", "--data", str(cmmlu), "--max-questions", "0"]) == 2
    assert "--max-questions must be at least 1" in capsys.readouterr().err
    missing = tmp_path / "none.jsonl"
    assert cli.main(["eval", "--model", str(checkpoint), "--task", "ppl", "--data", str(missing)]) == 2
    assert f"error: {missing}: not found" in capsys.readouterr().err


def test_subjects_accept_spaces_or_commas():
    assert eval_command._join_list_values(["--subjects", "a", "b", "--n-shot", "1"]) == \
        ["--subjects", "a,b", "--n-shot", "1"]
    assert eval_command._join_list_values(["--subjects", "a,b"]) == ["--subjects", "a,b"]


def test_adapter_changes_scores_and_prefix_cache_sees_it(checkpoint, shared_data, tmp_path):
    """A LoRA adapter (non-zero, so it changes the model) applies in both scoring paths alike."""
    import torch
    from peft import LoraConfig, get_peft_model

    from baichuan_tune.models.checkpoint import load_model

    base = load_model(checkpoint, dtype="fp32")
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=64, target_modules=["W_pack", "down_proj"],
                                           init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    data = need_shared(shared_data / "eval" / "ceval" / "ceval.zip")

    def probs(*extra):
        out = tmp_path / "-".join(extra or ("base",))
        argv = ["--model", str(checkpoint), "--task", "ceval", "--split", "val", "--data", str(data),
                "--subjects", "logic", "--max-questions", "3", "--output_dir", str(out), "--progress", "false", *extra]
        assert eval_command.main(argv) == 0
        predictions = json.loads((out / "predictions.json").read_text(encoding="utf-8"))["logic"]
        return torch.tensor([p["probs"] for p in predictions])

    plain = probs()
    adapted = probs("--adapter", str(tmp_path / "adapter"))
    adapted_full = probs("--adapter", str(tmp_path / "adapter"), "--share-prefix", "false")
    assert not torch.allclose(adapted, plain, atol=1e-3)
    assert torch.allclose(adapted, adapted_full, atol=1e-4)


def test_quantize_option_scores_with_int8_weights(checkpoint, shared_data, tmp_path):
    """--quantization_bit 8 loads LLM.int8() layers: the perplexity moves by the format's small error, not more."""
    source = need_shared(shared_data / "c4_demo.jsonl")
    small = tmp_path / "c4_small.jsonl"
    small.write_text("".join(source.read_text(encoding="utf-8").splitlines(keepends=True)[:2]), encoding="utf-8")
    results = {}
    for name, extra in (("full", []), ("int8", ["--quantization_bit", "8"])):
        assert eval_command.main(["--model", str(checkpoint), "--task", "ppl", "--data", str(small), "--max-length",
                                  "64", "--dtype", "fp32", "--output_dir", str(tmp_path / name), *extra]) == 0
        results[name] = json.loads((tmp_path / name / "results.json").read_text(encoding="utf-8"))
    full, int8 = results["full"]["perplexity"], results["int8"]["perplexity"]
    assert full != int8 and abs(int8 - full) / full < 0.02, (full, int8)


@pytest.fixture(scope="module")
def default_with_adapter(tmp_path_factory):
    """The built-in model and a non-zero LoRA adapter for it, in a folder named my-lora (no shared files needed)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from baichuan_tune.models.checkpoint import load_model

    torch.manual_seed(0)
    lora = get_peft_model(load_model("default", dtype="fp32"), LoraConfig(r=2, target_modules=["W_pack"],
                                                                          init_lora_weights=False))
    folder = tmp_path_factory.mktemp("adapters") / "my-lora"
    lora.save_pretrained(folder)
    return folder


def test_results_go_to_a_folder_of_their_own_model_and_are_never_replaced_by_accident(
        default_with_adapter, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "doc.txt").write_text("The capital of France is Paris. " * 8, encoding="utf-8")
    common = ["eval", "--task", "ppl", "--data", "doc.txt", "--max-length", "32", "--progress", "false"]
    assert cli.main([*common, "--model", "default"]) == 0
    assert cli.main([*common, "--model", "default", "--adapter", str(default_with_adapter)]) == 0
    base = json.loads((tmp_path / "eval_results/default/ppl-doc/results.json").read_text(encoding="utf-8"))
    adapted = json.loads((tmp_path / "eval_results/default+my-lora/ppl-doc/results.json").read_text(encoding="utf-8"))
    assert base["perplexity"] != adapted["perplexity"]  # two models, two folders: neither replaced the other
    # perplexity has no split and no few-shot examples: null, in the config as well, not the benchmark defaults
    assert (base["task"], base["split"], base["n_shot"]) == ("ppl", None, None)
    assert base["config"]["split"] is None and base["config"]["n_shot"] is None and base["data"] == "doc.txt"
    # the same run again is refused before any work, naming the folder and the way out; the results stay
    capsys.readouterr()
    assert cli.main([*common, "--model", "default", "--max-length", "16"]) == 2
    err = capsys.readouterr().err
    assert "eval_results/default/ppl-doc already holds results" in err and "--overwrite_output_dir true" in err
    assert json.loads((tmp_path / "eval_results/default/ppl-doc/results.json").read_text()) == base
    assert cli.main([*common, "--model", "default", "--max-length", "16", "--overwrite_output_dir", "true"]) == 0
    replaced = json.loads((tmp_path / "eval_results/default/ppl-doc/results.json").read_text())
    assert replaced["max_length"] == 16 and replaced["windows"] > base["windows"]


def test_benchmark_results_folder_is_named_by_model_task_and_split(checkpoint, shared_data, tmp_path, monkeypatch):
    data = need_shared(shared_data / "eval" / "ceval" / "ceval.zip")
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(checkpoint), "--task", "ceval", "--split", "val", "--data", str(data), "--subjects", "law",
            "--max-questions", "2", "--n-shot", "1", "--progress", "false"]
    assert eval_command.main(argv) == 0
    results = json.loads((tmp_path / "eval_results/tiny-baichuan2/ceval-val/results.json").read_text())
    assert (results["task"], results["split"], results["n_shot"]) == ("ceval", "val", 1)
    assert eval_command.run_name(eval_command.EvalConfig(model="runs/merged/", adapter="out/sft", quantization_bit=4)) == \
        "merged+sft-4bit"


def test_perplexity_shows_a_progress_bar(tmp_path, capsys):
    (tmp_path / "doc.txt").write_text("one two three four five six seven eight nine ten " * 4, encoding="utf-8")
    argv = ["--model", "default", "--task", "ppl", "--data", str(tmp_path / "doc.txt"), "--max-length", "16",
            "--batch-size", "2"]
    assert eval_command.main([*argv, "--output_dir", str(tmp_path / "bar")]) == 0
    windows = json.loads((tmp_path / "bar" / "results.json").read_text())["windows"]
    bar = capsys.readouterr().err
    assert "perplexity" in bar and f"{-(-windows // 2)}/{-(-windows // 2)}" in bar  # every batch counted
    assert eval_command.main([*argv, "--output_dir", str(tmp_path / "quiet"), "--progress", "false"]) == 0
    assert "perplexity" not in capsys.readouterr().err
