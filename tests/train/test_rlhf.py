"""PPO pieces by hand: answer masks, left padding, log-prob bookkeeping of an experience batch, rule rewards."""

from __future__ import annotations

import pytest
import torch

from baichuan_tune.train import rlhf
from baichuan_tune.config import ConfigError


def test_response_mask_by_hand():
    response = torch.tensor([[5, 2, 7, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert rlhf.response_mask(response, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    ids, mask = rlhf.left_pad([[4, 5, 6], [7]], 0, "cpu")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def _policy(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from baichuan_tune.models.value_head import PolicyWithValue, ValueHead
    from conftest import tiny_model

    base = tiny_model(seed=seed)
    lm = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.0, target_modules=["W_pack", "down_proj"]))
    torch.manual_seed(seed)
    for name, p in lm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    return PolicyWithValue(lm, ValueHead(64))


def test_experience_log_probs_match_a_hand_gather():
    """Answer log-probs come from the logits one position earlier; the reference is the adapter-off base,
    and the training-mode forward reproduces the rollout's log-probs (PPO's first ratio is exactly 1)."""
    from conftest import tiny_model

    policy = _policy()
    ids = torch.tensor([[0, 0, 11, 12, 13, 40, 41, 2], [0, 21, 22, 23, 24, 50, 2, 0]])  # left-padded prompt + answer
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 0]])
    answer_mask = mask[:, -3:]
    rollout = rlhf.Rollout(ids, mask, answer_mask, ["p", "q"], ["a", "b"])
    opts = rlhf.PPOOptions(temperature=1.0, gamma=1.0, lam=1.0, whiten_advantages=False)
    exp = rlhf.make_experience(policy, None, rollout, torch.tensor([1.0, -1.0]), opts, 0.1, torch.device("cpu"), None,
                               batch_size=1)

    def gather(model, row, t):
        with torch.no_grad():
            logits = model(input_ids=ids[row : row + 1], attention_mask=mask[row : row + 1]).logits[0]
        return float(torch.log_softmax(logits[t - 1], -1)[ids[row, t]])

    fresh_base = tiny_model(seed=0)  # the same weights without any adapter
    for row in range(2):
        for k, t in enumerate(range(5, 8)):
            if answer_mask[row, k]:
                assert exp.logprobs[row, k].item() == pytest.approx(gather(policy.lm, row, t), abs=1e-4)
                assert exp.ref_logprobs[row, k].item() == pytest.approx(gather(fresh_base, row, t), abs=1e-4)
    assert exp.kl[1, 2] == 0 and exp.advantages[1, 2] == 0 and exp.values[1, 2] == 0  # past the eos: masked out
    # score on the last answer token (row 1: the eos at column 6, k = 1) and -0.1 * KL on every token
    kl = (exp.logprobs - exp.ref_logprobs) * answer_mask
    torch.testing.assert_close(exp.rewards[1, :2], -0.1 * kl[1, :2] + torch.tensor([0.0, -1.0]))
    policy.train()
    logits, _ = policy(ids, mask, 3)
    again = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, -3:, None]).squeeze(-1) * answer_mask
    torch.testing.assert_close(again.detach(), exp.logprobs * answer_mask, rtol=0, atol=1e-5)


def test_reward_function_from_a_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def score(prompts, responses, bonus=0.0, **kw):\n    return [len(r) + bonus for r in responses]\n")
    reward = rlhf.FunctionReward(f"{path}:score", {"bonus": 0.5})
    rollout = rlhf.Rollout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 1), ["a", "b"],
                           ["xy", "xyz"])
    assert reward(rollout).tolist() == [2.5, 3.5]


def test_reward_function_gets_only_the_arguments_it_takes(tmp_path):
    path = tmp_path / "plain.py"
    path.write_text("def score(prompts, responses):\n    return [float(len(r)) for r in responses]\n"
                    "def by_tokens(prompts, responses, response_lengths):\n    return response_lengths\n")
    rollout = rlhf.Rollout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.tensor([[1, 1], [1, 0]]),
                           ["a", "b"], ["xy", "xyz"])
    assert rlhf.FunctionReward(f"{path}:score")(rollout).tolist() == [2.0, 3.0]
    assert rlhf.FunctionReward(f"{path}:by_tokens")(rollout).tolist() == [2.0, 1.0]
    with pytest.raises(ConfigError, match=r"cannot be called as fn\(prompts, responses, bonus=...\)"):
        rlhf.FunctionReward(f"{path}:score", {"bonus": 1})  # refused when loaded, not after a rollout


def test_shared_adapter_reward_scores_in_eval_mode():
    """The reward adapter's LoRA dropout must not make one answer score differently each time."""
    from peft import LoraConfig

    from baichuan_tune.models.value_head import ValueHead

    policy = _policy()
    policy.lm.add_adapter("reward", LoraConfig(r=4, lora_dropout=0.5, target_modules=["W_pack", "down_proj"],
                                               init_lora_weights=False))
    policy.lm.set_adapter("default")
    ids = torch.tensor([[0, 11, 12, 13, 40, 41, 2], [21, 22, 23, 24, 50, 51, 52]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    rollout = rlhf.Rollout(ids, mask, mask[:, -3:], ["p", "q"], ["a", "b"])
    reward = rlhf.SharedAdapterReward(policy.lm, ValueHead(64), batch_size=2)
    policy.lm.train()
    first, second = reward(rollout), reward(rollout)
    assert policy.lm.training  # left as it was
    policy.lm.eval()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, reward(rollout), rtol=0, atol=0)


def test_reward_function_must_return_one_score_per_answer(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def score(prompts, responses, **kw):\n    return [1.0]\n")
    rollout = rlhf.Rollout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 1), ["a", "b"],
                           ["x", "y"])
    with pytest.raises(ConfigError, match="1 scores for 2 answers"):
        rlhf.FunctionReward(f"{path}:score")(rollout)


def test_bench_ppo_smoke_runs_fixed_length_answers():
    """benchmarks/bench_ppo.py on the tiny shape: every answer has exactly response_len tokens."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ppo.py"
    done = subprocess.run([sys.executable, str(script), "--preset", "tiny-baichuan2-7b", "--device", "cpu", "--steps", "1",
                           "--warmup", "0", "--batch", "3", "--prompt_len", "5", "--response_len", "6", "--mini_batch", "2"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["answer_tokens_per_step"] == 3 * 6
    assert report["rollout_tokens_per_s"] > 0 and report["update_s"] > 0


def test_separate_reward_model_sees_the_whole_prompt():
    """A reward model trained on system + history + question must be shown the same, not the last turn alone."""
    seen = []

    class Scorer:
        def score(self, turns, responses):
            seen.append((turns, responses))
            return [0.5] * len(responses)

    turns = [[("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "2+2?")]]
    rollout = rlhf.Rollout(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), torch.ones(1, 1), ["2+2?"], ["4"],
                           prompt_turns=turns)
    assert rlhf.SeparateModelReward(Scorer())(rollout).tolist() == [0.5]
    assert seen == [(turns, ["4"])]
