"""Alignment losses as pure tensor functions: log-probabilities, reward-model, DPO family, KTO, PPO and GRPO.

Every function here takes and returns tensors (no models, no optimisers), works in fp32 whatever the
input dtype, and honours the masks it is given: a padded or prompt position never contributes. Shapes
are batch-first: B = batch, T = sequence length, V = vocabulary size. Each function cites the formula it
implements. TRL implements these too, but as methods of its trainer classes; the project needs them as
small standalone functions shared by `rm`, `dpo` and `ppo` and checked one by one against hand-computed
values, so they are written here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- masked statistics


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `values` where `mask` is 1 (over `dim`, or over everything)."""
    values = values.float() * mask.float()
    return values.sum() if dim is None else values.sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is 1; 0 where the mask is empty."""
    count = mask.float().sum() if dim is None else mask.float().sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divide by n) of `values` over the masked positions."""
    mean = masked_mean(values, mask)
    return masked_mean((values.float() - mean) ** 2, mask)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) over the masked positions; masked-out positions become 0.

    With `shift_mean=False` the mean is added back (only the scale changes), as PPO implementations do
    for advantages when the sign of the mean should be kept.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values.float() - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.float()


# ----------------------------------------------------------------------------- log-probabilities


def token_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[b, t] | logits[b, t]) in fp32: [B, T, V] logits, [B, T] token ids -> [B, T].

    No shift: position t's logits score token t. Computed as logit - logsumexp(logits), which avoids
    materialising a second [B, T, V] tensor of log-softmax values.
    """
    logits = logits.float()
    picked = logits.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, average: bool = False
) -> torch.Tensor:
    """Log-probability of each sequence's labelled tokens under a causal LM: [B, T, V], [B, T] -> [B].

    log p(y | x) = sum_t log p(y_t | x, y_<t) over the positions whose label is not `ignore_index`,
    with the usual causal shift (logits at t predict label t+1). `average=True` divides by the number
    of labelled tokens (the length-normalised log-probability of SimPO, Meng et al. 2024, eq. 4).
    """
    shift_logits = logits[:, :-1]  # [B, T-1, V]
    shift_labels = labels[:, 1:]  # [B, T-1]
    mask = shift_labels != ignore_index  # [B, T-1]
    safe_labels = shift_labels.masked_fill(~mask, 0)
    per_token = token_logps(shift_logits, safe_labels)  # [B, T-1]
    total = masked_sum(per_token, mask, dim=-1)  # [B]
    if average:
        return total / mask.sum(-1).clamp(min=1).float()
    return total


# ----------------------------------------------------------------------------- reward model


def pairwise_rm_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Reward-model ranking loss, Ouyang et al. 2022 (InstructGPT) eq. 1, for one pair per prompt:

        loss = -E[ log sigmoid(r(x, y_w) - r(x, y_l)) ]

    [B] chosen rewards, [B] rejected rewards -> scalar. `-logsigmoid` is the stable form of -log(sigmoid).
    """
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Fraction of pairs where the chosen answer scores strictly higher: [B], [B] -> scalar."""
    return (chosen_rewards.float() > rejected_rewards.float()).float().mean()


def reward_margin(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """Mean of r_chosen - r_rejected: [B], [B] -> scalar."""
    return (chosen_rewards.float() - rejected_rewards.float()).mean()


# ----------------------------------------------------------------------------- DPO family


class PreferenceLoss(NamedTuple):
    """A preference loss (scalar) and the implicit rewards of each chosen / rejected answer ([B], detached)."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> PreferenceLoss:
    """DPO, Rafailov et al. 2023 eq. 7, with conservative label smoothing (cDPO, Mitchell 2023):

        h = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]
        loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h)

    All inputs are [B] sequence log-probabilities. Implicit rewards: beta * (log pi(y) - log ref(y)).
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()  # [B]
    rejected_ratio = policy_rejected.float() - ref_rejected.float()  # [B]
    logits = beta * (chosen_ratio - rejected_ratio)  # [B]
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceLoss(losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> PreferenceLoss:
    """IPO, Azar et al. 2023 eq. 17, with tau = beta:

        h = log[pi(y_w) ref(y_l) / (pi(y_l) ref(y_w))],   loss = (h - 1 / (2 * tau))^2

    Inputs are [B] log-probabilities (the `dpo` command passes length-averaged ones, as the IPO
    authors advise). Rewards as for DPO: beta * (log pi(y) - log ref(y)).
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    losses = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLoss(losses.mean(), (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach())


def log_odds(avg_logps: torch.Tensor) -> torch.Tensor:
    """log(P / (1 - P)) for P = exp(avg_logps) < 1, computed as logp - log(1 - exp(logp)) stably."""
    avg_logps = avg_logps.float().clamp(max=-1e-6)  # P = 1 exactly would make the odds infinite
    return avg_logps - torch.log(-torch.expm1(avg_logps))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, lam: float = 0.1) -> PreferenceLoss:
    """ORPO, Hong et al. 2024 eqs. 2-7 (reference-free):

        P(y|x) = exp(mean_t log p(y_t | x, y_<t)),   odds(y|x) = P / (1 - P)
        L_OR = -log sigmoid(log odds(y_w|x) - log odds(y_l|x))
        loss = E[ L_SFT + lambda * L_OR ],   L_SFT = -mean_t log p(y_w,t | ...)  (NLL of the chosen answer)

    Inputs are [B] length-averaged log-probabilities. Rewards are the log-odds of each answer, so the
    logged margin is the log odds ratio the loss widens.
    """
    chosen_odds, rejected_odds = log_odds(chosen_avg_logps), log_odds(rejected_avg_logps)  # [B], [B]
    ratio_loss = -F.logsigmoid(chosen_odds - rejected_odds)  # [B]
    nll = -chosen_avg_logps.float()  # [B]
    losses = nll + lam * ratio_loss
    return PreferenceLoss(losses.mean(), chosen_odds.detach(), rejected_odds.detach())


