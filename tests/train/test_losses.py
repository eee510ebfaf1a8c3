"""Hand-checked values for every alignment loss: each expected number is worked out here with plain
Python math from the paper's formula, on tensors small enough to follow by eye."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from baichuan_tune.train import losses as L


def approx(x, rel=1e-5, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- log-probabilities


def test_sequence_logps_shift_mask_sum_and_mean():
    ln3 = math.log(3.0)
    # Row 0: logits at t=0 are uniform over 2 tokens, at t=1 favour token 0 three to one.
    # Row 1: the same logits, but label 1 at t=1 is ignored so only t=2's label (token 0) counts.
    logits = torch.tensor([[[0.0, 0.0], [ln3, 0.0], [5.0, -5.0]]] * 2)  # [2, 3, 2]
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 0]])  # [2, 3]
    got = L.sequence_logps(logits, labels)
    # Row 0: label[1]=0 scored by logits[0] -> 1/2; label[2]=1 scored by logits[1] -> 1/(3+1).
    row0 = math.log(0.5) + math.log(1 / 4)
    # Row 1: label[2]=0 scored by logits[1] -> 3/4 (logits[2] never scores anything).
    row1 = math.log(3 / 4)
    assert got.tolist() == [approx(row0), approx(row1)]
    mean = L.sequence_logps(logits, labels, average=True)
    assert mean.tolist() == [approx(row0 / 2), approx(row1 / 1)]


def test_sequence_logps_is_fp32_for_bf16_logits_and_custom_ignore_index():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]], dtype=torch.bfloat16)  # [1, 2, 4]
    labels = torch.tensor([[7, 2]])
    out = L.sequence_logps(logits, labels, ignore_index=7)
    assert out.dtype == torch.float32
    assert out.item() == approx(math.log(1 / 4))
    assert L.sequence_logps(logits, torch.tensor([[7, 7]]), ignore_index=7).item() == 0.0


def test_token_logps_no_shift():
    logits = torch.tensor([[[math.log(2.0), 0.0, 0.0]]])  # p = (2/4, 1/4, 1/4)
    assert L.token_logps(logits, torch.tensor([[0]])).item() == approx(math.log(0.5))
    assert L.token_logps(logits, torch.tensor([[2]])).item() == approx(math.log(0.25))


# ----------------------------------------------------------------------------- reward model


def test_pairwise_rm_loss_accuracy_margin():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # -log sigmoid(1) and -log sigmoid(-1), averaged
    expected = (-math.log(sigmoid(1.0)) - math.log(sigmoid(-1.0))) / 2
    assert L.pairwise_rm_loss(chosen, rejected).item() == approx(expected)
    assert L.pairwise_accuracy(chosen, rejected).item() == 0.5
    assert L.reward_margin(chosen, rejected).item() == approx((1.0 + -1.0) / 2)
    # a tie is not counted as correct
    assert L.pairwise_accuracy(torch.tensor([1.0]), torch.tensor([1.0])).item() == 0.0


def test_pairwise_rm_loss_is_stable_for_large_margins():
    loss = L.pairwise_rm_loss(torch.tensor([-100.0]), torch.tensor([100.0]))
    assert loss.item() == approx(200.0)  # -log sigmoid(-200) = 200 + log(1 + e^-200)


# ----------------------------------------------------------------------------- DPO family


def test_dpo_loss_rewards_and_gradient():
    pc = torch.tensor([-5.0], requires_grad=True)
    pr, rc, rr = torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.1)
    # h = (-5 - -6) - (-7 - -6) = 2;  loss = -log sigmoid(0.1 * 2)
    assert out.loss.item() == approx(math.log(1 + math.exp(-0.2)))
    assert out.chosen_rewards.tolist() == [approx(0.1)]
    assert out.rejected_rewards.tolist() == [approx(-0.1)]
    out.loss.backward()
    # d/d(pc) of -log sigmoid(beta h) = -beta * (1 - sigmoid(beta h))
    assert pc.grad.item() == approx(-0.1 * (1 - sigmoid(0.2)))


def test_cdpo_label_smoothing():
    args = [torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])]
    out = L.dpo_loss(*args, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * -math.log(sigmoid(0.2)) + 0.1 * -math.log(sigmoid(-0.2))
    assert out.loss.item() == approx(expected)


def test_dpo_batch_mean():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0])
    zero = torch.zeros(2)
    out = L.dpo_loss(pc, pr, zero, zero, beta=1.0)
    assert out.loss.item() == approx((-math.log(sigmoid(1.0)) - math.log(sigmoid(-1.0))) / 2)


def test_ipo_loss():
    args = [torch.tensor([-5.0]), torch.tensor([-7.0]), torch.tensor([-6.0]), torch.tensor([-6.0])]
    # h = 2; tau = beta; loss = (h - 1/(2 tau))^2
    assert L.ipo_loss(*args, beta=0.1).loss.item() == approx((2 - 5.0) ** 2)
    out = L.ipo_loss(*args, beta=0.5)
    assert out.loss.item() == approx((2 - 1.0) ** 2)
    assert out.chosen_rewards.item() == approx(0.5) and out.rejected_rewards.item() == approx(-0.5)


def test_orpo_loss():
    chosen, rejected = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)])
    # odds: 0.5/0.5 = 1 and 0.2/0.8 = 0.25; L_OR = -log sigmoid(log(1/0.25)) = -log(4/5)
    ratio_term = -math.log(sigmoid(math.log(1 / 0.25)))
    assert ratio_term == approx(math.log(1.25))
    out = L.orpo_loss(chosen, rejected, lam=0.2)
    assert out.loss.item() == approx(math.log(2.0) + 0.2 * ratio_term)
    assert out.chosen_rewards.item() == approx(math.log(1.0), abs=1e-6)
    assert out.rejected_rewards.item() == approx(math.log(0.25))


def test_log_odds_is_finite_near_probability_one():
    assert torch.isfinite(L.log_odds(torch.tensor([0.0, -1e-12]))).all()
    assert L.log_odds(torch.tensor([math.log(0.8)])).item() == approx(math.log(0.8 / 0.2))


def test_simpo_loss():
    chosen, rejected = torch.tensor([-1.0]), torch.tensor([-1.5])
    out = L.simpo_loss(chosen, rejected, beta=2.0, gamma=0.5)
    # 2 * -1 - 2 * -1.5 - 0.5 = 0.5
    assert out.loss.item() == approx(-math.log(sigmoid(0.5)))
    assert out.chosen_rewards.item() == approx(-2.0) and out.rejected_rewards.item() == approx(-3.0)


# ----------------------------------------------------------------------------- PPO


def test_masked_whiten():
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[1, 1, 1, 0]])
    std = statistics.pstdev([1.0, 2.0, 3.0])  # sqrt(2/3)
    got = L.masked_whiten(values, mask, eps=0.0)
    assert got.tolist() == [[approx(-1 / std), approx(0.0), approx(1 / std), 0.0]]
    kept = L.masked_whiten(values, mask, shift_mean=False, eps=0.0)
    assert kept.tolist() == [[approx(2 - 1 / std), approx(2.0), approx(2 + 1 / std), 0.0]]


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]])
    assert L.last_token_index(mask).tolist() == [2, 3, 0]


def test_kl_penalty_rewards_puts_score_on_last_response_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -3.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    rewards, kl = L.kl_penalty_rewards(torch.tensor([2.0]), logprobs, ref, mask, kl_coef=0.1)
    # kl = logp - ref = [0.5, -1, 0, (masked)]; rewards = -0.1 * kl, plus 2.0 at t=2
    assert kl.tolist() == [[approx(0.5), approx(-1.0), approx(0.0), 0.0]]
    assert rewards.tolist() == [[approx(-0.05), approx(0.1), approx(2.0), 0.0]]


def test_gae_three_steps_by_hand():
    gamma, lam = 0.9, 0.8
    r, v = [0.1, -0.2, 1.0], [0.5, 0.4, 0.3]
    # Backwards from the last step; V after the last token is 0.
    delta2 = r[2] + gamma * 0.0 - v[2]  # 0.7
    a2 = delta2
    delta1 = r[1] + gamma * v[2] - v[1]  # -0.33
    a1 = delta1 + gamma * lam * a2  # 0.174
    delta0 = r[0] + gamma * v[1] - v[0]  # -0.04
    a0 = delta0 + gamma * lam * a1  # 0.08528
    assert (a0, a1, a2) == (approx(0.08528), approx(0.174), approx(0.7))
    # The 4th position is padding with junk reward/value: it must change nothing.
    rewards = torch.tensor([r + [50.0]])
    values = torch.tensor([v + [-7.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    adv, ret = L.gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=False)
    assert adv.tolist() == [[approx(a0), approx(a1), approx(a2), 0.0]]
    assert ret.tolist() == [[approx(a0 + v[0]), approx(a1 + v[1]), approx(a2 + v[2]), 0.0]]
    white, ret_w = L.gae_advantages(rewards, values, mask, gamma=gamma, lam=lam, whiten=True)
    mu, sd = statistics.fmean([a0, a1, a2]), statistics.pstdev([a0, a1, a2])
    assert white.tolist() == [[approx((a - mu) / sd, rel=1e-4) for a in (a0, a1, a2)] + [0.0]]
    assert torch.equal(ret_w, ret)  # returns come from the raw advantages


def test_gae_rows_are_independent_and_gamma_one_sums_rewards():
    # gamma = lam = 1 and V = 0: A_t is the sum of the rewards from t on.
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, _ = L.gae_advantages(rewards, torch.zeros(2, 3), mask, gamma=1.0, lam=1.0, whiten=False)
    assert adv.tolist() == [[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]]


def test_ppo_policy_loss_clipping_by_hand():
    ratios, adv = [1.5, 0.5, 0.5, 3.0], [1.0, 1.0, -2.0, 100.0]
    old = torch.zeros(1, 4)
    new = torch.tensor([[math.log(x) for x in ratios]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = L.ppo_policy_loss(new, old, torch.tensor([adv]), mask, clip_range=0.2)
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(-0.5, -0.8) = -0.5; t2: max(1.0, 1.6) = 1.6 (clipped)
    assert out.loss.item() == approx((-1.2 - 0.5 + 1.6) / 3)
    assert out.clip_fraction.item() == approx(2 / 3)
    k3 = [(x - 1) - math.log(x) for x in ratios[:3]]
    assert out.approx_kl.item() == approx(sum(k3) / 3)


def test_ppo_policy_loss_gradient_is_zero_where_clipped():
    new = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    out = L.ppo_policy_loss(new, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), clip_range=0.2)
    out.loss.backward()
    # t0 is clipped (no gradient); t1: d/dlogp of -A * exp(logp) / 2 = -1.1 / 2
    assert new.grad.tolist() == [[0.0, approx(-1.1 / 2)]]


def test_ppo_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 0.0, 9.0]]), torch.tensor([[0.5, 0.1, 0.0]])
    returns, mask = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0]])
    loss, frac = L.ppo_value_loss(values, old, returns, mask, clip_range_value=0.2)
    # t0: clipped V = 0.5 + 0.2 = 0.7 -> max((1-2)^2, (0.7-2)^2) = 1.69; t1: V within range -> 0
    assert loss.item() == approx(0.5 * (1.69 + 0.0) / 2)
    assert frac.item() == approx(0.5)


def test_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]]])  # [1, 2, 4]
    h = L.entropy_from_logits(logits)
    assert h.tolist() == [[approx(math.log(4.0)), approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))]]


def test_adaptive_kl_controller():
    ctl = L.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=256)  # error 0.5 clipped to 0.2
    assert ctl.value == approx(0.2 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    ctl.update(6.6, n_steps=100)  # error 0.1
    assert ctl.value == approx(before * (1 + 0.1 * 100 / 10000))
    before = ctl.value
    ctl.update(0.0, n_steps=1000)  # error -1 clipped to -0.2
    assert ctl.value == approx(before * (1 - 0.2 * 1000 / 10000))
    fresh = L.AdaptiveKLController(1.0, 1.0, 1.0)
    fresh.load_state_dict(ctl.state_dict())
    assert fresh.value == ctl.value


def test_fixed_kl_controller():
    ctl = L.FixedKLController(0.05)
    ctl.update(100.0, n_steps=64)
    assert ctl.value == 0.05


def test_running_moments_pool_batches_and_clip():
    first, second = [1.0, 2.0, 3.0], [10.0, 20.0]
    moments = L.RunningMoments(eps=0.0)
    moments.update(torch.tensor(first))
    moments.update(torch.tensor(second))
    pooled = first + second
    assert moments.mean == approx(statistics.fmean(pooled))
    assert moments.std == approx(statistics.pstdev(pooled))
    assert moments.count == 5
    mean, sd = statistics.fmean(pooled), statistics.pstdev(pooled)
    out = moments.normalize(torch.tensor([7.2, 100.0]), clip=3.0, update=False)
    assert out.tolist() == [approx((7.2 - mean) / sd, abs=1e-5), 3.0]
    restored = L.RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert (restored.mean, restored.var, restored.count) == (moments.mean, moments.var, moments.count)


def test_clip_scores():
    assert L.clip_scores(torch.tensor([-9.0, 0.5, 9.0]), 2.0).tolist() == [-2.0, 0.5, 2.0]
    assert L.clip_scores(torch.tensor([-9.0]), None).tolist() == [-9.0]


# ----------------------------------------------------------------------------- KTO


def test_kto_kl_estimate_is_a_clamped_detached_mean():
    policy = torch.tensor([-2.0, -4.0], requires_grad=True)
    assert float(L.kto_kl_estimate(policy, torch.tensor([-2.5, -4.3]))) == approx((0.5 + 0.3) / 2)
    # a negative mean is clamped to 0: the reference point never rewards moving away from the reference
    assert float(L.kto_kl_estimate(policy, torch.tensor([-2.5, -3.0]))) == 0.0
    assert not L.kto_kl_estimate(policy, torch.tensor([-2.5, -4.3])).requires_grad


def test_kto_loss_by_hand():
    policy = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -3.0])
    desirable = torch.tensor([True, False, True])
    beta, lam_d, lam_u, z0 = 0.5, 1.0, 1.5, 0.4
    out = L.kto_loss(policy, ref, desirable, torch.tensor(z0), beta, lam_d, lam_u)
    r = [0.5, -1.0, 0.0]  # log pi - log ref
    terms = [lam_d * (1 - sigmoid(beta * (r[0] - z0))), lam_u * (1 - sigmoid(beta * (z0 - r[1]))),
             lam_d * (1 - sigmoid(beta * (r[2] - z0)))]
    assert float(out.loss.detach()) == approx(sum(terms) / 3)
    assert out.rewards.tolist() == approx([beta * x for x in r])
    out.loss.backward()
    # d/dr of lam * (1 - sigmoid(beta (r - z0))) = -lam * beta * s (1 - s); undesirable answers get the opposite sign
    s = [sigmoid(beta * (r[0] - z0)), sigmoid(beta * (z0 - r[1])), sigmoid(beta * (r[2] - z0))]
    expected = [-lam_d * beta * s[0] * (1 - s[0]) / 3, lam_u * beta * s[1] * (1 - s[1]) / 3,
                -lam_d * beta * s[2] * (1 - s[2]) / 3]
    assert policy.grad.tolist() == approx(expected)


def test_kto_loss_pushes_desirable_up_and_undesirable_down():
    policy = torch.zeros(2, requires_grad=True)
    L.kto_loss(policy, torch.zeros(2), torch.tensor([True, False]), torch.tensor(0.0)).loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # gradient descent raises the first, lowers the second


# ----------------------------------------------------------------------------- GRPO


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 3.0, 3.0, 3.0])
    adv = L.group_advantages(rewards, group_size=3, eps=1e-4)
    std = statistics.stdev([1.0, 0.0, 0.0])  # sample std, sqrt(1/3)
    assert adv[:3].tolist() == approx([(2 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4), (-1 / 3) / (std + 1e-4)])
    assert adv[3:6].tolist() == approx([(-2 / 3) / (std + 1e-4), (1 / 3) / (std + 1e-4), (1 / 3) / (std + 1e-4)])
    assert adv[6:].tolist() == [0.0, 0.0, 0.0]  # equal rewards: no signal, and no NaN
    unscaled = L.group_advantages(rewards, group_size=3, scale=False)
    assert unscaled[:3].tolist() == approx([2 / 3, -1 / 3, -1 / 3])
    with pytest.raises(ValueError, match="groups of 4"):
        L.group_advantages(rewards, group_size=4)


def test_grpo_loss_by_hand_per_sequence_and_per_token():
    old = torch.zeros(2, 3)
    ratios = [[1.1, 0.7, 5.0], [1.3, 0.9, 1.0]]
    logprobs = torch.tensor(ratios).log().requires_grad_(True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = torch.tensor([1.0, -2.0])
    eps = 0.2

    def term(ratio, a):  # -min(ratio * A, clip(ratio) * A)
        return -min(ratio * a, min(max(ratio, 1 - eps), 1 + eps) * a)

    row0 = [term(1.1, 1.0), term(0.7, 1.0)]  # the third token is masked out
    row1 = [term(1.3, -2.0), term(0.9, -2.0), term(1.0, -2.0)]
    seq = L.grpo_loss(logprobs, old, adv, mask, clip_range=eps, normalization="sequence")
    assert float(seq.loss) == approx((sum(row0) / 2 + sum(row1) / 3) / 2)
    tok = L.grpo_loss(logprobs, old, adv, mask, clip_range=eps, normalization="token")
    assert float(tok.loss) == approx((sum(row0) + sum(row1)) / 5)
    # no token takes the clipped term: 1.3 with A < 0 gives 2.6 unclipped vs 2.4 clipped, 0.7 with A > 0 gives
    # -0.7 vs -0.8, and the rest lie inside [0.8, 1.2]
    assert float(seq.clip_fraction) == 0.0
    assert float(seq.kl) == 0.0
    with pytest.raises(ValueError, match="normalization"):
        L.grpo_loss(logprobs, old, adv, mask, normalization="batch")


def test_grpo_loss_clipping_and_kl_by_hand():
    old = torch.zeros(1, 2)
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[0.0, 0.0]])
    mask = torch.ones(1, 2)
    out = L.grpo_loss(logprobs, old, torch.tensor([1.0]), mask, ref_logprobs=ref, clip_range=0.2, beta=0.1)
    kl = [math.exp(-math.log(1.5)) + math.log(1.5) - 1, math.exp(-math.log(0.5)) + math.log(0.5) - 1]
    # A > 0: ratio 1.5 is clipped to 1.2 (the clipped, larger loss -1.2 wins over -1.5); 0.5 keeps -0.5 (> -0.8)
    per_token = [-1.2 + 0.1 * kl[0], -0.5 + 0.1 * kl[1]]
    assert float(out.loss) == approx(sum(per_token) / 2)
    assert float(out.clip_fraction) == approx(0.5)
    assert float(out.kl) == approx(sum(kl) / 2)
    out.loss.backward()
    # the clipped token passes no policy gradient, only the KL term's: beta * d/dlogp [exp(ref - lp) - (ref - lp) - 1]
    d_kl0 = 0.1 * (-math.exp(-math.log(1.5)) + 1) / 2
    assert float(logprobs.grad[0, 0]) == approx(d_kl0)
