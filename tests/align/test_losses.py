"""The alignment losses and log-probabilities against values computed by hand on small examples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.align.logprobs import sequence_logprobs, token_logprobs
from llmlab.align.losses import (dpo_loss, entropy_from_logits, gae, group_advantages, grpo_loss, kl_penalized_rewards,
                                 masked_mean, ppo_policy_loss, ppo_value_loss, reward_loss, whiten)


def close(got, expected, atol: float = 1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), rtol=0, atol=atol)


# --------------------------------------------------------------------------- log-probabilities


def test_token_logprobs_gather_log_softmax_and_zero_where_ignored():
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[3, 0, -100, 6], [-100, -100, 2, 5]])
    got = token_logprobs(logits, targets)
    expected = F.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    close(got, expected.masked_fill(targets == -100, 0.0))
    assert got.dtype == torch.float32 and token_logprobs(logits.bfloat16(), targets).dtype == torch.float32
    # at a temperature: the log-probabilities of softmax(logits / temperature)
    hot = F.log_softmax(logits / 0.5, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    close(token_logprobs(logits, targets, temperature=0.5), hot.masked_fill(targets == -100, 0.0))


class FixedLogits(torch.nn.Module):
    """A stand-in model whose forward returns the same logits whatever the tokens."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids):
        return self.logits


def test_sequence_logprobs_sum_and_average_over_scored_tokens():
    # uniform over 4 tokens everywhere except row 0 position 1, where token 2 has probability 1/2
    logits = torch.zeros(2, 3, 4)
    logits[0, 1, 2] = math.log(3.0)  # p = 3 / (3 + 1 + 1 + 1)
    targets = torch.tensor([[-100, 2, 1], [3, -100, -100]])
    ids = torch.zeros(2, 3, dtype=torch.long)
    model = FixedLogits(logits)
    close(sequence_logprobs(model, ids, targets), [math.log(0.5) + math.log(0.25), math.log(0.25)])
    close(sequence_logprobs(model, ids, targets, average=True),
          [(math.log(0.5) + math.log(0.25)) / 2, math.log(0.25)])


def test_masked_mean_and_entropy():
    x, mask = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]]), torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    close(masked_mean(x, mask), 7.0 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)  # an empty mask gives 0, not nan
    close(entropy_from_logits(torch.zeros(2, 5)), [math.log(5)] * 2)
    close(entropy_from_logits(torch.tensor([0.0, -1e9])), 0.0)


# --------------------------------------------------------------------------- reward model, DPO, IPO


def test_reward_loss_value_and_margin():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.5, 0.0])
    close(reward_loss(chosen, rejected), [math.log1p(math.exp(-1.5)), math.log(2)])  # -log sigma(r_w - r_l)
    close(reward_loss(chosen, rejected, 1.0), [math.log1p(math.exp(-0.5)), math.log1p(math.e)])
    close(reward_loss(chosen, rejected, torch.tensor([1.0, -2.0])), [math.log1p(math.exp(-0.5)),
                                                                      math.log1p(math.exp(-2.0))])


def test_dpo_and_ipo_on_scalars():
    # h = (log pi - log ref)(y_w) - (log pi - log ref)(y_l) = (-1 + 2) - (-3 + 2) = 2; beta h = 1
    args = (torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]))
    out = dpo_loss(*args, beta=0.5)
    close(out.loss, [math.log1p(math.exp(-1))])  # -log sigma(1) = 0.3132617
    close(out.chosen_rewards, [0.5])
    close(out.rejected_rewards, [-0.5])
    # conservative DPO: -(1 - eps) log sigma(1) - eps log sigma(-1)
    close(dpo_loss(*args, beta=0.5, label_smoothing=0.1).loss, [0.9 * 0.3132617 + 0.1 * 1.3132617])
    # IPO: (h - 1 / (2 beta))^2 = (2 - 1)^2; and (2 - 1/0.2)^2 = 9 with beta 0.1
    close(dpo_loss(*args, beta=0.5, kind="ipo").loss, [1.0])
    close(dpo_loss(*args, beta=0.1, kind="ipo").loss, [9.0])
    assert not dpo_loss(*args, beta=0.5).chosen_rewards.requires_grad
    with pytest.raises(ValueError, match="kind"):
        dpo_loss(*args, beta=0.5, kind="kto")


def test_dpo_is_log2_when_policy_equals_reference():
    logps = torch.randn(4, requires_grad=True)
    out = dpo_loss(logps, logps.flip(0), logps.detach(), logps.detach().flip(0), beta=0.3)
    close(out.loss, [math.log(2)] * 4)
    close(dpo_loss(logps, logps, logps.detach(), logps.detach(), beta=0.3, kind="ipo").loss, [1 / 0.36] * 4)


# --------------------------------------------------------------------------- PPO