def simpo_loss(
    chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, beta: float = 2.0, gamma: float = 0.5
) -> PreferenceLoss:
    """SimPO, Meng et al. 2024 eq. 6 (reference-free, length-normalised, target margin gamma):

        loss = -log sigmoid(beta / |y_w| * log pi(y_w) - beta / |y_l| * log pi(y_l) - gamma)

    Inputs are [B] length-averaged log-probabilities (log pi(y) / |y|). Rewards: beta * avg logp.
    """
    chosen_rewards = beta * chosen_avg_logps.float()
    rejected_rewards = beta * rejected_avg_logps.float()
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PreferenceLoss(losses.mean(), chosen_rewards.detach(), rejected_rewards.detach())


class KTOLoss(NamedTuple):
    """KTO's loss (scalar), the implicit rewards of each answer ([B], detached) and the KL estimate z0."""

    loss: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor


def kto_kl_estimate(policy_mismatched: torch.Tensor, ref_mismatched: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0, Ethayarajh et al. 2024 sec. 4.1: a batch estimate of KL(pi || ref) from
    answers paired with another record's prompt (y' for x), clamped at 0 and kept out of the gradient:

        z0 = max(0, mean_b [log pi(y'_b | x_b) - log ref(y'_b | x_b)])

    Inputs are [B] sequence log-probabilities of the mismatched pairs; returns a 0-d tensor.
    """
    return (policy_mismatched.float() - ref_mismatched.float()).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLoss:
    """KTO, Ethayarajh et al. 2024 eq. 8 (Kahneman-Tversky optimisation from unpaired labels):

        r(x, y) = log pi(y|x) - log ref(y|x)
        v(x, y) = lambda_D * sigmoid(beta * (r - z0))   if y is desirable
                  lambda_U * sigmoid(beta * (z0 - r))   if y is undesirable
        loss = E[ lambda_y - v(x, y) ]

    [B] sequence log-probabilities, `desirable` a [B] bool label, `kl` the z0 of kto_kl_estimate. The mean
    runs over the whole batch, as in the paper's expectation. Implicit rewards: beta * r.
    """
    ratio = policy_logps.float() - ref_logps.float()  # [B]
    kl = kl.float().detach()
    desirable = desirable.bool()
    weight = torch.where(desirable, torch.tensor(desirable_weight), torch.tensor(undesirable_weight)).to(ratio)
    value = torch.where(desirable, torch.sigmoid(beta * (ratio - kl)), torch.sigmoid(beta * (kl - ratio)))  # [B]
    losses = weight * (1.0 - value)  # lambda_y - v = lambda_y * (1 - sigmoid(.))
    return KTOLoss(losses.mean(), (beta * ratio).detach(), kl)


# ----------------------------------------------------------------------------- PPO


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row of a [B, T] 0/1 mask -> [B] (0 for an empty row)."""
    positions = torch.arange(mask.size(1), device=mask.device).expand_as(mask)  # [B, T]
    return torch.where(mask.bool(), positions, torch.zeros_like(positions)).max(dim=1).values


