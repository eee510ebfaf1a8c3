"""Sharded training (--parallel fsdp, FSDP2) on CPUs: 2 gloo processes under torchrun against one process on the
global batch, a killed run resumed from its sharded checkpoint, the checkpoint read back whole, and the option
combinations that are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import read_log, run_cli

FAST = ["--cache_dir", "none", "--preprocessing_num_workers", "1", "--report_to", "none", "--device", "cpu",
        "--logging_steps", "1", "--model", "default"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma omega".split()


def write_texts(path: Path, n: int) -> Path:
    """n texts longer than the cutoff: every sample has the same number of labelled tokens, so the mean of the
    processes' mean losses is the global batch's mean loss."""
    records = [{"text": " ".join(WORDS[(i + k) % len(WORDS)] for k in range(30))} for i in range(n)]
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def sft_args(data: Path, *extra: str) -> list[str]:
    return ["--dataset", str(data), "--template", "base", "--cutoff_len", "16", "--lora_dropout", "0", *FAST, *extra]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out) if "loss" in r]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)


def test_sft_lora_sharded_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """The adapter, the losses and the gradient norms of FSDP2 on 2 processes (2 samples each) are one process's
    on batches of 4, and the adapter comes out in PEFT's layout (no `.default.` in its names)."""
    common = sft_args(write_texts(tmp_path / "t.json", 12), "--learning_rate", "1e-3", "--max_steps", "3")
    run_cli("sft", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    two = run_cli("sft", [*common, "--per_device_train_batch_size", "2", "--parallel", "fsdp",
                          "--output_dir", str(tmp_path / "two")], processes=2)
    assert "2 processes, global batch 4, weights sharded (FSDP2)" in two.stdout + two.stderr
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k)  # it trained
    assert not any(".default." in k for k in b)
    assert_same_weights(a, b, atol=2e-6)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    norms = [[r["grad_norm"] for r in read_log(tmp_path / name) if "loss" in r] for name in ("one", "two")]
    assert norms[1] == pytest.approx(norms[0], rel=1e-4)  # clipping sees the norm of the whole gradient


