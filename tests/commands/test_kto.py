"""`baichuan-tune kto` on CPU: held-out reward accuracy and margin rise from exactly 0; the data forms (labelled
messages / conversations, split pairs) and their errors; the reference and z0 against a hand computation;
full fine-tuning's precomputed reference and resume; QLoRA; two processes under torchrun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from baichuan_tune import cli
from baichuan_tune.commands import kto
from baichuan_tune.config import ConfigError, parse_config
from baichuan_tune.data.builtin_pref import demo_preference_records
from baichuan_tune.errors import DataError

FAST = ["--cache_dir", "none", "--preprocessing_num_workers", "1", "--report_to", "none"]
SMALL = ["--model", "default", "--cutoff_len", "48", "--per_device_train_batch_size", "4", "--device", "cpu",
         "--logging_steps", "1", *FAST]

pytestmark = pytest.mark.usefixtures("one_thread")


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def results_of(out: Path) -> dict:
    return json.loads((out / "train_results.json").read_text())


def unpaired(records: list[dict]) -> list[dict]:
    """Preference pairs as LLaMA-Factory's kto_tag layout: OpenAI messages + a boolean, one answer per record."""
    out = []
    for r in records:
        prompt = r["conversations"][0]["value"]
        for side, label in (("chosen", True), ("rejected", False)):
            out.append({"messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": r[side]["value"]}], "label": label})
    return out


