"""PPO machinery for `baichuan-tune ppo` and `benchmarks/bench_ppo.py`: rollouts, rewards, experience, updates.

One PPO step (Ouyang et al. 2022; Ziegler et al. 2019):
1. rollout: sample answers to a batch of prompts from the policy (batched, KV cache);
2. score: one reward per answer, from a reward model or a rule (a Python function);
3. experience: log-probs of the sampled tokens under the policy and the reference, values from the
   critic, per-token rewards -kl_coef * (logp - ref_logp) plus the score on the last answer token, GAE
   advantages (whitened) and returns;
4. update: several epochs of clipped policy and value losses over shuffled mini-batches.

Memory: with LoRA the policy is the `default` adapter of one PEFT model, the critic a value head on the
policy's hidden states, the reward model a second adapter (`reward`) plus its head on the same frozen
base, and the reference that base with the adapters switched off, so the base weights exist once.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

from . import losses as L
from ..config import ConfigError
from .training import autocast, optimizer_step
from ..options import PPOOptions  # noqa: F401  (defined there so that `ppo --help` needs no torch)
from ..models.value_head import PolicyWithValue, adapter_active, causal_lm, hidden_states


@dataclass
class Rollout:
    """Sampled answers: prompts left-padded to P tokens, answers right-padded to R tokens."""

    input_ids: torch.Tensor  # [B, P+R] prompt then answer
    attention_mask: torch.Tensor  # [B, P+R] 1 on prompt and answer tokens (up to and including eos)
    response_mask: torch.Tensor  # [B, R] 1 on answer tokens
    prompts: list[str]  # the prompt texts (last user turn), for rule rewards
    responses: list[str]  # decoded answers without special tokens
    seconds: float = 0.0
    prompt_turns: list | None = None  # each prompt's whole conversation [(role, text), ...] when known

    @property
    def response_len(self) -> int:
        return self.response_mask.size(1)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [B, P], mask [B, P]) padded on the left, so every answer starts at column P."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 up to and including the first eos of each row, 0 after it: [B, R] ids -> [B, R] long."""
    is_eos = (response == eos_id).long()
    eos_before = torch.cumsum(is_eos, dim=1) - is_eos  # eos tokens strictly before t
    return (eos_before == 0).long()


def rollout_generation_config(tokenizer, max_new_tokens: int, min_new_tokens: int, temperature: float, greedy: bool):
    """Sampling from softmax(logits / temperature) only: no top-k/top-p/repetition penalty, so the
    sampled tokens follow exactly the distribution whose log-probabilities PPO computes."""
    from transformers import GenerationConfig

    sampling = {} if greedy else {"temperature": temperature, "top_k": 0, "top_p": 1.0}
    return GenerationConfig(
        do_sample=not greedy, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, repetition_penalty=1.0,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id or 0,
        bos_token_id=tokenizer.bos_token_id, use_cache=True, **sampling,
    )


@torch.no_grad()
def generate_rollout(lm, tokenizer, prompt_ids: list[list[int]], prompts: list[str], generation_config,
                     prompt_turns: list | None = None, fast: bool | None = None) -> Rollout:
    """Sample one answer per prompt with the KV cache; `lm` is the policy (a PEFT model or a plain LM).
    `fast`: `fast_decode.decode`'s choice (None: the fast path on CUDA, transformers' generate otherwise)."""
    from ..serve.fast_decode import decode

    device = next(lm.parameters()).device
    query, query_mask = left_pad(prompt_ids, generation_config.pad_token_id, device)  # [B, P]
    was_training = lm.training
    lm.eval()
    start = time.perf_counter()
    answers = decode(lm, [list(p) for p in prompt_ids], generation_config, fast=fast)
    seconds = time.perf_counter() - start
    lm.train(was_training)
    response = torch.full((len(answers), max(len(a) for a in answers)), generation_config.pad_token_id,
                          dtype=torch.long)
    for row, answer in enumerate(answers):
        response[row, : len(answer)] = torch.tensor(answer, dtype=torch.long)
    response = response.to(device)  # [B, R]: after eos, padding, as generate() returns it
    mask = response_mask(response, generation_config.eos_token_id)  # [B, R]
    texts = tokenizer.batch_decode(response.masked_fill(mask == 0, generation_config.pad_token_id),
                                   skip_special_tokens=True)
    return Rollout(torch.cat([query, response], 1), torch.cat([query_mask, mask], 1), mask, list(prompts),
                   [t.strip() for t in texts], seconds, prompt_turns)