def test_sft_full_sharded_with_accumulation_and_its_checkpoint_read_back_whole(tmp_path):
    """Full fine-tuning, 2 micro-batches per update: the gathered model in the published layout equals one
    process's, and checkpoint-1 (DCP shards of 2 processes) converted to one file holds exactly the weights
    of one process's checkpoint-1."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    common = sft_args(write_texts(tmp_path / "t.json", 16), "--finetuning_type", "full", "--save_dtype", "fp32",
                      "--learning_rate", "1e-4", "--gradient_accumulation_steps", "2", "--max_steps", "2",
                      "--save_steps", "1")
    run_cli("sft", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    run_cli("sft", [*common, "--per_device_train_batch_size", "2", "--parallel", "fsdp",
                    "--output_dir", str(tmp_path / "two")], processes=2)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    base = load_file(str(tmp_path / "one" / "checkpoint-1" / "trainable.safetensors"))
    assert max((a[k] - base[k]).abs().max() for k in a) > 1e-5  # the second step moved the weights
    assert_same_weights(a, b, atol=1e-6)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)
    ckpt = tmp_path / "two" / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir()) == ["rng-0.pt", "rng-1.pt", "scheduler.pt", "sharded",
                                                      "trainer_state.json"]
    dcp_to_torch_save(ckpt / "sharded", tmp_path / "whole.pt")
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert_same_weights(base, whole["model"], atol=1e-6)
    assert whole["optimizer"]["state"]  # Adam's moments are in it too


def test_dpo_lora_sharded_on_two_processes_equals_one_process_on_the_global_batch(tmp_path):
    """DPO with the adapter-off base as the reference, computed through the sharded model by both processes.
    The pairs' lengths differ, so the runs pad and round differently (see the DDP test in tests/commands):
    a tenth of one Adam step (lr 1e-3) on the weights."""
    from baichuan_tune.data.builtin_pref import demo_preference_records

    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps(demo_preference_records(8), ensure_ascii=False), encoding="utf-8")
    common = ["--dataset", str(pairs), "--cutoff_len", "32", "--lora_dropout", "0", "--learning_rate", "1e-3",
              "--max_steps", "2", *FAST]
    run_cli("dpo", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    run_cli("dpo", [*common, "--per_device_train_batch_size", "2", "--parallel", "fsdp",
                    "--output_dir", str(tmp_path / "two")], processes=2)
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert_same_weights(a, b, atol=1e-4)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for key in ("loss", "accuracy", "margin"):
        assert [r[key] for r in two if "loss" in r] == pytest.approx([r[key] for r in one if "loss" in r], abs=1e-4)


def test_rm_full_sharded_with_a_held_out_split_equals_one_process(tmp_path):
    """A full reward model (backbone and value head in one sharded model): the weights, the head and the
    held-out numbers (evaluated through the sharded model, shared out over both processes) are one
    process's. Differently padded pairs as for dpo: a fifth of one Adam step (lr 1e-4) on the weights."""
    from baichuan_tune.data.builtin_pref import demo_preference_records

    pairs = tmp_path / "p.json"
    pairs.write_text(json.dumps(demo_preference_records(12), ensure_ascii=False), encoding="utf-8")
    common = ["--dataset", str(pairs), "--cutoff_len", "32", "--max_steps", "2", "--val_size", "4",
              "--learning_rate", "1e-4", "--finetuning_type", "full", "--save_dtype", "fp32", *FAST]
    run_cli("rm", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    run_cli("rm", [*common, "--per_device_train_batch_size", "2", "--parallel", "fsdp",
                   "--output_dir", str(tmp_path / "two")], processes=2)
    for name in ("model.safetensors", "value_head.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("one", "two"))
        # The pairwise loss -log sigmoid(r_chosen - r_rejected) does not depend on the value head's bias:
        # its gradient is 0 up to rounding, which AdamW turns into steps of +-lr either way. Not compared.
        a.pop("summary.bias", None), b.pop("summary.bias", None)
        assert_same_weights(a, b, atol=2e-5)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    for key in ("loss", "eval_loss", "eval_accuracy"):
        assert [r[key] for r in two if key in r] == pytest.approx([r[key] for r in one if key in r], abs=1e-4)
    evals = [r for r in two if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[1]["eval_loss"] < evals[0]["eval_loss"] - 0.05  # it trained


def test_qlora_sharded_equals_ddp_on_the_same_batches(tmp_path):
    """NF4 base weights stored in the compute dtype and sharded: the adapter and losses of DDP on the same
    2 x 2 samples. (Against one process on batches of 4, DDP and FSDP2 alike differ by half an Adam step here:
    the 4-bit layers compute in bf16 and round a batch of 4 otherwise than two of 2.)"""
    common = sft_args(write_texts(tmp_path / "t.json", 12), "--finetuning_type", "qlora", "--learning_rate", "1e-3",
                      "--max_steps", "3", "--per_device_train_batch_size", "2")
    run_cli("sft", [*common, "--output_dir", str(tmp_path / "ddp")], processes=2)
    run_cli("sft", [*common, "--parallel", "fsdp", "--output_dir", str(tmp_path / "fsdp")], processes=2)
    a = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k)
    assert_same_weights(a, b, atol=5e-5)
    # The losses go through bf16 4-bit matmuls too: 1e-4 of the loss, well under one bf16 rounding step (4e-3).
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "ddp"), rel=1e-4)


def test_sft_freeze_with_gradient_checkpointing_sharded_equals_one_process(tmp_path):
    """Freeze (the last decoder layer trained, the rest frozen and sharded too) under recomputation: the gathered
    model in the published layout and the losses are one process's on batches of 4."""
    common = sft_args(write_texts(tmp_path / "t.json", 12), "--finetuning_type", "freeze", "--freeze_trainable_layers",
                      "1", "--gradient_checkpointing", "true", "--save_dtype", "fp32", "--learning_rate", "1e-4",
                      "--max_steps", "2", "--save_steps", "1")
    run_cli("sft", [*common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])
    run_cli("sft", [*common, "--per_device_train_batch_size", "2", "--parallel", "fsdp",
                    "--output_dir", str(tmp_path / "two")], processes=2)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("one", "two"))
    first = load_file(str(tmp_path / "one" / "checkpoint-1" / "trainable.safetensors"))  # the trained layer only
    assert first and max((a[k] - first[k]).abs().max() for k in first) > 1e-5  # the second step moved it
    assert_same_weights(a, b, atol=1e-6)
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-5)