# two rows, three tokens; row 0's response is tokens 1-2 (token 0 is prompt), row 1's is tokens 0-1 (2 is padding)
MASK = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_kl_penalized_rewards_put_the_score_on_the_last_response_token():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]])
    ref_logprobs = torch.tensor([[-1.5, -1.0, -1.0], [-0.3, -1.7, -1.0]])
    rewards, kl = kl_penalized_rewards(torch.tensor([1.0, -2.0]), logprobs, ref_logprobs, MASK, kl_coef=0.1)
    close(kl, [[0.0, -1.0, 0.5], [0.0, 0.5, 0.0]])  # log pi - log pi_ref on response tokens only
    close(rewards, [[0.0, 0.1, -0.05 + 1.0], [0.0, -0.05 - 2.0, 0.0]])


def test_gae_advantages_and_returns_by_hand():
    gamma, lam = 0.9, 0.8
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.2, -1.0, 9.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.1, -0.3, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1 ends after token 1: its token 2 is ignored
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    # row 0: delta = (1 - 0.7, 0 + 0.9 * 0.7 - 0.6, 0 + 0.9 * 0.6 - 0.5) = (0.3, 0.03, 0.04) from the end;
    #        A_2 = 0.3, A_1 = 0.03 + 0.72 * 0.3 = 0.246, A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    # row 1: V after the last token is 0: A_1 = -1 + 0.3 = -0.7, A_0 = 0.2 - 0.27 - 0.1 + 0.72 * -0.7 = -0.674
    close(advantages, [[0.21712, 0.246, 0.3], [-0.674, -0.7, 0.0]])
    close(returns, [[0.71712, 0.846, 1.0], [-0.574, -1.0, 0.0]])


def _gae_loop(rewards, values, mask, gamma, lam):
    """GAE written from its definition, one row and one response at a time."""
    advantages = torch.zeros_like(rewards)
    for b in range(rewards.shape[0]):
        steps = [t for t in range(rewards.shape[1]) if mask[b, t]]
        following_adv = 0.0
        for i in reversed(range(len(steps))):
            t = steps[i]
            following_value = values[b, steps[i + 1]].item() if i + 1 < len(steps) else 0.0
            delta = rewards[b, t].item() + gamma * following_value - values[b, t].item()
            following_adv = delta + gamma * lam * following_adv
            advantages[b, t] = following_adv
    return advantages, (advantages + values) * mask


def test_gae_matches_a_loop_over_each_response():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.float)
    for gamma, lam in [(0.9, 0.8), (1.0, 0.95), (1.0, 1.0)]:
        got, expected = gae(rewards, values, mask, gamma, lam), _gae_loop(rewards, values, mask, gamma, lam)
        close(got[0], expected[0], atol=1e-5)
        close(got[1], expected[1], atol=1e-5)


