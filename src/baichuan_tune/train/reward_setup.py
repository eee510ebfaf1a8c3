"""The reward an online method (`ppo`, `grpo`) optimises, built from its options: a rule function, the reward
model as a second adapter on the policy's base, or the reward model loaded as a separate model."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


def load_reward(reward_model: str, reward_function: str, reward_kwargs: dict, *, lm, base_model: str,
                finetuning_type: str, template: str, batch_size: int, device, amp_dtype):
    """Exactly one of `reward_model` (a folder from `baichuan-tune rm`) and `reward_function` (module:function).

    The reward model shares the policy's base as a second adapter when it is an adapter trained on the same
    base in the same template and the policy is LoRA/QLoRA: one copy of the weights; otherwise it is loaded
    on its own and scores decoded text."""
    import torch

    from ..models.value_head import RewardScorer, load_head, load_reward_model, read_reward_meta
    from . import rlhf
    from .alignment import model_reference

    if bool(reward_model) == bool(reward_function):
        raise ConfigError("give exactly one of --reward_model DIR and --reward_function module:function")
    if reward_function:
        return rlhf.FunctionReward(reward_function, reward_kwargs)
    meta = read_reward_meta(Path(reward_model))
    shared = (meta["adapter"] and finetuning_type in ("lora", "qlora") and meta.get("template") == template
              and meta["base_model"] == model_reference(base_model))
    if shared:
        lm.load_adapter(reward_model, adapter_name="reward", is_trainable=False)
        head = load_head(Path(reward_model), meta["hidden_size"]).to(device)
        return rlhf.SharedAdapterReward(lm, head, batch_size)
    dtype = "bf16" if amp_dtype == torch.bfloat16 else "fp16" if amp_dtype == torch.float16 else "auto"
    rm, rm_tokenizer = load_reward_model(reward_model, dtype=dtype, device=str(device))
    scorer = RewardScorer(rm, rm_tokenizer, meta.get("template", "baichuan2"), meta.get("cutoff_len", 0), batch_size)
    return rlhf.SeparateModelReward(scorer)


def describe_reward(reward) -> str:
    from . import rlhf

    if isinstance(reward, rlhf.FunctionReward):
        return f"rule {reward.spec}"
    if isinstance(reward, rlhf.SharedAdapterReward):
        return "reward model as a second adapter on the policy's base"
    return "reward model loaded separately"


def parse_reward_kwargs(items: list[str]) -> dict:
    """["max_tokens=16", "keyword=Paris"] -> {"max_tokens": 16, "keyword": "Paris"} (JSON values when they parse)."""
    kwargs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"reward_kwargs: expected key=value, got '{item}'")
        try:
            kwargs[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.strip()] = value
    return kwargs
