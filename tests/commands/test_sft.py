"""`baichuan-tune sft` end to end on CPU with the built-in default model and demo data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baichuan_tune.commands import sft
from baichuan_tune.config import ConfigError, parse_config
from baichuan_tune.train.training import TrainingError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_sft(out: Path, *extra: str) -> dict:
    args = ["--model", "default", "--dataset", "demo", "--max_samples", "48", "--cutoff_len", "64",
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--output_dir", str(out),
            "--device", "cpu", "--cache_dir", "none", "--preprocessing_num_workers", "1", *extra]
    assert sft.main(args) == 0
    return json.loads((out / "train_results.json").read_text())


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def test_lora_run_writes_every_output_and_peft_loads_the_adapter(tmp_path):
    out = tmp_path / "lora"
    results = run_sft(out, "--max_steps", "4", "--val_size", "8", "--eval_steps", "2", "--learning_rate", "1e-3")
    assert results["global_step"] == 4
    for name in ("adapter_config.json", "adapter_model.safetensors", "trainer_log.jsonl", "training_loss.png",
                 "train_results.json", "config.yaml", "tokenizer.model"):
        assert (out / name).is_file(), name
    assert list((out / "runs").glob("events.out.tfevents.*")), "no TensorBoard event file"
    log = read_log(out)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert {"lr", "grad_norm", "epoch", "tokens_per_s", "elapsed"} <= set(log[0])
    assert any("eval_loss" in r for r in log)
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"}

    # PEFT itself loads the adapter on this model, and it is not a no-op: LoRA's B matrices moved from 0.
    from peft import PeftModel

    from baichuan_tune.models.checkpoint import load_model, resolve_model_path

    base = load_model(resolve_model_path("default"), dtype="fp32")
    ids = torch.tensor([[1, 195, 300, 400, 196]])
    with torch.no_grad():
        plain = base(ids).logits
        tuned = PeftModel.from_pretrained(base, str(out)).eval()(ids).logits
    assert not torch.allclose(plain, tuned)
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_training_lowers_the_loss(tmp_path):
    out = tmp_path / "full"
    run_sft(out, "--finetuning_type", "full", "--max_steps", "24", "--learning_rate", "2e-3", "--num_train_epochs", "10")
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 24
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, (first, last)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


@pytest.mark.parametrize("setting", [
    ("--lora_dropout", "0.1"),
    # 48 samples pack into fewer rows than one epoch of 2 x 8-row batches needs, so every step crosses an epoch.
    ("--packing", "true", "--gradient_accumulation_steps", "2", "--num_train_epochs", "10", "--val_size", "8",
     "--eval_steps", "3"),
], ids=["dropout", "packing-accumulation"])
def test_resume_after_a_kill_ends_with_the_same_weights(tmp_path, monkeypatch, capsys, setting):
    common = ("--max_steps", "6", "--save_steps", "2", "--learning_rate", "1e-3", *setting)
    straight = tmp_path / "straight"
    assert run_sft(straight, *common)["resumed_from"] is None

    killed = tmp_path / "killed"
    import baichuan_tune.train.training as training

    real_step, calls = training.optimizer_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # killed after step 5 was logged; checkpoint-4 is the latest
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(training, "optimizer_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_sft(killed, *common)
    monkeypatch.setattr(training, "optimizer_step", real_step)
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    with pytest.raises(TrainingError, match="--resume"):
        run_sft(killed, *common)
    capsys.readouterr()
    # The resumed run says which checkpoint it continues from, in its output and in train_results.json.
    assert run_sft(killed, *common, "--resume", "true")["resumed_from"] == str(killed / "checkpoint-4")
    assert f"resumed from {killed / 'checkpoint-4'} (step 4)" in capsys.readouterr().out

    a = load_file(str(straight / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The resumed run's log equals the straight one's (step 5 once, not once per attempt), timings aside.
    def values(out):
        return [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in read_log(out)]

    assert values(killed) == values(straight)
    assert [r["step"] for r in read_log(killed) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_checkpoint_of_other_trainable_weights(tmp_path):
    out = tmp_path / "run"
    run_sft(out, "--max_steps", "3", "--save_steps", "2")
    with pytest.raises(TrainingError, match="checkpoint-2: the checkpoint does not match this run's trainable weights"):
        run_sft(out, "--max_steps", "3", "--save_steps", "2", "--resume", "true", "--lora_target", "W_pack")


def test_nan_loss_stops_with_step_and_checkpoint_or_is_skipped(tmp_path, monkeypatch):
    from baichuan_tune.models.modeling_baichuan import BaichuanForCausalLM

    real_forward, calls = BaichuanForCausalLM.forward, {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3 and self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(BaichuanForCausalLM, "forward", poisoned)
    with pytest.raises(TrainingError, match=r"loss is nan at optimizer step 3; the last good checkpoint is .*checkpoint-2"):
        run_sft(tmp_path / "stop", "--finetuning_type", "full", "--max_steps", "5", "--save_steps", "2")
    calls["n"] = 0
    results = run_sft(tmp_path / "skip", "--finetuning_type", "full", "--max_steps", "5", "--nan_policy", "skip")
    assert results["skipped_steps"] == 1 and results["global_step"] == 5


def test_qlora_on_cpu_trains_lora_over_nf4_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    run_sft(out, "--finetuning_type", "qlora", "--max_steps", "2", "--lora_target", "W_pack")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["W_pack"] and config["r"] == 8


@pytest.mark.parametrize("flags,message", [
    (["--learnig_rate", "1e-4"], "did you mean 'learning_rate'"),
    (["--lora_target", "q_proj"], r"lora_target: unknown module\(s\) \['q_proj'\]"),
    (["--quantization_bit", "3"], r"'quantization_bit' must be one of \[4, 8\]"),
    (["--bf16", "--fp16"], "choose one of bf16 and fp16"),
    (["--logging_steps", "0"], "logging_steps must be at least 1"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be at least 1"),
    (["--warmup_ratio", "1.5"], r"warmup_ratio must be in \[0, 1\]"),
    (["--device", "gpu"], "device must be cpu, cuda, cuda:N or auto"),
    (["--learning_rate", "-1"], "learning_rate must be positive"),
    (["--cutoff_len", "-5"], "cutoff_len must be at least 1"),  # would cut every sample's end, eos included
    (["--packing", "true", "--cutoff_len", "0"], "cutoff_len must be at least 1"),
    (["--max_source_length", "-2"], "max_source_length must not be negative"),
    (["--max_samples", "-5"], "max_samples must not be negative"),
    (["--loss_chunk_size", "-1"], "loss_chunk_size must not be negative"),
    (["--val_size", "2.5"], "val_size must be a fraction below 1 or a whole number"),
    (["--dataset", "no/such/file.json"], "no/such/file.json: data file not found"),
    (["--finetuning_type", "freeze", "--freeze_trainable_layers", "10"],
     "freeze_trainable_layers is 10 but the model has 4 decoder layers"),
])
def test_bad_options_are_rejected_before_any_work(tmp_path, flags, message):
    with pytest.raises(ConfigError, match=message):
        sft.main(["--dataset", "demo", *flags, "--output_dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("sft_*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    import yaml

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert str(raw["model"]).startswith("/path/to/") and raw["dataset"][0].startswith("/path/to/"), \
        "examples change only the model and data paths"
    data = tmp_path / "data.json"
    data.write_text("[]", encoding="utf-8")
    cfg = parse_config(sft.SFTConfig, [str(path), "--dataset", str(data)])  # as a user runs it: own data path
    assert cfg.finetuning_type == "qlora" and cfg.lora_rank == 8


def test_own_model_without_dataset_is_an_error_not_the_demo(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no --dataset given"):
        sft.main(["--model", str(tmp_path / "my-model"), "--output_dir", str(tmp_path / "x")])
    assert "built-in demo" not in capsys.readouterr().out and not (tmp_path / "x").exists()


def test_demo_runs_with_user_flags_and_saves_a_reusable_config(tmp_path, capsys):
    out = tmp_path / "demo"
    assert sft.main(["--max_steps", "3", "--output_dir", str(out), "--report_to", "none"]) == 0
    printed = capsys.readouterr().out
    assert "running the built-in demo" in printed and printed.count("before: ") == printed.count("after:  ") == 4
    cfg = parse_config(sft.SFTConfig, [str(out / "config.yaml")])
    assert cfg.model == "default" and cfg.dataset == ["demo"] and cfg.finetuning_type == "full"
    assert json.loads((out / "train_results.json").read_text())["global_step"] == 3
    # The demo may clear its own folder, never one the user named: a second demo run there is refused.
    with pytest.raises(TrainingError, match="already holds a run"):
        sft.main(["--max_steps", "3", "--output_dir", str(out), "--report_to", "none"])
    assert (out / "model.safetensors").is_file()


def test_a_finished_run_without_checkpoints_is_not_overwritten_or_mixed(tmp_path):
    out = tmp_path / "done"
    run_sft(out, "--max_steps", "2")  # LoRA, no checkpoint (save_steps 500)
    with pytest.raises(TrainingError, match="already holds a run"):
        run_sft(out, "--max_steps", "2", "--finetuning_type", "full")
    with pytest.raises(TrainingError, match="no checkpoint to resume from"):
        run_sft(out, "--max_steps", "2", "--resume", "true")
    assert (out / "adapter_model.safetensors").is_file()
    (out / "notes.txt").write_text("mine")  # not a file of the run: overwriting leaves it alone
    run_sft(out, "--max_steps", "2", "--finetuning_type", "full", "--overwrite_output_dir", "true")
    assert (out / "model.safetensors").is_file() and not (out / "adapter_model.safetensors").exists()
    assert (out / "notes.txt").read_text() == "mine"


def test_a_demo_never_clears_a_folder_the_user_named_in_any_spelling(tmp_path):
    out = tmp_path / "mine"
    run_sft(out, "--max_steps", "1")
    for flags in (["--output-dir", str(out)], [f"--output_dir={out}"]):
        with pytest.raises(TrainingError, match="already holds a run"):
            sft.main([*flags, "--max_steps", "1", "--report_to", "none"])
        assert (out / "adapter_model.safetensors").is_file()


def test_overwrite_output_dir_starts_again_in_a_used_folder(tmp_path):
    out = tmp_path / "again"
    run_sft(out, "--max_steps", "2", "--save_steps", "1")
    assert (out / "checkpoint-1").is_dir()
    with pytest.raises(TrainingError, match="--overwrite_output_dir true"):
        run_sft(out, "--max_steps", "2", "--save_steps", "1")
    results = run_sft(out, "--max_steps", "1", "--save_steps", "5", "--overwrite_output_dir", "true")
    assert results["global_step"] == 1 and not list(out.glob("checkpoint-*"))
    assert [r["step"] for r in read_log(out) if "loss" in r] == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("setting", [
    ("--finetuning_type", "lora", "--bf16", "true", "--gradient_checkpointing", "true", "--packing", "true"),
    ("--finetuning_type", "qlora", "--bf16", "true", "--optim", "paged_adamw_8bit"),
    ("--finetuning_type", "qlora", "--quantization_bit", "8", "--fp16", "true"),
], ids=["lora-bf16-packed", "qlora4-bf16-paged8bit", "qlora8-fp16"])
def test_training_on_cuda_lowers_the_loss(tmp_path, setting):
    """The GPU paths (autocast, loss scaling, bitsandbytes kernels and optimizers) learn like the CPU one:
    30 steps on the demo data take the loss from about 8.5 to about 4.6 on a CPU in fp32."""
    out = tmp_path / "cuda"
    run_sft(out, "--device", "cuda", "--max_samples", "200", "--max_steps", "30", "--num_train_epochs", "10",
            "--learning_rate", "2e-3", *setting)
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert len(losses) == 30 and all(map(math.isfinite, losses))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_freeze_changes_only_the_last_layers_and_saves_in_the_chosen_dtype(tmp_path):
    from baichuan_tune.models.checkpoint import resolve_model_path

    out = tmp_path / "freeze"
    run_sft(out, "--finetuning_type", "freeze", "--freeze_trainable_layers", "1", "--max_steps", "3",
            "--learning_rate", "1e-2", "--save_dtype", "bf16")
    base = load_file(str(resolve_model_path("default") / "model.safetensors"))
    tuned = load_file(str(out / "model.safetensors"))
    assert base.keys() == tuned.keys() and {t.dtype for t in tuned.values()} == {torch.bfloat16}
    changed = {k for k in base if not torch.equal(base[k].to(torch.bfloat16), tuned[k])}
    assert changed and all(k.startswith("model.layers.3.") for k in changed), sorted(changed)[:5]


def test_full_run_saves_the_base_checkpoints_dtype_by_default(tmp_path):
    """save_dtype auto: the base's torch_dtype (the built-in model's is float32; the published ones bf16)."""
    import json as _json

    from baichuan_tune.train.training import final_dtype

    out = tmp_path / "full"
    run_sft(out, "--finetuning_type", "full", "--max_steps", "1")
    assert {t.dtype for t in load_file(str(out / "model.safetensors")).values()} == {torch.float32}
    published = tmp_path / "published"
    published.mkdir()
    (published / "config.json").write_text(_json.dumps({"torch_dtype": "bfloat16"}))
    assert final_dtype(parse_config(sft.SFTConfig, ["--dataset", "demo", "--model", str(published)])) == "bf16"


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    """Recomputing activations in backward (dropout RNG replayed) must not change what is learnt."""
    runs = {"plain": ("false", "-1"), "ckpt": ("true", "-1"), "ckpt-first-layer": ("true", "1")}
    for name, (flag, layers) in runs.items():
        run_sft(tmp_path / name, "--max_steps", "3", "--learning_rate", "1e-3", "--gradient_checkpointing", flag,
                "--checkpoint_layers", layers)
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    for name in ("ckpt", "ckpt-first-layer"):
        b = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("flags", [("--finetuning_type", "qlora", "--quantization_bit", "8"), ("--bf16", "true")],
                         ids=["qlora-int8", "bf16-autocast"])
def test_other_precisions_train_on_cpu(tmp_path, flags):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    run_sft(out, "--max_steps", "12", "--learning_rate", "2e-3", "--num_train_epochs", "10", *flags)
    losses = [r["loss"] for r in read_log(out) if "loss" in r]
    assert all(map(math.isfinite, losses)) and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses


def test_skipped_bad_records_are_counted_in_the_results(tmp_path):
    good = [{"instruction": f"Say {i}.", "output": f"{i}."} for i in range(12)]
    bad = [{"instruction": "no answer"}, {"instruction": 5, "output": "x"}]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(good[:6] + bad + good[6:]), encoding="utf-8")
    results = run_sft(tmp_path / "run", "--dataset", str(path), "--skip_bad_records", "true", "--max_steps", "1")
    assert results["skipped_records"] == 2


def _equal_length_texts(tmp_path) -> list[str]:
    """sft options on 12 texts that are all cut to the same 16 tokens (so every sample weighs alike in a
    batch's mean loss, the condition for a data-parallel step to equal one process's on the global batch)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma omega".split()
    records = [{"text": " ".join(words[(i + k) % len(words)] for k in range(30))} for i in range(12)]
    data = tmp_path / "texts.json"
    data.write_text(json.dumps(records), encoding="utf-8")
    return ["--model", "default", "--dataset", str(data), "--template", "base", "--cutoff_len", "16",
            "--lora_dropout", "0", "--learning_rate", "1e-3", "--device", "cpu", "--cache_dir", "none",
            "--preprocessing_num_workers", "1", "--report_to", "none", "--logging_steps", "1"]