def kl_penalty_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO rewards with a KL penalty (Ziegler et al. 2019 eq. 2; Ouyang et al. 2022 eq. 2):

        kl_t = log pi(a_t|s_t) - log ref(a_t|s_t)
        r_t = -kl_coef * kl_t  (+ score on the last response token)

    scores [B] (one reward-model score per response), logprobs / ref_logprobs / mask [B, T] over the
    response tokens. Returns (rewards [B, T], kl [B, T]), both zero outside the mask.
    """
    mask = mask.float()
    kl = (logprobs.float() - ref_logprobs.float()) * mask  # [B, T]
    rewards = -kl_coef * kl
    last = last_token_index(mask)  # [B]
    bonus = torch.zeros_like(rewards).scatter_(1, last[:, None], scores.float()[:, None])  # [B, T]
    return rewards + bonus * mask, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, Schulman et al. 2016 eqs. 11-16, over masked response tokens:

        delta_t = r_t + gamma * V_{t+1} - V_t,        A_t = delta_t + gamma * lam * A_{t+1}
        returns_t = A_t + V_t   (the value target)

    V and A after the last response token are 0 (the episode ends there). rewards / values / mask are
    [B, T]; returns (advantages [B, T], returns [B, T]); advantages are whitened over the mask
    (mean 0, std 1) when `whiten`, after the returns are taken from the raw ones.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # A_{t+1}, [B]
    next_value = torch.zeros_like(rewards[:, 0])  # V_{t+1}, [B]
    # Reverse-time recursion; a masked-out step passes nothing back (its mask zeroes V and A).
    for t in reversed(range(rewards.size(1))):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
        next_value = values[:, t]
    returns = advantages + values
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages.detach(), returns.detach()


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float = 0.2,
) -> PolicyLossOutput:
    """PPO clipped surrogate, Schulman et al. 2017 eq. 7 (as a loss to minimise, masked mean over tokens):

        ratio = exp(log pi - log pi_old)
        loss = E[ max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) ]

    [B, T] inputs. Also returns the fraction of tokens where the clipped term was chosen and the
    approximate KL(pi_old || pi) estimator E[(ratio - 1) - log ratio] (Schulman 2020, "k3").
    """
    log_ratio = logprobs.float() - old_logprobs.float()  # [B, T]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages.float() * ratio
    clipped = -advantages.float() * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PolicyLossOutput(loss, clip_fraction.detach(), approx_kl.detach())


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (as in the PPO baselines and Ziegler et al. 2019's code), masked over tokens:

        V_clip = V_old + clip(V - V_old, -eps, eps)
        loss = 0.5 * E[ max((V - R)^2, (V_clip - R)^2) ]

    [B, T] inputs -> (loss, fraction of tokens where the clipped error was larger).
    """
    values, old_values, returns = values.float(), old_values.float(), returns.float()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    clip_fraction = masked_mean((clipped_error > error).float(), mask)
    return loss, clip_fraction.detach()


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position: H = logsumexp(z) - sum_i softmax(z)_i z_i. [B, T, V] -> [B, T]."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)


