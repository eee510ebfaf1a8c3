"""GRPO machinery for `baichuan-tune grpo` and `benchmarks/bench_align.py`: groups of rollouts, weighted
rewards, group-relative advantages and the clipped mini-batch loss (Shao et al. 2024, DeepSeekMath sec. 4).

One GRPO step: sample G answers to each prompt (batched, KV cache), score them (reward functions, each
weighted, and/or a reward model), turn each answer's reward into its advantage against its own group
(losses.group_advantages), record the sampling policy's and the reference's log-probs, then run
`grpo_epochs` passes of the clipped objective (losses.grpo_loss) over mini-batches. No critic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import losses as L
from .training import autocast
from ..models.value_head import causal_lm, hidden_states


class ResponseLM(nn.Module):
    """The policy as the engine trains it: sequences [B, P+R] (answer last) -> logits [B, R, V] of the answer tokens.

    A module of its own (not a function of the LM) so that DDP wraps the whole forward."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, response_len: int) -> torch.Tensor:
        hidden = hidden_states(self.lm, input_ids, attention_mask)  # [B, P+R, H]
        return causal_lm(self.lm).lm_head(hidden[:, -response_len - 1 : -1])  # position t predicts token t+1


@torch.no_grad()
def response_logps(lm, input_ids, attention_mask, response_len: int, temperature: float, batch_size: int, device,
                   amp_dtype) -> torch.Tensor:
    """Log-probs [B, R] of the answer tokens under `lm`, `batch_size` rows per forward."""
    model, parts = (lm if isinstance(lm, ResponseLM) else ResponseLM(lm)), []
    for start in range(0, input_ids.size(0), max(batch_size, 1)):
        rows = slice(start, start + batch_size)
        with autocast(device, amp_dtype):
            logits = model(input_ids[rows], attention_mask[rows], response_len)
        parts.append(L.token_logps(logits.float() / temperature, input_ids[rows, -response_len:]))
    return torch.cat(parts)


class WeightedReward:
    """sum_k w_k r_k(answer) over rule rewards and/or a reward model; each part is kept for the log."""

    def __init__(self, parts: list[tuple[str, object]], weights: list[float]):
        self.parts, self.weights = parts, weights

    def __call__(self, rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = {name: fn(rollout).float().cpu() for name, fn in self.parts}
        total = sum(w * scores[name] for (name, _), w in zip(self.parts, self.weights))
        return total, scores

    def describe(self) -> str:
        return " + ".join(f"{w:g} x {name}" for (name, _), w in zip(self.parts, self.weights))


@dataclass
class GroupExperience:
    """One step's answers with everything the updates need, all detached. [N, P+R], [N, R] or [N], N = P x G."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor  # of the sampling policy
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor

    KEYS = ("input_ids", "attention_mask", "response_mask", "logprobs", "ref_logprobs", "advantages")

    def batch(self, rows: list[int]) -> dict:
        idx = torch.tensor(rows, device=self.input_ids.device)
        return {key: getattr(self, key)[idx] for key in self.KEYS}


def group_experience(lm, reference, rollout, rewards: torch.Tensor, opts, batch_size: int, device,
                     amp_dtype) -> GroupExperience:
    """Advantages of `rewards` ([N], groups of opts.num_generations consecutive) and the log-probs of the
    sampled answers under the policy and the reference (a frozen copy, or `lm`'s base with adapters off).
    `lm`: the LM or the ResponseLM around it (a sharded one must be called through its root)."""
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_len, opts.temperature, batch_size, device,
            amp_dtype)
    inner = lm.lm if isinstance(lm, ResponseLM) else lm
    was_training = lm.training
    lm.eval()
    logprobs = response_logps(lm, *args)
    if reference is not None:
        ref_logprobs = response_logps(reference, *args)
    else:
        with inner.disable_adapter():
            ref_logprobs = response_logps(lm, *args)
    lm.train(was_training)
    advantages = L.group_advantages(rewards.to(device), opts.num_generations, scale=opts.scale_rewards)
    mask = rollout.response_mask.float()
    return GroupExperience(rollout.input_ids, rollout.attention_mask, mask, logprobs * mask, ref_logprobs * mask,
                           advantages)


def grpo_minibatch_loss(model, batch: dict, opts) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO loss of one mini-batch (`model` a ResponseLM, DDP-wrapped or not), with its metrics."""
    mask = batch["response_mask"]
    logits = model(batch["input_ids"], batch["attention_mask"], mask.size(1)).float() / opts.temperature
    logprobs = L.token_logps(logits, batch["input_ids"][:, -mask.size(1) :])
    ref = batch["ref_logprobs"] if opts.beta > 0 else None  # beta 0: no KL term (0 x a huge exp would be NaN)
    out = L.grpo_loss(logprobs, batch["logprobs"], batch["advantages"], mask, ref, clip_range=opts.cliprange,
                      beta=opts.beta, normalization=opts.loss_normalization)
    metrics = {"clip_fraction": float(out.clip_fraction)}
    if opts.beta > 0:
        metrics["kl_k3"] = float(out.kl)
    return out.loss, metrics


def group_statistics(exp: GroupExperience, total: torch.Tensor, scores: dict, group_size: int) -> dict:
    """This process's step figures: within-group reward spread, groups without any, KL per answer, lengths."""
    grouped = total.float().view(-1, group_size)
    spread = grouped.std(dim=1, unbiased=False)
    return {"reward_group_std": float(spread.mean()), "zero_std_groups": float((spread < 1e-6).float().mean()),
            "kl": float((exp.logprobs - exp.ref_logprobs).sum(1).mean()),
            "response_length": float(exp.response_mask.sum(1).mean()),
            **{f"reward_{name}": float(v.mean()) for name, v in scores.items()}}