def test_ppo_policy_loss_clips_on_the_side_the_advantage_points_to():
    # ratios 1.5 / 0.5 with A = +1 / -1, a ratio inside the range, and a masked token that would dominate
    ratio = torch.tensor([[1.5, 0.5, 1.5, 0.5, 1.1, 3.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.full_like(ratio, -2.0)
    logprobs = (old + ratio.log()).requires_grad_()
    out = ppo_policy_loss(logprobs, old, advantages, mask, clip=0.2)
    # per token max(-A rho, -A clip(rho)): -1.2 (clipped), -0.5, 1.5, 0.8 (clipped), -2.2
    close(out.loss, (-1.2 - 0.5 + 1.5 + 0.8 - 2.2) / 5)
    close(out.clip_fraction, 2 / 5)
    close(out.approx_kl, (0.5 * math.log(1.5) ** 2 * 2 + 0.5 * math.log(0.5) ** 2 * 2
                          + 0.5 * math.log(1.1) ** 2) / 5)
    out.loss.backward()
    # a clipped token passes no gradient; an unclipped one -A rho / n (d rho / d log pi = rho)
    close(logprobs.grad, [[0.0, -0.5 / 5, 1.5 / 5, 0.0, -2.2 / 5, 0.0]])


def test_ppo_value_loss_clips_around_the_old_values():
    values = torch.tensor([[1.0, 1.0, 0.1, 7.0]])
    old_values = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    returns = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # max((V - R)^2, (clip(V, old - 0.2, old + 0.2) - R)^2): max(0, 0.09), max(1, 0.49), 0.16 both ways
    close(ppo_value_loss(values, old_values, returns, mask, clip=0.2), 0.5 * (0.09 + 1.0 + 0.16) / 3)


def test_whiten_gives_zero_mean_and_unit_unbiased_variance_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 100.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # the masked entries 1, 2, 4, 5, 6: mean 3.6, squared deviations sum 17.2, unbiased variance 17.2 / 4
    out = whiten(x, mask)
    close(out[mask.bool()], (torch.tensor([1.0, 2.0, 4.0, 5.0, 6.0]) - 3.6) / math.sqrt(4.3))
    close(masked_mean(out, mask), 0.0)
    close(((out * mask) ** 2).sum() / (mask.sum() - 1), 1.0)
    kept = whiten(x, mask, shift_mean=False)
    close(kept[mask.bool()], out[mask.bool()] + 3.6)


# --------------------------------------------------------------------------- GRPO


def test_group_advantages_per_group_with_the_unbiased_std():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    std = math.sqrt((1.5 ** 2 + 0.5 ** 2) * 2 / 3)  # 1.2909944
    expected = [(r - 2.5) / (std + 1e-4) for r in (1.0, 2.0, 3.0, 4.0)] + [0.0] * 4
    close(group_advantages(rewards, 4), expected)  # equal rewards: zero advantages, not nan
    close(group_advantages(rewards, 4, scale=False), [-1.5, -0.5, 0.5, 1.5, 0.0, 0.0, 0.0, 0.0])
    # groups are independent: changing the second group leaves the first alone
    other = rewards.clone()
    other[4:] = torch.tensor([0.0, 10.0, -3.0, 7.0])
    close(group_advantages(other, 4)[:4], expected[:4])
    # pairs: deviations +-0.5 from the mean, unbiased std sqrt(0.5)
    pair = 0.5 / (math.sqrt(0.5) + 1e-4)
    close(group_advantages(rewards, 2), [-pair, pair, -pair, pair, 0, 0, 0, 0])


def test_grpo_loss_k3_kl_by_hand():
    # pi = 1/2, pi_ref = 1/4: D = pi_ref/pi - log(pi_ref/pi) - 1 = 0.5 + log 2 - 1 = 0.1931472
    k3 = 0.5 + math.log(2) - 1
    logprobs = torch.tensor([[math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25)]])
    mask = torch.ones(1, 1)
    out = grpo_loss(logprobs, logprobs.detach(), ref, torch.tensor([2.0]), mask, clip=0.2, beta=0.1)
    close(out.loss, -2.0 + 0.1 * k3)  # on-policy: rho = 1, so the surrogate is -A
    close(out.kl, k3)
    out.loss.backward()
    # d/d log pi of -A rho + beta D: -A + beta (1 - pi_ref / pi)
    close(logprobs.grad, [[-2.0 + 0.1 * 0.5]])
    # weighting D by rho leaves its value and adds beta D to the gradient (d rho / d log pi = rho = 1)
    logprobs.grad = None
    weighted = grpo_loss(logprobs, logprobs.detach(), ref, torch.tensor([2.0]), mask, 0.2, 0.1,
                         ratio_weighted_kl=True)
    close(weighted.loss, out.loss)
    weighted.loss.backward()
    close(logprobs.grad, [[-2.0 + 0.1 * (0.5 + k3)]])


def test_grpo_loss_sequence_and_token_normalisation_differ_with_lengths():
    # answer 0 has 1 token with A = 1, answer 1 has 3 tokens with A = -1; on-policy, no KL: l_it = -A_i
    logprobs = torch.full((2, 3), -1.0)
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    advantages = torch.tensor([1.0, -1.0])
    seq = grpo_loss(logprobs, logprobs, None, advantages, mask, clip=0.2, beta=0.0, normalize="sequence")
    tok = grpo_loss(logprobs, logprobs, None, advantages, mask, clip=0.2, beta=0.0, normalize="token")
    close(seq.loss, (-1.0 + 1.0) / 2)  # mean per answer, then over answers
    close(tok.loss, (-1.0 + 3 * 1.0) / 4)  # mean over all 4 tokens
    close(seq.kl, 0.0)
    # beta > 0 without a reference adds nothing
    close(grpo_loss(logprobs, logprobs, None, advantages, mask, 0.2, 0.5).loss, seq.loss)
    with pytest.raises(ValueError, match="normalize"):
        grpo_loss(logprobs, logprobs, None, advantages, mask, 0.2, 0.0, normalize="batch")


def test_grpo_loss_clips_the_ratio():
    # ratios 1.5 (A = +1: clipped to 1.2), 0.5 (A = -1: clipped to 0.8), 1.5 (A = -1: kept), 1.1 (kept)
    ratio = torch.tensor([[1.5], [0.5], [1.5], [1.1]])
    old = torch.full_like(ratio, -1.0)
    logprobs = (old + ratio.log()).requires_grad_()
    out = grpo_loss(logprobs, old, None, torch.tensor([1.0, -1.0, -1.0, 1.0]), torch.ones(4, 1), clip=0.2, beta=0.0)
    close(out.loss, (-1.2 + 0.8 + 1.5 - 1.1) / 4)
    close(out.clip_fraction, 2 / 4)
    out.loss.backward()
    close(logprobs.grad, [[0.0], [0.0], [1.5 / 4], [-1.1 / 4]])
