import pytest
import torch

from baichuan_tune.config import ConfigError
from baichuan_tune.train import rlhf
from baichuan_tune.train.reward_setup import describe_reward, load_reward, parse_reward_kwargs


def test_reward_kwargs_parse_json_values_and_keep_strings():
    assert parse_reward_kwargs(["max_tokens=16", "keyword=Paris", "x=1.5"]) == {"max_tokens": 16, "keyword": "Paris",
                                                                                 "x": 1.5}
    with pytest.raises(ConfigError, match="expected key=value, got 'nokey'"):
        parse_reward_kwargs(["nokey"])


def test_a_rule_reward_gets_its_kwargs_and_one_reward_is_required():
    reward = load_reward("", "baichuan_tune.rewards:contains_keyword", {"keyword": "Paris"}, lm=None,
                         base_model="default", finetuning_type="lora", template="baichuan2", batch_size=1,
                         device=torch.device("cpu"), amp_dtype=None)
    assert isinstance(reward, rlhf.FunctionReward) and describe_reward(reward).startswith("rule baichuan_tune")
    rollout = rlhf.Rollout(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2, 1), ["a", "b"],
                           ["in Paris", "in Rome"])
    assert reward(rollout).tolist()[0] > reward(rollout).tolist()[1]
    with pytest.raises(ConfigError, match="exactly one"):
        load_reward("rm", "m:f", {}, lm=None, base_model="default", finetuning_type="lora", template="baichuan2",
                    batch_size=1, device=torch.device("cpu"), amp_dtype=None)