def test_kto_lora_sharded_equals_ddp_on_two_processes(tmp_path):
    """KTO (the adapter-off base as the reference, z0 averaged over the processes) sharded against DDP on the
    same 2 x 2 labelled answers: the adapter and the logged loss, accuracy and KL estimate agree."""
    from baichuan_tune.data.builtin_pref import demo_preference_records

    pairs = tmp_path / "p.json"  # a paired file: kto splits it into desirable and undesirable answers
    pairs.write_text(json.dumps(demo_preference_records(8), ensure_ascii=False), encoding="utf-8")
    common = ["--dataset", str(pairs), "--cutoff_len", "32", "--lora_dropout", "0", "--learning_rate", "1e-3",
              "--max_steps", "2", "--per_device_train_batch_size", "2", *FAST]
    run_cli("kto", [*common, "--output_dir", str(tmp_path / "ddp")], processes=2)
    two = run_cli("kto", [*common, "--parallel", "fsdp", "--output_dir", str(tmp_path / "fsdp")], processes=2)
    assert "weights sharded (FSDP2)" in two.stdout + two.stderr
    a = load_file(str(tmp_path / "ddp" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    assert_same_weights(a, b, atol=1e-5)
    one, two = read_log(tmp_path / "ddp"), read_log(tmp_path / "fsdp")
    for key in ("loss", "accuracy", "kl"):
        assert [r[key] for r in two if "loss" in r] == pytest.approx([r[key] for r in one if "loss" in r], abs=1e-5)


ONLINE = ["--finetuning_type", "lora", "--max_new_tokens", "4", "--learning_rate", "1e-3", "--max_steps", "2",
          "--val_size", "4", "--per_device_train_batch_size", "4", "--reward_function",
          "baichuan_tune.rewards:chinese_ratio", "--plot_loss", "false", "--report_to", "none", "--device", "cpu",
          "--logging_steps", "1", "--model", "default"]


def assert_online_runs_agree(ddp: Path, fsdp: Path, keys: tuple[str, ...], weights: tuple[str, ...]) -> None:
    """Each process samples its share with its own seeded generator in both runs, so the same answers come out
    and everything downstream is deterministic: the logged figures and the saved weights must agree."""
    one, two = read_log(ddp), read_log(fsdp)
    for key in keys:
        a, b = [r[key] for r in one if key in r], [r[key] for r in two if key in r]
        assert a and b == pytest.approx(a, abs=1e-4), key
    assert [r["step"] for r in two if "eval_reward" in r] == [0, 2]
    for name in weights:
        a, b = load_file(str(ddp / name)), load_file(str(fsdp / name))
        assert_same_weights(a, b, atol=1e-4)
    a = load_file(str(ddp / "adapter_model.safetensors"))
    assert any(v.abs().max() > 1e-4 for k, v in a.items() if "lora_B" in k)  # it trained
    assert not any(".default." in k for k in load_file(str(fsdp / "adapter_model.safetensors")))


def test_ppo_lora_sharded_equals_ddp_on_two_processes(tmp_path):
    """PPO with the policy and its value head (in the root unit) sharded: the rollouts and held-out answers are
    generated with the weights gathered on each process, the experience and the updates go through the shards.
    The rewards, KL, losses, the adapter and the critic head are DDP's on the same 2 x 4 answers."""
    common = [*ONLINE, "--rollout_batch_size", "8", "--ppo_epochs", "2"]
    run_cli("ppo", [*common, "--output_dir", str(tmp_path / "ddp")], processes=2)
    two = run_cli("ppo", [*common, "--parallel", "fsdp", "--output_dir", str(tmp_path / "fsdp")], processes=2)
    assert "weights sharded (FSDP2)" in two.stdout + two.stderr
    assert_online_runs_agree(tmp_path / "ddp", tmp_path / "fsdp",
                             ("reward", "kl", "policy_loss", "value_loss", "grad_norm", "eval_reward",
                              "eval_response_length"),
                             ("adapter_model.safetensors", "critic/value_head.safetensors"))


def test_grpo_lora_sharded_equals_ddp_on_two_processes(tmp_path):
    """GRPO (2 answers per prompt, a KL term to the adapter-off base) sharded against DDP on 2 processes: the
    rewards, KL, clip fractions, held-out numbers and the adapter agree."""
    common = [*ONLINE, "--rollout_batch_size", "4", "--num_generations", "2", "--beta", "0.04"]
    run_cli("grpo", [*common, "--output_dir", str(tmp_path / "ddp")], processes=2)
    two = run_cli("grpo", [*common, "--parallel", "fsdp", "--output_dir", str(tmp_path / "fsdp")], processes=2)
    assert "weights sharded (FSDP2)" in two.stdout + two.stderr
    assert_online_runs_agree(tmp_path / "ddp", tmp_path / "fsdp",
                             ("reward", "kl", "loss", "kl_k3", "grad_norm", "eval_reward", "eval_response_length"),
                             ("adapter_model.safetensors",))


def test_grpo_with_a_reward_adapter_sharded_equals_ddp(tmp_path):
    """A LoRA reward model on the same base is a second adapter of the sharded policy, scored with the weights
    gathered for the rollout: its scores, the weighted reward and the policy adapter (without the reward
    adapter) are DDP's."""
    from baichuan_tune.commands import rm
    from baichuan_tune.data.builtin_pref import demo_preference_records

    pairs = tmp_path / "pairs.json"
    pairs.write_text(json.dumps(demo_preference_records(16), ensure_ascii=False), encoding="utf-8")
    assert rm.main(["--dataset", str(pairs), "--max_steps", "2", "--cutoff_len", "48", "--learning_rate", "1e-2",
                    "--output_dir", str(tmp_path / "rm"), "--plot_loss", "false", *FAST]) == 0
    common = [*ONLINE, "--rollout_batch_size", "4", "--num_generations", "2", "--reward_model", str(tmp_path / "rm"),
              "--reward_weights", "0.5,1.0"]
    run_cli("grpo", [*common, "--output_dir", str(tmp_path / "ddp")], processes=2)
    run_cli("grpo", [*common, "--parallel", "fsdp", "--output_dir", str(tmp_path / "fsdp")], processes=2)
    assert_online_runs_agree(tmp_path / "ddp", tmp_path / "fsdp", ("reward", "reward_model", "loss", "grad_norm"),
                             ("adapter_model.safetensors",))
    assert not any(".reward." in k for k in load_file(str(tmp_path / "fsdp" / "adapter_model.safetensors")))


def test_a_sharded_ppo_lora_run_resumed_from_its_checkpoint_ends_alike(tmp_path):
    """Resuming a sharded LoRA checkpoint (the frozen base is not in it) with the adaptive KL controller's state:
    a run that restarts from checkpoint-2 of an uninterrupted one ends with the same adapter, critic head and
    step figures."""
    import shutil

    common = [*ONLINE, "--max_steps", "4", "--save_steps", "2", "--rollout_batch_size", "8", "--ppo_epochs", "2",
              "--adaptive_kl", "true", "--kl_target", "0.5", "--kl_horizon", "100", "--parallel", "fsdp"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("ppo", [*common, "--output_dir", str(straight)], processes=2)
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    run_cli("ppo", [*common, "--output_dir", str(resumed), "--resume", "true"], processes=2)
    for name in ("adapter_model.safetensors", "critic/value_head.safetensors"):
        assert_same_weights(load_file(str(straight / name)), load_file(str(resumed / name)), atol=0)
    figures = [[(r["step"], r["reward"], r["kl_coef"]) for r in read_log(out) if "reward" in r and r["step"] > 2]
               for out in (straight, resumed)]
    assert len(figures[0]) == 2 and figures[1] == figures[0]
    assert figures[0][-1][2] != 0.05  # the controller moved, so its restored state mattered


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.is_file() else []


def test_a_killed_sharded_run_resumes_to_the_same_weights(tmp_path):
    """SIGKILL to one worker after a sharded checkpoint (torchrun then stops the other): --resume true on 2
    processes finishes with the weights of a run that was never interrupted; 1 process is refused."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs /proc to find the worker processes")
    common = sft_args(write_texts(tmp_path / "t.json", 40), "--finetuning_type", "full", "--save_dtype", "fp32",
                      "--learning_rate", "1e-4", "--num_train_epochs", "1", "--per_device_train_batch_size", "2",
                      "--parallel", "fsdp", "--save_steps", "2")
    run_cli("sft", [*common, "--output_dir", str(tmp_path / "straight")], processes=2)
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "baichuan_tune.cli", "sft", *common, "--output_dir", str(out)]
    agent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "checkpoint-4" / "trainer_state.json").is_file() and time.time() < deadline:
        time.sleep(0.02)
    workers = _children(agent.pid)
    assert workers and agent.poll() is None, "the run ended before it could be killed"
    os.kill(workers[-1], signal.SIGKILL)
    assert agent.wait(timeout=120) != 0
    assert not (out / "train_results.json").exists() and (out / "checkpoint-4").is_dir()

    with pytest.raises(AssertionError, match="resume it with --parallel fsdp on as many"):
        run_cli("sft", [*common, "--output_dir", str(out), "--resume", "true"])
    done = run_cli("sft", [*common, "--output_dir", str(out), "--resume", "true"], processes=2)
    results = json.loads((out / "train_results.json").read_text())
    assert results["resumed_from"] is not None and results["global_step"] == 10, done.stdout[-500:]
    assert_same_weights(load_file(str(tmp_path / "straight" / "model.safetensors")),
                        load_file(str(out / "model.safetensors")), atol=0)
    assert losses(out) == losses(tmp_path / "straight")
    assert not [p for p in out.glob("checkpoint-10*")]  # the end state was kept only until the result was written


@pytest.mark.parametrize("command, flags, message", [
    ("sft", ["--fp16", "true"], "--parallel fsdp does not support --fp16"),
    ("sft", ["--optim", "adamw_8bit"], "--parallel fsdp needs --optim adamw_torch"),
    ("dpo", ["--finetuning_type", "qlora", "--quantization_bit", "8"], "--parallel fsdp shards 4-bit QLoRA only"),
])
def test_what_fsdp_cannot_shard_is_refused_before_loading(command, flags, message, tmp_path, capsys):
    from baichuan_tune import cli

    assert cli.main([command, "--parallel", "fsdp", "--output_dir", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