class FixedKLController:
    """A constant KL coefficient (the `kl_coef` of InstructGPT's objective)."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing to adapt."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient, Ziegler et al. 2019 sec. 2.2, steering the measured KL toward a target:

        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2),   beta_{t+1} = beta_t * (1 + K_beta * e_t)

    with K_beta = n_steps / horizon (n_steps = samples in this batch).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.target, self.horizon = float(state["value"]), float(state["target"]), float(state["horizon"])


class RunningMoments:
    """Running mean and standard deviation of every score seen so far, for reward normalisation.

    Batches are merged with the parallel-variance formula of Chan et al. 1979, so the statistics equal
    those of all scores pooled (population std). `normalize` scales scores to (x - mean) / std, then
    clips them to [-clip, clip]; the statistics are updated with the batch first.
    """

    def __init__(self, eps: float = 1e-8):
        self.mean, self.var, self.count, self.eps = 0.0, 1.0, 0, eps

    def update(self, scores: torch.Tensor) -> None:
        scores = scores.detach().float().flatten()
        n = scores.numel()
        if n == 0:
            return
        batch_mean, batch_var = scores.mean().item(), scores.var(unbiased=False).item()
        if self.count == 0:
            self.mean, self.var, self.count = batch_mean, batch_var, n
            return
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean, self.var, self.count = self.mean + delta * n / total, m2 / total, total

    @property
    def std(self) -> float:
        return (self.var + self.eps) ** 0.5

    def normalize(self, scores: torch.Tensor, clip: float | None = None, update: bool = True) -> torch.Tensor:
        if update:
            self.update(scores)
        out = (scores.float() - self.mean) / self.std
        return out.clamp(-clip, clip) if clip else out

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Clip raw scores to [-clip, clip] (no-op for None or 0)."""
    return scores.float().clamp(-clip, clip) if clip else scores.float()


# ----------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome advantages, Shao et al. 2024 (DeepSeekMath) sec. 4.1.2: each answer's reward against the
    other answers to the same prompt,

        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)

    `rewards` is [P * G], the G answers of each prompt consecutive; std is the sample standard deviation
    (divide by G - 1), as the reference implementations use. `scale=False` keeps only the mean shift (Dr.
    GRPO, Liu et al. 2025, drops the division, which over-weights groups of nearly equal rewards). [P * G] out.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [P, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        centred = centred / (std + eps)
    return centred.reshape(-1)  # [P * G]


class GRPOLossOutput(NamedTuple):
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    clip_range: float = 0.2,
    beta: float = 0.0,
    normalization: str = "sequence",
) -> GRPOLossOutput:
    """GRPO's objective as a loss, Shao et al. 2024 eq. 3, per token t of answer i:

        ratio = exp(log pi - log pi_old)
        l_it = -min(ratio * A_i, clip(ratio, 1 - eps, 1 + eps) * A_i) + beta * KL_it
        KL_it = exp(ref - log pi) - (ref - log pi) - 1            (the unbiased "k3" estimator, eq. 4)

    `normalization="sequence"` averages over each answer's tokens, then over answers (the paper's
    1/G sum_i 1/|o_i| sum_t); "token" averages over every answer token of the batch (DAPO, Yu et al. 2025),
    so long answers weigh by their length. [B, T] log-probabilities and mask, [B] advantages. The clip
    fraction and KL are over answer tokens (KL 0 without a reference).
    """
    log_ratio = logprobs.float() - old_logprobs.float()  # [B, T]
    ratio = torch.exp(log_ratio)
    adv = advantages.float().unsqueeze(1)  # [B, 1]
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)  # [B, T]
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        delta = ref_logprobs.float() - logprobs.float()
        kl = torch.exp(delta) - delta - 1.0
    per_token = per_token + beta * kl
    if normalization == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif normalization == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"normalization must be 'sequence' or 'token', got {normalization!r}")
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return GRPOLossOutput(loss, clip_fraction.detach(), masked_mean(kl, mask).detach())