# ----------------------------------------------------------------------------- rewards


class FunctionReward:
    """A rule-based reward: `fn(prompts, responses, response_lengths=..., **kwargs) -> list[float]`."""

    def __init__(self, spec: str, kwargs: dict | None = None):
        self.fn, self.spec, self.kwargs = load_function(spec), spec, dict(kwargs or {})
        self.pass_lengths = _check_reward_signature(self.fn, spec, self.kwargs)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        extra = dict(self.kwargs)
        if self.pass_lengths:
            extra["response_lengths"] = rollout.response_mask.sum(1).tolist()
        values = self.fn(rollout.prompts, rollout.responses, **extra)
        values = list(values)
        if len(values) != len(rollout.responses):
            raise ConfigError(f"reward function {self.spec} returned {len(values)} scores for "
                              f"{len(rollout.responses)} answers")
        return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _check_reward_signature(fn: Callable, spec: str, kwargs: dict) -> bool:
    """Whether `fn` takes response_lengths; a function that cannot take (prompts, responses, **kwargs) is
    refused now, before the model loads, rather than after the first rollout."""
    import inspect

    try:
        signature = inspect.signature(fn)
    except ValueError:  # no signature to read (a builtin): call it with the documented arguments
        return True
    takes_lengths = any(p.kind is p.VAR_KEYWORD or p.name == "response_lengths" for p in signature.parameters.values())
    try:
        signature.bind(["p"], ["r"], **kwargs, **({"response_lengths": [1]} if takes_lengths else {}))
    except TypeError as exc:
        raise ConfigError(f"reward_function '{spec}' cannot be called as fn(prompts, responses"
                          f"{''.join(f', {k}=...' for k in kwargs)}): {exc}") from None
    return takes_lengths


def load_function(spec: str) -> Callable:
    """`package.module:name` or `path/to/file.py:name` -> the function (the user names code to run)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"reward_function '{spec}': expected module:function or file.py:function")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise ConfigError(f"reward_function '{spec}': file {path} not found")
            module_spec = importlib.util.spec_from_file_location(f"_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise ConfigError(f"reward_function '{spec}': cannot import {target} ({exc})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward_function '{spec}': {target} has no function '{name}'")
    return fn


@contextmanager
def eval_mode(module: torch.nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class SharedAdapterReward:
    """The reward model as adapter `reward` + its head on the policy's own base, scored on token ids."""

    def __init__(self, lm, head, batch_size: int):
        self.lm, self.head, self.batch_size = lm, head, batch_size

    @torch.no_grad()
    def __call__(self, rollout: Rollout) -> torch.Tensor:
        scores = []
        # Eval mode: the reward adapter's LoRA dropout would otherwise make the same answer score differently.
        with adapter_active(self.lm, "reward"), eval_mode(self.lm):
            for rows in _chunks(rollout.input_ids.size(0), self.batch_size):
                ids, mask = rollout.input_ids[rows], rollout.attention_mask[rows]
                hidden = hidden_states(self.lm, ids, mask)  # [b, P+R, H]
                last = L.last_token_index(mask)  # [b]: the eos, or the last token of a cut answer
                scores.append(self.head(hidden[torch.arange(hidden.size(0), device=hidden.device), last]))
        return torch.cat(scores).float().cpu()


class SeparateModelReward:
    """A reward model loaded on its own (full weights, or another base): scored on the decoded texts."""

    def __init__(self, scorer):
        self.scorer = scorer

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        # The whole prompt (system, earlier rounds) as the reward model was trained on it, when known.
        turns = rollout.prompt_turns or [[("user", p)] for p in rollout.prompts]
        return torch.tensor(self.scorer.score(turns, rollout.responses), dtype=torch.float32)


def _chunks(total: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, total)) for i in range(0, total, max(size, 1))]


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """Everything the PPO epochs of one batch need, all detached. Shapes [B, P+R] or [B, R] or [B]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


class _NoValue(torch.nn.Module):
    """The value head of the reference, whose values are never read: zeros [...] for states [..., H]."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return states.new_zeros(states.shape[:-1])


