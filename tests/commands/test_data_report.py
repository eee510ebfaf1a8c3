"""Every training command counts its data the same way: records read per file, then the train / eval split."""

from __future__ import annotations

import json
import re

import pytest

from baichuan_tune.data.builtin_pref import demo_preference_records
from baichuan_tune.commands import dpo, ppo, rm, sft

FAST = ["--model", "default", "--device", "cpu", "--max_steps", "1", "--report_to", "none", "--val_size", "4",
        "--logging_steps", "1"]
DATA = ["--cache_dir", "none", "--preprocessing_num_workers", "1", "--cutoff_len", "48",
        "--per_device_train_batch_size", "4"]
PPO = ["--rollout_batch_size", "4", "--per_device_train_batch_size", "4", "--max_new_tokens", "2", "--ppo_epochs", "1",
       "--reward_function", "baichuan_tune.rewards:chinese_ratio", "--max_prompt_length", "8"]

pytestmark = pytest.mark.usefixtures("one_thread")


def records(command: str) -> list[dict]:
    pairs = demo_preference_records(14)
    if command in ("rm", "dpo"):
        return pairs
    prompts = [p["conversations"][0]["value"] for p in pairs]
    if command == "ppo":
        return [{"prompt": prompt} for prompt in prompts]
    return [{"instruction": prompt, "output": p["chosen"]["value"]} for prompt, p in zip(prompts, pairs)]


@pytest.mark.parametrize("command,unit,extra", [
    (sft, "samples", DATA), (rm, "pairs", DATA), (dpo, "pairs", DATA), (ppo, "prompts", PPO)],
    ids=["sft", "rm", "dpo", "ppo"])
def test_every_command_reports_its_data_alike(command, unit, extra, tmp_path, capsys):
    name = command.__name__.rsplit(".", 1)[1]
    path = tmp_path / f"{name}.jsonl"
    written = records(name)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written), encoding="utf-8")
    out = tmp_path / "out"
    assert command.main([*FAST, *extra, "--dataset", str(path), "--output_dir", str(out)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("data: "))
    # 14 records in the file, 4 held out for evaluation: the same words and numbers whatever the command
    assert line.startswith(f"data: {name}.jsonl: 14 records; 10 train / 4 eval {unit}"), line
    results = json.loads((out / "train_results.json").read_text())
    assert {k: results[k] for k in ("data_records", f"train_{unit}", f"eval_{unit}", "skipped_records",
                                    "dropped_samples")} == {"data_records": 14, f"train_{unit}": 10,
                                                            f"eval_{unit}": 4, "skipped_records": 0,
                                                            "dropped_samples": 0}
    assert results["truncated_samples"] >= 0 and re.search(r"trainable [\d.]+M of [\d.]+M parameters", line)


def test_counts_and_ratios_say_how_many_records_they_drew(tmp_path):
    from baichuan_tune.data.loading import data_report
    from baichuan_tune.data.sources import load_dataset

    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"instruction": str(i), "output": "x"}) + "\n" for i in range(10)))
    loaded = load_dataset([f"{path}:25"], val_size=2, seed=0)
    report = data_report(loaded.read, len(loaded.train), len(loaded.eval), "samples", drawn=loaded.drawn)
    assert report == "data: a.jsonl: 10 records (25 drawn for training); 25 train / 2 eval samples"
    assert report.counts["data_records"] == 10 and report.counts["train_samples"] == 25
