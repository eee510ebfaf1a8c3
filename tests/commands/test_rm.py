"""`baichuan-tune rm` on CPU: the demo raises held-out pairwise accuracy; scoring, resume and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baichuan_tune import cli
from baichuan_tune.data.builtin_pref import demo_preference_records
from baichuan_tune.commands import rm
from documented import ACCURACY_TOLERANCE, assert_near

FAST = ["--cache_dir", "none", "--preprocessing_num_workers", "1", "--report_to", "none"]
SMALL = ["--model", "default", "--finetuning_type", "lora", "--cutoff_len", "64", "--per_device_train_batch_size", "4",
         "--device", "cpu", "--logging_steps", "1", *FAST]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The built-in demo (`baichuan-tune rm` with no dataset), trained once for this module."""
    out = tmp_path_factory.mktemp("rm") / "demo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAICHUAN_TUNE_HOME", str(tmp_path_factory.getbasetemp() / "baichuan_tune_home"))
        assert rm.main(["--output_dir", str(out), "--eval_steps", "0", *FAST]) == 0
    return out


def write_pairs(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def test_demo_raises_held_out_pairwise_accuracy_well_above_chance(demo_run):
    results = json.loads((demo_run / "train_results.json").read_text())
    assert results["eval_pairs"] == 80 and results["train_pairs"] == 320
    # Before training the random head is at (or below) chance; after two epochs on 320 other pairs the
    # reward model ranks most held-out pairs right, with a clear margin.
    assert results["eval_accuracy_before"] <= 0.6
    assert results["eval_accuracy"] >= 0.7, results
    assert results["eval_accuracy"] - results["eval_accuracy_before"] >= 0.2
    assert results["eval_margin"] > 1.0 > results["eval_margin_before"]
    # This is the demo the docs quote (README, docs/alignment.md): it lands near the documented figures. Before
    # training the chosen and rejected rewards are near ties (margin ~0.01), so which side of a tie a pair falls
    # on follows float rounding (thread count, CPU): that accuracy is only "about chance" on any machine.
    assert_near(results, "rm", absolute={"eval_accuracy_before": 0.2, "eval_accuracy": ACCURACY_TOLERANCE,
                                         "eval_margin_before": 0.3},
                relative={"eval_margin": 0.3})
    for name in ("adapter_config.json", "adapter_model.safetensors", "value_head.safetensors", "reward_model.json",
                 "trainer_log.jsonl", "training_loss.png", "training_accuracy.png", "config.yaml", "demo_pairs.json"):
        assert (demo_run / name).is_file(), name
    meta = json.loads((demo_run / "reward_model.json").read_text())
    assert meta["adapter"] is True and meta["base_model"] == "default" and meta["template"] == "baichuan2"
    log = [json.loads(line) for line in (demo_run / "trainer_log.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "margin", "lr", "grad_norm"} <= set(next(r for r in log if "loss" in r))


def test_score_matches_a_hand_read_of_the_head(demo_run, tmp_path, capsys):
    """`rm score` equals PEFT's own adapter loading + the saved head read at the eos token."""
    prompt = "What is the capital of Japan?"
    good, bad = "The capital of Japan is Tokyo.", "The capital of Japan is Rome."
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": prompt, "response": a}) + "\n" for a in (good, bad)))
    assert rm.main(["score", "--reward_model", str(demo_run), "--input", str(answers), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["response"] for line in lines] == [good, bad]
    assert rm.main(["score", "--reward_model", str(demo_run), "--prompt", prompt, "--response", bad]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(lines[1]["score"], abs=1e-4)  # batch of 1 vs 2

    from peft import PeftModel

    from baichuan_tune.models.checkpoint import load_model, load_tokenizer

    tok = load_tokenizer(demo_run)
    model = PeftModel.from_pretrained(load_model("default", dtype="fp32"), str(demo_run)).eval()
    head = load_file(str(demo_run / "value_head.safetensors"))
    for line, answer in zip(lines, (good, bad)):
        # the baichuan2 layout: 195 + prompt + 196 + answer + eos; the head reads the final (eos) position
        ids = [195, *tok.encode(prompt, add_special_tokens=False), 196, *tok.encode(answer, add_special_tokens=False), 2]
        with torch.no_grad():
            hidden = model.get_base_model().model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        expected = float(hidden @ head["summary.weight"][0] + head["summary.bias"][0])
        assert line["score"] == pytest.approx(expected, abs=1e-4)


def test_score_file_reproduces_the_logged_held_out_accuracy(demo_run, tmp_path, capsys):
    """Scoring the held-out pairs through `rm score --input` gives the accuracy the training run logged."""
    from baichuan_tune.data.sources import load_dataset

    held_out = load_dataset([str(demo_run / "demo_pairs.json")], kind="pair", val_size=80, seed=42).eval
    by_prompt = {(r["conversations"][0]["value"], r["chosen"]["value"], r["rejected"]["value"]): r
                 for r in demo_preference_records()}
    records = [by_prompt[(r.prompt[-1][1], r.chosen, r.rejected)] for r in held_out]
    path = write_pairs(tmp_path / "held_out.json", records)
    assert rm.main(["score", "--reward_model", str(demo_run), "--input", str(path), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    results = json.loads((demo_run / "train_results.json").read_text())
    assert summary["pairs"] == 80
    assert summary["accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-6)
    assert summary["margin"] == pytest.approx(results["eval_margin"], abs=1e-3)


def test_qlora_on_the_published_pair_file(shared_data, tmp_path, capsys):
    """QLoRA (NF4 base) on the first records of the published dpo_zh_demo.json; its score command reloads it."""
    data = shared_data / "dpo_zh_demo.json"
    out = tmp_path / "qlora"
    assert rm.main([*SMALL, "--dataset", str(data), "--max_samples", "8", "--cutoff_len", "128", "--finetuning_type",
                    "qlora", "--max_steps", "2", "--output_dir", str(out)]) == 0
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["finetuning_type"] == "qlora" and meta["adapter"] is True
    first = tmp_path / "first.json"
    write_pairs(first, json.loads(data.read_text(encoding="utf-8"))[:3])
    capsys.readouterr()
    assert rm.main(["score", "--reward_model", str(out), "--input", str(first), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["pairs"] == 3


def test_full_reward_model_on_flat_jsonl(tmp_path, capsys):
    """Full fine-tuning saves the whole model in the published layout next to the head; scoring reloads it."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["conversations"][0]["value"], "chosen": r["chosen"]["value"],
                                         "rejected": r["rejected"]["value"]}, ensure_ascii=False) + "\n"
                             for r in demo_preference_records(12)), encoding="utf-8")
    out = tmp_path / "full"
    assert rm.main([*SMALL, "--dataset", str(pairs), "--finetuning_type", "full", "--max_steps", "2",
                    "--learning_rate", "1e-4", "--output_dir", str(out)]) == 0
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "reward_model.json").read_text())["adapter"] is False
    capsys.readouterr()
    assert rm.main(["score", "--reward_model", str(out), "--prompt", "你是谁？", "--response", "我不知道。"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["score"], float)


def test_resume_continues_exactly(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.json", demo_preference_records(24))
    args = [*SMALL, "--dataset", str(pairs), "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3",
            "--val_size", "4", "--eval_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert rm.main([*args, "--output_dir", str(straight)]) == 0
    assert rm.main([*args, "--output_dir", str(resumed)]) == 0
    # Throw away the finished result and continue from the step-2 checkpoint.
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        (resumed / name).unlink()
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-2"]
    capsys.readouterr()
    assert rm.main([*args, "--output_dir", str(resumed), "--resume", "true"]) == 0
    assert f"resumed from {resumed / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    # The held-out numbers before training come from the step-0 evaluation the first run logged.
    results = [json.loads((folder / "train_results.json").read_text()) for folder in (straight, resumed)]
    assert "eval_accuracy_before" in results[0]
    assert [r["resumed_from"] for r in results] == [None, str(resumed / "checkpoint-2")]
    assert {k: v for k, v in results[0].items() if k.startswith("eval_")} == \
        {k: v for k, v in results[1].items() if k.startswith("eval_")}


def test_bad_record_is_one_clear_error(tmp_path, capsys):
    records = demo_preference_records(4)
    del records[1]["rejected"]
    pairs = write_pairs(tmp_path / "broken.json", records)
    code = cli.main(["rm", *SMALL, "--dataset", str(pairs), "--output_dir", str(tmp_path / "out"), "--max_steps", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and "broken.json" in err[0] and "record 2" in err[0] and "rejected" in err[0]


def test_score_needs_a_reward_model_folder(tmp_path, capsys):
    code = cli.main(["rm", "score", "--reward_model", str(tmp_path), "--prompt", "hi", "--response", "hello"])
    err = capsys.readouterr().err
    assert code == 2 and "reward_model.json" in err and "baichuan-tune rm" in err
    assert cli.main(["rm", "score", "--reward_model", str(tmp_path)]) == 2  # neither --input nor --prompt
    bad = tmp_path / "answers.jsonl"
    bad.write_text('{"prompt": "hi", "response": "hello"}\n{"prompt": "hi"}\n')
    capsys.readouterr()
    assert cli.main(["rm", "score", "--reward_model", str(tmp_path), "--input", str(bad)]) == 2
    # the folder check comes first; a real reward model folder reaches the record check (test above)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_qlora_bf16_on_cuda_learns_the_demo_pairs(tmp_path):
    """The demo on a GPU with NF4 base weights and bf16 autocast (0.75 held-out accuracy on a CPU)."""
    out = tmp_path / "cuda"
    assert rm.main(["--output_dir", str(out), "--eval_steps", "0", "--device", "cuda", "--finetuning_type", "qlora",
                    "--bf16", "true", *FAST]) == 0
    results = json.loads((out / "train_results.json").read_text())
    assert results["eval_accuracy"] >= 0.7 and results["eval_margin"] > 1.0, results


def test_two_processes_under_torchrun_train_a_reward_model(tmp_path):
    """rm under torchrun (2 CPU processes, gloo): every step logged once, the held-out evaluation shared out and
    summed over both processes' halves, the reward model written once by rank 0."""
    from launch import read_log, run_cli

    pairs = write_pairs(tmp_path / "pairs.json", demo_preference_records(12))
    out = tmp_path / "two"
    run_cli("rm", [*SMALL, "--dataset", str(pairs), "--max_steps", "2", "--val_size", "4", "--learning_rate", "1e-3",
                   "--per_device_train_batch_size", "2", "--output_dir", str(out)], processes=2)
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and results["eval_pairs"] == 4
    assert 0.0 <= results["eval_accuracy"] <= 1.0 and "eval_accuracy_before" in results
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 2]
    for name in ("adapter_model.safetensors", "value_head.safetensors", "reward_model.json"):
        assert (out / name).is_file(), name