@contextmanager
def reference_mode(policy, reference):
    """The reference as a PolicyWithValue: the policy's base with adapters off, or a separate frozen copy
    of the starting model (its values are never used)."""
    if reference is not None:
        # Not the policy's head: a sharded one computes only inside the policy's own forward.
        yield PolicyWithValue(reference, _NoValue())
    else:
        with policy.lm.disable_adapter():
            yield policy


@torch.no_grad()
def forward_logprobs(policy, input_ids, attention_mask, response_len: int, temperature: float, batch_size: int,
                     device, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the answer tokens [B, R], values [B, R]) under `policy` (a PolicyWithValue)."""
    logps, values = [], []
    for rows in _chunks(input_ids.size(0), batch_size):
        with autocast(device, amp_dtype):
            logits, value = policy(input_ids[rows], attention_mask[rows], response_len)  # [b, R, V], [b, R]
        logps.append(L.token_logps(logits.float() / temperature, input_ids[rows, -response_len:]))
        values.append(value.float())
    return torch.cat(logps), torch.cat(values)


def make_experience(policy, reference, rollout: Rollout, scores: torch.Tensor, ppo: PPOOptions, kl_coef: float,
                    device, amp_dtype, batch_size: int = 8, dist=None) -> Experience:
    """Policy/reference log-probs, values, KL-penalised rewards, GAE advantages and returns. `batch_size`
    rows per forward pass; with `dist` (several processes) advantages are whitened over all their rows."""
    policy.eval()
    args = (rollout.input_ids, rollout.attention_mask, rollout.response_len, ppo.temperature, batch_size, device,
            amp_dtype)
    logprobs, values = forward_logprobs(policy, *args)
    with reference_mode(policy, reference) as ref:
        ref_logprobs, _ = forward_logprobs(ref, *args)
    mask = rollout.response_mask.float()
    scores = scores.to(device)
    rewards, kl = L.kl_penalty_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    across = ppo.whiten_advantages and dist is not None and dist.world > 1
    advantages, returns = L.gae_advantages(rewards, values * mask, mask, gamma=ppo.gamma, lam=ppo.lam,
                                           whiten=ppo.whiten_advantages and not across)
    if across:
        advantages = _whiten_across(advantages, mask, dist, device)
    return Experience(rollout.input_ids, rollout.attention_mask, mask, logprobs, ref_logprobs, values * mask,
                      scores, rewards, kl, advantages, returns)


def _whiten_across(values: torch.Tensor, mask: torch.Tensor, dist, device) -> torch.Tensor:
    """L.masked_whiten with the mean and population variance of every process's masked values."""
    n, total, squares = dist.sum([float(mask.sum()), float((values * mask).sum()), float((values**2 * mask).sum())],
                                 device)
    mean = total / max(n, 1.0)
    var = max(squares / max(n, 1.0) - mean**2, 0.0)
    return ((values.float() - mean) * (var + 1e-8) ** -0.5 * mask).detach()


# ----------------------------------------------------------------------------- update


EXPERIENCE_KEYS = ("input_ids", "attention_mask", "response_mask", "logprobs", "values", "advantages", "returns")


def experience_batch(exp: Experience, rows: list[int]) -> dict:
    """The mini-batch `rows` of an experience batch, as the tensors `ppo_minibatch_loss` reads."""
    idx = torch.tensor(rows, device=exp.input_ids.device)
    return {key: getattr(exp, key)[idx] for key in EXPERIENCE_KEYS}