def test_kto_raises_held_out_reward_accuracy_and_margin(tmp_path):
    """120 demo pairs split into 240 labelled answers (30 pairs, 60 answers held out), one epoch of LoRA: before
    training the policy is the reference, so every reward is 0 (accuracy 0, margin 0, loss lambda (1 - sigmoid 0)
    = 0.5); after it most held-out answers' rewards have their label's sign and the margin is clearly positive."""
    pairs = write_json(tmp_path / "pairs.json", demo_preference_records(120))
    out = tmp_path / "run"
    assert kto.main(["--model", "default", "--dataset", str(pairs), "--val_size", "30", "--lora_rank", "16",
                     "--lora_alpha", "32", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                     "--cutoff_len", "64", "--device", "cpu", "--output_dir", str(out), "--logging_steps", "5",
                     *FAST]) == 0
    r = results_of(out)
    assert (r["train_samples"], r["eval_samples"], r["desirable"], r["undesirable"]) == (180, 60, 90, 90)
    assert r["eval_loss_before"] == pytest.approx(0.5, abs=1e-6)
    assert r["eval_accuracy_before"] == 0.0 and r["eval_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert r["eval_accuracy"] >= 0.6, r  # stated margin: +0.6 over the start (0.72 measured)
    assert r["eval_margin"] >= 0.5, r  # 1.5 measured
    assert r["eval_loss"] < 0.5 - 0.05, r
    assert r["eval_desirable_reward"] > r["eval_undesirable_reward"]
    for name in ("adapter_model.safetensors", "training_accuracy.png", "training_margin.png", "training_loss.png"):
        assert (out / name).is_file(), name
    assert not (out / "reference_logps.pt").exists()  # LoRA: the reference is the adapter-off base


def test_the_record_forms_and_the_mismatched_answers(tmp_path):
    from baichuan_tune.data.unpaired import load_unpaired_data
    from baichuan_tune.models.checkpoint import load_model_and_tokenizer

    _, tok = load_model_and_tokenizer("default", dtype="fp32")
    records = [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": True},
        {"conversations": [{"from": "human", "value": "3+3?"}, {"from": "gpt", "value": "7"}], "kto_tag": False},
        {"instruction": "1+1?", "output": "2", "label": True},
        {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    train, held, report = load_unpaired_data([str(path)], tok, cutoff_len=64)
    assert len(train) == 5 and len(held) == 0 and report.counts["desirable"] == 3
    assert [s["label"] for s in train] == [True, False, True, True, False]
    answers = [tok.decode(s["chosen_ids"][:-1]) for s in train]  # the answer, then eos
    assert answers == ["4", "7", "2", "Hello!", "Go away."]
    # Each sample's mismatched answer is another sample's answer, every one used once (a rotation).
    borrowed = [s["rejected_ids"] for s in train]
    assert sorted(map(tuple, borrowed)) == sorted(tuple(s["chosen_ids"]) for s in train)
    assert all(b != s["chosen_ids"] for b, s in zip(borrowed, train))
    # a pair's two halves stay on one side of the split
    pairs = write_json(tmp_path / "pairs.json", demo_preference_records(10))
    train, held, _ = load_unpaired_data([str(pairs)], tok, cutoff_len=64, val_size=3)
    assert (len(train), len(held)) == (14, 6)
    assert not {tuple(s["prompt_ids"]) for s in train} & {tuple(s["prompt_ids"]) for s in held}


@pytest.mark.parametrize("record, field, says", [
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "label": "yes"},
     "label", "expected true or false"),
    ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "label", "missing"),
    ({"messages": [{"role": "user", "content": "2+2?"}], "label": True}, "messages[0].content",
     "must end with an assistant answer"),
    ({"prompt": "Hi", "chosen": "Hello!"}, "rejected", "missing"),
])
def test_a_bad_record_is_one_clear_error(tmp_path, capsys, record, field, says):
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}], "label": True}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    code = cli.main(["kto", *SMALL, "--dataset", str(path), "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"{path}: record 2 (line 2), field '{field}': " in err[0] and says in err[0], err
    from baichuan_tune.data.unpaired import load_unpaired_data

    with pytest.raises(DataError, match="no usable records|at least 2"):  # skipped when asked: one good left
        load_unpaired_data([str(path)], None, skip_bad_records=True)


def _hand_logps(model, ids: list[int], answer_start: int) -> float:
    """Sum of log softmax(logits[t-1])[token t] over the answer tokens, written out position by position."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(answer_start, len(ids)))


def test_the_loss_of_a_batch_by_hand(tmp_path):
    """KTOMethod's loss on a batch with a trained-looking adapter equals the paper's formula evaluated on hand-computed
    log-probabilities: policy with the adapter, reference with it off, z0 = max(0, mean KL of the mismatched pairs)."""
    from peft import LoraConfig, get_peft_model

    from baichuan_tune.train.kto import KTOMethod
    from baichuan_tune.train.reference import Reference
    from baichuan_tune.data.unpaired import load_unpaired_data
    from baichuan_tune.models.checkpoint import load_model_and_tokenizer

    base, tok = load_model_and_tokenizer("default", dtype="fp32")
    data, _, _ = load_unpaired_data([str(write_jsonl(tmp_path / "k.jsonl", unpaired(demo_preference_records(3))))],
                                    tok, cutoff_len=48)
    policy = get_peft_model(base, LoraConfig(r=4, target_modules=["W_pack", "down_proj"])).eval()
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    cfg = parse_config(kto.KTOConfig, ["--beta", "0.5", "--desirable_weight", "1.0", "--undesirable_weight", "2.0"])
    reference = Reference(policy, needed=True, adapter_off=True, out=tmp_path, datasets={}, model_name=cfg.model,
                          batch_size=4, device=torch.device("cpu"), amp_dtype=None)
    method = KTOMethod(data, [], reference, None, torch.device("cpu"), None, beta=cfg.beta,
                       desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    rows = list(range(len(data)))
    loss, metrics = method.step(policy, method.collate(data, rows, torch.device("cpu")))

    def logps(model, side):
        return [_hand_logps(model, s["prompt_ids"] + s[side], len(s["prompt_ids"])) for s in data]

    pol, pol_mis = logps(policy, "chosen_ids"), logps(policy, "rejected_ids")
    with policy.disable_adapter():
        ref, ref_mis = logps(policy, "chosen_ids"), logps(policy, "rejected_ids")
    z0 = max(0.0, sum(p - r for p, r in zip(pol_mis, ref_mis)) / len(data))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = sum((1.0 * (1 - sig(0.5 * (p - r - z0)))) if s["label"] else (2.0 * (1 - sig(0.5 * (z0 - p + r))))
                   for p, r, s in zip(pol, ref, data)) / len(data)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-4)
    assert metrics["kl"] == pytest.approx(z0, abs=1e-4)


def test_full_finetuning_precomputes_the_reference_and_resumes_exactly(tmp_path):
    from safetensors.torch import load_file

    from baichuan_tune.data.unpaired import load_unpaired_data
    from baichuan_tune.models.checkpoint import load_model_and_tokenizer

    data = write_jsonl(tmp_path / "k.jsonl", unpaired(demo_preference_records(6)))
    args = [*SMALL, "--dataset", str(data), "--finetuning_type", "full", "--learning_rate", "1e-4", "--max_steps", "3",
            "--save_steps", "2", "--save_dtype", "fp32"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert kto.main([*args, "--output_dir", str(straight)]) == 0
    table = torch.load(straight / "reference_logps.pt", weights_only=True)
    base, tok = load_model_and_tokenizer("default", dtype="fp32")
    samples, _, _ = load_unpaired_data([str(data)], tok, cutoff_len=48)
    for side, key in (("chosen_ids", "train_chosen_sum"), ("rejected_ids", "train_rejected_sum")):
        hand = [_hand_logps(base, s["prompt_ids"] + s[side], len(s["prompt_ids"])) for s in samples]
        torch.testing.assert_close(table[key], torch.tensor(hand), rtol=1e-4, atol=1e-4)
    # Interrupted after the checkpoint of step 2, resumed: the same weights as the straight run, bit for bit.
    assert kto.main([*args, "--output_dir", str(resumed)]) == 0
    (resumed / "model.safetensors").unlink()
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-2"]
    assert kto.main([*args, "--output_dir", str(resumed), "--resume", "true"]) == 0
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert results_of(resumed)["resumed_from"] == str(resumed / "checkpoint-2")


def test_qlora_and_freeze_run(tmp_path):
    data = write_json(tmp_path / "pairs.json", demo_preference_records(8))
    for kind in ("qlora", "freeze"):
        out = tmp_path / kind
        assert kto.main([*SMALL, "--dataset", str(data), "--finetuning_type", kind, "--max_steps", "2",
                         "--val_size", "2", "--learning_rate", "1e-3", "--output_dir", str(out)]) == 0
        r = results_of(out)
        # the policy starts as the reference (the NF4 base with the adapter off; the frozen table): loss 0.5
        assert r["eval_loss_before"] == pytest.approx(0.5, abs=1e-4), (kind, r)
        assert math.isfinite(r["eval_loss"]) and r["global_step"] == 2


def test_config_checks():
    for name in ("beta", "desirable_weight", "undesirable_weight"):
        with pytest.raises(ConfigError, match=name):
            parse_config(kto.KTOConfig, [f"--{name}", "0"])
    assert kto.weight_note(parse_config(kto.KTOConfig, []), {"desirable": 100, "undesirable": 50}).endswith(
        "(outside the paper's advised 1 to 1.33: adjust the weights); ")


def test_two_processes_under_torchrun_train_as_one_with_the_global_batch(tmp_path):
    """Data-parallel KTO (2 gloo processes, 2 answers each) ends with the adapter of one process on batches of 4: the
    loss is a batch mean and z0 is averaged over the processes, so DDP's mean is the global batch's (tolerance as in
    dpo's test: a tenth of one step of lr 1e-3)."""
    from launch import read_log, run_cli
    from safetensors.torch import load_file

    data = write_json(tmp_path / "pairs.json", demo_preference_records(4))
    common = ["--model", "default", "--dataset", str(data), "--cutoff_len", "32", "--device", "cpu", "--logging_steps",
              "1", "--lora_dropout", "0", "--learning_rate", "1e-3", "--max_steps", "2", *FAST]
    run_cli("kto", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    two = run_cli("kto", [*common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")],
                  processes=2)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)
    for key in ("loss", "kl"):
        assert [r[key] for r in read_log(tmp_path / "two") if "loss" in r] == pytest.approx(
            [r[key] for r in read_log(tmp_path / "one") if "loss" in r], abs=1e-4)
    assert "2 processes, global batch 4" in two.stdout + two.stderr


def test_the_demo_settings():
    cfg = parse_config(kto.KTOConfig, kto.DEMO_OVERRIDES)
    assert (cfg.model, cfg.finetuning_type, cfg.dataset, cfg.val_size) == ("default", "lora", [], 80)
