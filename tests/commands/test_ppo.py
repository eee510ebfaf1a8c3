"""`baichuan-tune ppo` on CPU: a rule reward rises on held-out prompts while the KL penalty keeps the policy
near the reference; log-prob bookkeeping, the shared reward adapter, resume and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from baichuan_tune import cli
from baichuan_tune.train import rlhf
from baichuan_tune.train.reward_setup import load_reward
from baichuan_tune.data.builtin_pref import demo_preference_records
from baichuan_tune.commands import ppo
from baichuan_tune.config import ConfigError, parse_config

FAST = ["--report_to", "none"]
TINY = ["--model", "default", "--finetuning_type", "lora", "--device", "cpu", "--rollout_batch_size", "8",
        "--per_device_train_batch_size", "4", "--max_new_tokens", "4", "--ppo_epochs", "1", "--logging_steps", "1",
        "--learning_rate", "1e-3", "--val_size", "0", *FAST]


pytestmark = pytest.mark.usefixtures("one_thread")


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]


def steps(log: list[dict], key: str) -> list[float]:
    return [r[key] for r in log if key in r and "eval_reward" not in r]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAICHUAN_TUNE_HOME", str(tmp_path_factory.getbasetemp() / "baichuan_tune_home"))
        yield tmp_path_factory.mktemp("ppo")


@pytest.fixture(scope="module")
def sft_model(home):
    """RLHF starts from a fine-tuned model: 40 steps of `baichuan-tune sft` (full) on the demo data, about 8 s."""
    from baichuan_tune.commands import sft

    out = home / "sft"
    assert sft.main(["--model", "default", "--dataset", "demo", "--finetuning_type", "full", "--max_steps", "40",
                     "--learning_rate", "3e-3", "--warmup_ratio", "0.1", "--per_device_train_batch_size", "16",
                     "--cutoff_len", "64", "--output_dir", str(out), "--cache_dir", "none",
                     "--preprocessing_num_workers", "1", "--device", "cpu", *FAST]) == 0
    return out


def demo_run(home, sft_model, name: str, *extra: str) -> Path:
    """The built-in PPO demo (rule reward: share of Chinese characters) from the sft model, 16 steps."""
    out = home / name
    assert ppo.main(["--model", str(sft_model), "--output_dir", str(out), "--max_steps", "16", "--eval_steps", "8",
                     *extra, *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def penalised(home, sft_model):
    return demo_run(home, sft_model, "penalised")


@pytest.fixture(scope="module")
def no_penalty(home, sft_model):
    return demo_run(home, sft_model, "no_penalty", "--kl_coef", "0")


def test_demo_raises_the_reward_while_the_kl_stays_bounded(penalised):
    results = json.loads((penalised / "train_results.json").read_text())
    log = read_log(penalised)
    rewards, kls = steps(log, "reward"), steps(log, "kl")
    assert len(rewards) == 16
    # Sampled answers on the training prompts: the mean reward of the last 5 steps clearly beats the first 5.
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 >= 0.1, rewards
    # Held-out prompts (greedy answers, never trained on): the rule's score rises too.
    assert results["eval_reward"] - results["eval_reward_before"] >= 0.15, results
    # The KL to the reference (nats per answer of up to 12 tokens) stays moderate.
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # the first rollout comes from the reference itself
    assert max(kls) < 15.0, kls
    assert {"policy_loss", "value_loss", "entropy", "clip_fraction", "approx_kl", "response_length", "kl_coef",
            "rollout_tokens_per_s", "update_s"} <= set(log[1])
    for name in ("adapter_config.json", "adapter_model.safetensors", "critic/value_head.safetensors", "ppo_reward.png",
                 "ppo_kl.png", "demo_prompts.jsonl", "config.yaml"):
        assert (penalised / name).is_file(), name


def test_without_the_penalty_the_policy_drifts_further(penalised, no_penalty):
    """The same run with kl_coef 0 ends further from the reference: the penalty is what bounds the KL."""
    kl_penalised, kl_free = steps(read_log(penalised), "kl"), steps(read_log(no_penalty), "kl")
    assert max(kl_free) > 1.2 * max(kl_penalised), (kl_free, kl_penalised)
    assert sum(kl_free[-8:]) > 1.2 * sum(kl_penalised[-8:]), (kl_free, kl_penalised)


@pytest.fixture(scope="module")
def small_rm(tmp_path_factory):
    """A reward model trained for two steps (its scores only need to be its own, not good)."""
    from baichuan_tune.commands import rm

    root = tmp_path_factory.mktemp("ppo_rm")
    pairs = root / "pairs.json"
    pairs.write_text(json.dumps(demo_preference_records(16), ensure_ascii=False))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BAICHUAN_TUNE_HOME", str(tmp_path_factory.getbasetemp() / "baichuan_tune_home"))
        assert rm.main(["--model", "default", "--dataset", str(pairs), "--max_steps", "2", "--cutoff_len", "48",
                        "--learning_rate", "1e-2", "--output_dir", str(root / "rm"), "--cache_dir", "none",
                        "--preprocessing_num_workers", "1", "--device", "cpu", *FAST]) == 0
    return root / "rm"


def test_shared_reward_adapter_scores_like_the_separate_reward_model(small_rm):
    """The reward model as a second adapter on the policy's base gives the scores of the reward model loaded
    on its own, and leaves the policy (active adapter, trainable flags, outputs) as it was."""
    from baichuan_tune.train.training import load_trainable
    from baichuan_tune.data.templates import get_template
    from baichuan_tune.models.value_head import RewardScorer, load_reward_model

    cfg = parse_config(ppo.PPOConfig, ["--reward_model", str(small_rm), "--model", "default", "--device", "cpu"])
    lm, tok = load_trainable(cfg, torch.device("cpu"), None)
    reward = load_reward(cfg.reward_model, cfg.reward_function, {}, lm=lm, base_model=cfg.model,
                         finetuning_type=cfg.finetuning_type, template=cfg.template, batch_size=2,
                         device=torch.device("cpu"), amp_dtype=None)
    assert isinstance(reward, rlhf.SharedAdapterReward)
    prompts = ["What is the capital of Japan?", "你是谁？"]
    answers = ["The capital of Japan is Tokyo.", "我不知道。"]
    template = get_template("baichuan2")
    prompt_ids = [template.encode_prompt(tok, [("user", p)]) for p in prompts]
    query, query_mask = rlhf.left_pad(prompt_ids, 0, "cpu")
    answer_ids = [tok.encode(a, add_special_tokens=False) + [2] for a in answers]
    width = max(map(len, answer_ids))
    response = torch.tensor([a + [0] * (width - len(a)) for a in answer_ids])
    amask = rlhf.response_mask(response, 2)
    rollout = rlhf.Rollout(torch.cat([query, response], 1), torch.cat([query_mask, amask], 1), amask, prompts, answers)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    ids = torch.tensor([[1, 195, 300, 196]])
    with torch.no_grad():
        before = lm(input_ids=ids).logits
    shared = reward(rollout)
    rm_model, rm_tok = load_reward_model(small_rm, dtype="fp32")
    separate = RewardScorer(rm_model, rm_tok, "baichuan2", 48).score([[("user", p)] for p in prompts], answers)
    torch.testing.assert_close(shared, torch.tensor(separate), rtol=1e-4, atol=1e-4)
    assert lm.active_adapter == "default"
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == trainable
    assert not any("reward" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, before)


def test_ppo_with_a_reward_model_runs_and_saves_the_policy_alone(small_rm, tmp_path):
    out = tmp_path / "ppo_rm"
    assert ppo.main([*TINY, "--reward_model", str(small_rm), "--max_steps", "2", "--output_dir", str(out)]) == 0
    assert not (out / "reward").exists()  # the reward adapter is not part of the result
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert keys and not any("reward" in k for k in keys)
    assert len(steps(read_log(out), "reward")) == 2


def test_full_finetuning_keeps_a_frozen_reference(tmp_path):
    out = tmp_path / "full"
    assert ppo.main([*TINY, "--finetuning_type", "full", "--learning_rate", "1e-4", "--max_steps", "2",
                     "--reward_function", "baichuan_tune.rewards:chinese_ratio", "--output_dir", str(out)]) == 0
    kls = steps(read_log(out), "kl")
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and kls[1] != 0.0  # the copy stayed put while the policy moved
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()


def test_resume_continues_exactly(tmp_path, capsys):
    args = [*TINY, "--reward_function", "baichuan_tune.rewards:chinese_ratio", "--max_steps", "4", "--save_steps", "2",
            "--adaptive_kl", "true", "--kl_horizon", "100", "--kl_target", "0.5", "--val_size", "4", "--eval_steps", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert ppo.main([*args, "--output_dir", str(straight)]) == 0
    assert ppo.main([*args, "--output_dir", str(resumed)]) == 0
    (resumed / "adapter_model.safetensors").unlink()
    assert [p.name for p in resumed.glob("checkpoint-*")] == ["checkpoint-2"]
    capsys.readouterr()
    assert ppo.main([*args, "--output_dir", str(resumed), "--resume", "true"]) == 0
    assert f"resumed from {resumed / 'checkpoint-2'} (step 2)" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "critic/value_head.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    a, b = read_log(straight), read_log(resumed)
    assert steps(a, "kl_coef")[-1] == steps(b, "kl_coef")[-1] != 0.05  # the adaptive coefficient moved and resumed
    results = [json.loads((folder / "train_results.json").read_text()) for folder in (straight, resumed)]
    assert "eval_reward_before" in results[0]
    assert [r["eval_reward_before"] for r in results] == [results[0]["eval_reward_before"]] * 2
    assert [r["resumed_from"] for r in results] == [None, str(resumed / "checkpoint-2")]


def test_reward_function_errors(tmp_path, capsys):
    with pytest.raises(ConfigError, match="exactly one"):
        load_reward("", "", {}, lm=None, base_model="default", finetuning_type="lora", template="baichuan2",
                    batch_size=1, device=torch.device("cpu"), amp_dtype=None)
    for spec, message in (("no_colon", "module:function"), ("baichuan_tune.rewards:nope", "no function 'nope'"),
                          ("missing_file.py:f", "not found"), ("no_such_module_xyz:f", "cannot import")):
        code = cli.main(["ppo", *TINY, "--reward_function", spec, "--output_dir", str(tmp_path / "o"), "--max_steps", "1"])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (spec, err)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_demo_on_cuda_in_bf16_raises_the_reward(home, sft_model):
    """The CPU demo's claims hold on a GPU under bf16 autocast: reward up on held-out prompts, KL bounded."""
    out = demo_run(home, sft_model, "cuda_bf16", "--device", "cuda", "--bf16", "true")
    results = json.loads((out / "train_results.json").read_text())
    kls = steps(read_log(out), "kl")
    assert results["eval_reward"] - results["eval_reward_before"] >= 0.15, results
    assert max(kls) < 15.0, kls


def test_two_processes_under_torchrun_share_the_rollouts(tmp_path):
    """ppo under torchrun (2 CPU processes, gloo): each process samples 4 of the 8 answers of a step; the logged
    reward is the mean over all 8 and the held-out reward over both halves of the held-out prompts."""
    from launch import read_log, run_cli

    out = tmp_path / "two"
    done = run_cli("ppo", [*TINY, "--reward_function", "baichuan_tune.rewards:chinese_ratio", "--max_steps", "2",
                    "--val_size", "4", "--output_dir", str(out)], processes=2)
    log = read_log(out)
    assert len(steps(log, "reward")) == 2 and all(0.0 <= r <= 1.0 for r in steps(log, "reward"))
    assert [r["step"] for r in log if "eval_reward" in r] == [0, 2]
    assert "2 processes, global batch 8" in done.stdout + done.stderr
    results = json.loads((out / "train_results.json").read_text())
    assert results["global_step"] == 2 and "eval_reward_before" in results
    assert (out / "adapter_model.safetensors").is_file() and (out / "critic" / "value_head.safetensors").is_file()