def test_two_processes_under_torchrun_train_as_one_with_the_global_batch(tmp_path):
    """Data-parallel sft (torchrun, 2 CPU processes, gloo, 2 samples each) ends with the same adapter as one
    process on batches of 4: every sample is cut to the same 16 tokens, so DDP's average of the two
    processes' mean losses is the mean loss of the global batch."""
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built in")
    common = _equal_length_texts(tmp_path) + ["--max_steps", "3"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "baichuan_tune.cli", "sft", *common, "--per_device_train_batch_size",
                          "4", "--output_dir", str(tmp_path / "one")], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "baichuan_tune.cli", "sft", *common, "--per_device_train_batch_size", "2",
                          "--output_dir", str(tmp_path / "two")], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6)
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert [r["step"] for r in log_two if "loss" in r] == [1, 2, 3]
    assert [r["loss"] for r in log_two if "loss" in r] == pytest.approx([r["loss"] for r in log_one if "loss" in r],
                                                                        abs=1e-4)
    assert "2 processes, global batch 4" in two.stdout + two.stderr


def test_fused_accumulation_under_torchrun_trains_as_one_process_on_the_global_batch(tmp_path):
    """2 CPU processes x 1 sample x 2 accumulated micro-batches, fused (the default: each process runs its two
    samples as one packed row) and not, end with the adapter of one process on batches of 4; every sample is
    cut to the same 16 tokens, so each update is the global batch's mean loss."""
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not built in")
    common = _equal_length_texts(tmp_path) + ["--max_steps", "2"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"one": ([sys.executable], ["--per_device_train_batch_size", "4"]),
            "fused": (torchrun, ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2"]),
            "plain": (torchrun, ["--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "2",
                                 "--fuse_accumulation", "false"])}
    for name, (launcher, args) in runs.items():
        done = subprocess.run([*launcher, "-m", "baichuan_tune.cli", "sft", *common, *args, "--output_dir",
                               str(tmp_path / name)], capture_output=True, text=True, env=env, timeout=300, check=False)
        assert done.returncode == 0, (name, done.stderr[-3000:])
    adapters = {name: load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in runs}
    assert any(v.abs().sum() > 0 for k, v in adapters["one"].items() if "lora_B" in k)
    for name in ("fused", "plain"):
        for key, value in adapters["one"].items():
            torch.testing.assert_close(adapters[name][key], value, rtol=0, atol=1e-5)
    losses = {name: [r["loss"] for r in read_log(tmp_path / name) if "loss" in r] for name in runs}
    assert losses["fused"] == pytest.approx(losses["one"], abs=1e-4) and len(losses["fused"]) == 2
    assert losses["plain"] == pytest.approx(losses["one"], abs=1e-4)
    fused = {name: json.loads((tmp_path / name / "train_results.json").read_text())["fused_updates"] for name in runs}
    assert fused == {"one": 0, "fused": 2, "plain": 0}  # both updates of the default run took the fused pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_under_torchrun_qlora_bf16(tmp_path):
    """NCCL, NF4 base weights, bf16 and gradient checkpointing under DDP: the run learns, and its logged losses
    follow one GPU's run on the global batch (bf16 and NF4 kernels round differently, hence the tolerance)."""
    import os
    import subprocess
    import sys

    common = ["--model", "default", "--dataset", "demo", "--max_samples", "200", "--cutoff_len", "64",
              "--finetuning_type", "qlora", "--bf16", "true", "--gradient_checkpointing", "true", "--lora_dropout",
              "0", "--learning_rate", "2e-3", "--max_steps", "20", "--num_train_epochs", "10", "--device", "cuda",
              "--cache_dir", "none", "--report_to", "none", "--logging_steps", "1"]
    runs = {}
    for name, launcher, batch in (("one", [], "8"), ("two", ["-m", "torch.distributed.run", "--standalone",
                                                             "--nproc_per_node", "2"], "4")):
        cmd = [sys.executable, *launcher, "-m", "baichuan_tune.cli", "sft", *common,
               "--per_device_train_batch_size", batch, "--output_dir", str(tmp_path / name)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False,
                              env=os.environ | {"CUDA_VISIBLE_DEVICES": "0"} if name == "one" else os.environ)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = [r["loss"] for r in read_log(tmp_path / name) if "loss" in r]
    assert len(runs["two"]) == 20 and runs["two"][-1] < 0.7 * runs["two"][0]
    assert runs["two"] == pytest.approx(runs["one"], rel=0.05)


def test_a_full_disk_at_the_final_save_keeps_the_training_for_resume(tmp_path, monkeypatch, capsys):
    """With --save_steps 0 nothing else holds the trained weights while the adapter is written: a full disk
    there (safetensors' real error) is one line, the state stays in checkpoint-N, and --resume writes exactly
    the weights that were trained."""
    import peft.peft_model
    from safetensors import SafetensorError

    from baichuan_tune import cli

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out, common = tmp_path / "full", ("--max_steps", "2", "--save_steps", "0", "--learning_rate", "1e-3")
    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    args = ["--model", "default", "--dataset", "demo", "--max_samples", "48", "--cutoff_len", "64",
            "--per_device_train_batch_size", "8", "--logging_steps", "1", "--output_dir", str(out),
            "--device", "cpu", "--cache_dir", "none", "--preprocessing_num_workers", "1", *common]
    assert cli.main(["sft", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {out}: could not write the adapter: no space left on the disk. The trained state is kept "
                   f"in {out / 'checkpoint-2'}: free some space, then run the same command again with --resume true "
                   "to write the result")
    assert not (out / "adapter_model.safetensors").exists() and not (out / "train_results.json").exists()
    trained = load_file(str(out / "checkpoint-2" / "trainable.safetensors"))  # PEFT names: ...lora_A.default.weight
    monkeypatch.undo()

    results = run_sft(out, *common, "--resume", "true")
    assert results["global_step"] == 2 and [r["step"] for r in read_log(out) if "loss" in r] == [1, 2]
    assert not list(out.glob("checkpoint-*"))  # kept only until the result was written
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert {k.replace(".default.", "."): v for k, v in trained.items()}.keys() == adapter.keys()
    assert all(torch.equal(v, adapter[k.replace(".default.", ".")]) for k, v in trained.items())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # trained, not the init


def test_chunked_loss_and_group_by_length_train_like_the_plain_run(tmp_path):
    """sft with --loss_chunk_size (no full logits) learns the same adapter as the full-logits run; the
    results report tokens/s; --group_by_length runs and sees every sample."""
    for name, flags in (("plain", ()), ("chunked", ("--loss_chunk_size", "16"))):
        results = run_sft(tmp_path / name, "--max_steps", "3", "--learning_rate", "1e-3", *flags)
        assert results["tokens_per_s"] > 0
    a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "chunked" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    results = run_sft(tmp_path / "grouped", "--max_steps", "2", "--group_by_length", "true")
    assert results["global_step"] == 2 and math.isfinite(results["train_loss_last"])


def test_fused_accumulation_trains_like_the_plain_loop(tmp_path, monkeypatch):
    """batch 1 x accumulation 4: one packed pass per update (the default) gives the plain loop's logged
    losses and token counts over 3 updates and its gradients at the first two (AdamW's moments and step
    counts in the checkpoints); a fuse_max_tokens below any group falls back.

    Not the weights: AdamW divides each gradient by its own running RMS, so where a gradient is near its
    epsilon (rows of LoRA B with almost no signal, LoRA A at the second update after a zero B) a 1e-9
    rounding difference becomes a 1e-5 difference in the step; the moments compare the gradients
    themselves, to 5e-8 where they are 1e-4 to 1e-2."""
    common = ("--max_steps", "3", "--learning_rate", "1e-3", "--per_device_train_batch_size", "1",
              "--gradient_accumulation_steps", "4", "--lora_dropout", "0",  # dropout draws per pass
              "--save_steps", "1", "--save_total_limit", "5")
    runs = {"plain": ("--fuse_accumulation", "false"), "fused": (), "fallback": ("--fuse_max_tokens", "4")}
    from baichuan_tune.train.engine import Engine

    passes, one_pass = {}, Engine._fused_update
    for name, flags in runs.items():
        monkeypatch.setattr(Engine, "_fused_update", lambda self, batch, name=name: (
            passes.__setitem__(name, passes.get(name, 0) + 1), one_pass(self, batch))[1])
        run_sft(tmp_path / name, *common, *flags)
    assert passes == {"fused": 3}  # the fused run took one pass per update, the others the plain loop
    logs = {name: [r for r in read_log(tmp_path / name) if "loss" in r] for name in runs}
    assert len(logs["plain"]) == 3

    def moments(run: str, step: int) -> dict:
        state = torch.load(tmp_path / run / f"checkpoint-{step}" / "training_state.pt", weights_only=True)
        return {(k, m): v[m] for k, v in state["optimizer"]["state"].items() for m in ("step", "exp_avg")}

    for name in ("fused", "fallback"):
        for mine, plain in zip(logs[name], logs["plain"], strict=True):
            assert mine["loss"] == pytest.approx(plain["loss"], rel=1e-5)
            assert mine["tokens"] == plain["tokens"]
        trainable = load_file(str(tmp_path / name / "checkpoint-1" / "trainable.safetensors"))
        for step in (1, 2):
            expected, mine = moments("plain", step), moments(name, step)
            assert expected.keys() == mine.keys() and len(expected) == 2 * len(trainable) > 0
            for key in expected:  # fp32 rounding of the gradient sums is about 1e-9
                torch.testing.assert_close(mine[key], expected[key], rtol=1e-5, atol=5e-8)