def ppo_minibatch_loss(policy, batch: dict, ppo: PPOOptions) -> tuple[torch.Tensor, dict]:
    """Clipped policy loss + vf_coef x clipped value loss of one mini-batch, with metrics for the log."""
    mask = batch["response_mask"]  # [b, R]
    logits, values = policy(batch["input_ids"], batch["attention_mask"], mask.size(1))  # [b, R, V], [b, R]
    logits = logits.float() / ppo.temperature
    logprobs = L.token_logps(logits, batch["input_ids"][:, -mask.size(1) :])  # [b, R]
    pg = L.ppo_policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, ppo.cliprange)
    vf_loss, vf_clip = L.ppo_value_loss(values.float(), batch["values"], batch["returns"], mask, ppo.cliprange_value)
    with torch.no_grad():
        entropy = L.masked_mean(L.entropy_from_logits(logits.detach()), mask)
    metrics = {"policy_loss": float(pg.loss.detach()), "value_loss": float(vf_loss.detach()),
               "clip_fraction": float(pg.clip_fraction), "value_clip_fraction": float(vf_clip),
               "approx_kl": float(pg.approx_kl), "entropy": float(entropy)}
    return pg.loss + ppo.vf_coef * vf_loss, metrics


def minibatch_groups(total: int, size: int, accum: int, epochs: int, generator: torch.Generator) -> list:
    """The optimizer updates of one PPO step: `epochs` shuffled passes over `total` rows in mini-batches of
    `size`, `accum` mini-batches per update."""
    groups = []
    for _ in range(epochs):
        order = torch.randperm(total, generator=generator).tolist()
        minibatches = [order[i : i + size] for i in range(0, total, size)]
        groups += [minibatches[i : i + accum] for i in range(0, len(minibatches), accum)]
    return groups


def ppo_update(policy, exp: Experience, ppo: PPOOptions, optimizer, scheduler, scaler, device, amp_dtype,
               generator: torch.Generator, minibatch_size: int, accum: int = 1, max_grad_norm: float = 1.0) -> dict:
    """The PPO epochs of one experience batch outside the training engine (benchmarks/bench_ppo.py times this):
    the same mini-batch step and updates as `baichuan-tune ppo`, without logs, checkpoints or a NaN policy
    (a non-finite loss raises). Returns the mean metrics."""
    sums: dict[str, float] = {}
    groups = minibatch_groups(exp.input_ids.size(0), minibatch_size, accum, ppo.ppo_epochs, generator)
    for group in groups:
        policy.train()
        for rows in group:
            with autocast(device, amp_dtype):
                loss, metrics = ppo_minibatch_loss(policy, experience_batch(exp, rows), ppo)
            if not torch.isfinite(loss):
                raise _nonfinite(loss)
            scaled = loss / len(group)
            (scaler.scale(scaled) if scaler else scaled).backward()
            for key, value in metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + optimizer_step(
            policy, optimizer, scheduler, scaler, max_grad_norm) * len(group)
    count = sum(len(group) for group in groups)
    return {k: v / max(count, 1) for k, v in sums.items()}


def _nonfinite(loss: torch.Tensor):
    from .training import TrainingError

    return TrainingError(f"PPO loss is {loss.item()}: lower the learning rate, raise kl_coef, use --bf16 true "
                         "instead of fp16, or pass --nan_policy skip")


def step_statistics(exp: Experience, raw_scores: torch.Tensor, kl_coef: float) -> dict:
    """Per-step log values from a batch's experience: reward, KL, lengths."""
    lengths = exp.response_mask.sum(1)
    kl_per_answer = exp.kl.sum(1)  # [B]: KL summed over each answer's tokens
    return {
        "reward": float(raw_scores.mean()), "reward_std": float(raw_scores.std(unbiased=False)),
        "kl": float(kl_per_answer.mean()), "kl_coef": kl_coef,
        "response_length": float(lengths.float().mean()),
        "return_mean": float(L.masked_mean(exp.returns, exp.response_mask)),
        "value_mean": float(L.masked_mean(exp.values, exp.response_mask)),
    }


def normalized_scores(raw: torch.Tensor, moments: L.RunningMoments | None, clip: float | None) -> torch.Tensor:
    """Scores as the policy sees them: running-normalised (when `moments`) and clipped (when `clip`)."""
    scores = moments.normalize(raw, clip=clip) if moments is not None else L.clip_scores(raw, clip)
    return scores


__all__ = [
    "Experience", "FunctionReward", "PPOOptions", "Rollout", "SeparateModelReward", "SharedAdapterReward", "causal_lm",
    "generate_rollout", "left_pad", "load_function", "make_experience", "minibatch_groups", "normalized_scores",
    "ppo_minibatch_loss", "ppo_update", "response_mask", "rollout_generation_config", "step_statistics",
]
