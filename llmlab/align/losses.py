"""The alignment objectives as pure functions of tensors: no model, no optimizer, no config.

Each function quotes the equation it computes. Shapes: B sequences (or pairs), T response tokens;
`mask` (B, T) is 1.0 on response tokens and 0.0 on prompt and padding; log-probabilities are of the
sampled or given tokens, per token (B, T) or summed per sequence (B,).

- Bradley-Terry reward model (Ouyang et al. 2022, eq. 1; Stiennon et al. 2020)
- DPO (Rafailov et al. 2023, eq. 7), with conservative label smoothing (Mitchell 2023)
- IPO (Azar et al. 2023, eq. 17)
- PPO with a per-token KL penalty and GAE (Schulman et al. 2017; Ziegler et al. 2019; Ouyang et al. 2022, eq. 2)
- GRPO (Shao et al. 2024, eqs. 3-4)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- helpers


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` where `mask` is 1 (over `dim`, or everything); 0 where the mask is empty."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x normalised to unit variance (and zero mean, with `shift_mean`) over the masked entries; the
    variance is the unbiased one, as in Ziegler et al.'s and TRL's PPO."""
    mean = masked_mean(x, mask)
    centred = (x - mean) * mask
    n = mask.sum()
    var = (centred ** 2).sum() / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = -sum_v p(v) log p(v) per position, (..., V) -> (...)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# --------------------------------------------------------------------------- reward model


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Bradley-Terry: loss(r) = -E[log sigma(r(x, y_w) - r(x, y_l) - m)], per pair (B,).

    `chosen`, `rejected`: (B,) scalar rewards of the preferred and the other response; `margin`: an
    optional per-pair margin m (Llama 2's graded preferences), 0 by default."""
    return -F.logsigmoid(chosen.float() - rejected.float() - margin)


# --------------------------------------------------------------------------- DPO and IPO


class PreferenceLoss(NamedTuple):
    loss: torch.Tensor  # (B,) per pair
    chosen_rewards: torch.Tensor  # (B,) beta * log(pi/pi_ref)(y_w) of the log-probabilities given, detached
    rejected_rewards: torch.Tensor  # (B,) beta * log(pi/pi_ref)(y_l), likewise


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0,
             kind: str = "dpo") -> PreferenceLoss:
    """DPO or IPO on sequence log-probabilities (B,) of the chosen (w) and rejected (l) responses.

    With h = log pi(y_w|x)/pi_ref(y_w|x) - log pi(y_l|x)/pi_ref(y_l|x):

    dpo:  L = -(1 - eps) log sigma(beta h) - eps log sigma(-beta h)      (eps = label_smoothing; 0: eq. 7)
    ipo:  L = (h - 1/(2 beta))^2                                          (eq. 17; pass log-probabilities
                                                                           averaged over each response's tokens)
    """
    chosen_ratio = policy_chosen.float() - ref_chosen.float()
    rejected_ratio = policy_rejected.float() - ref_rejected.float()
    h = chosen_ratio - rejected_ratio
    if kind == "dpo":
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"kind must be 'dpo' or 'ipo', got {kind!r}")
    return PreferenceLoss(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# --------------------------------------------------------------------------- PPO


def kl_penalized_rewards(score: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT's reward per token: r_t = -kl_coef (log pi(a_t|s_t) - log pi_ref(a_t|s_t)), and at
    each response's last token also the sequence's score r_theta(x, y) (eq. 2 spread over the tokens).

    Returns (rewards (B, T), kl (B, T)), the per-token log-ratio estimate of the KL (zero off the mask)."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & (mask > 0)  # the last response token of each row
    rewards = rewards + last * score.unsqueeze(1)
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016):

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t),   A_t = delta_t + gamma lam A_{t+1},   R_t = A_t + V(s_t)

    over each row's response tokens (the mask ends an episode: V after the last token is 0).
    Returns (advantages, returns), both (B, T), zero off the mask."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * following - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


class PolicyLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    clip_fraction: torch.Tensor  # share of tokens whose ratio was clipped
    approx_kl: torch.Tensor  # mean of 0.5 (log ratio)^2 against the rollout's policy


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float) -> PolicyLoss:
    """Clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise, over masked tokens:

    L = E_t[max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))],   rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)"""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    return PolicyLoss(loss, clip_fraction.detach(), masked_mean(0.5 * log_ratio ** 2, mask).detach())


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float) -> torch.Tensor:
    """Clipped value loss: 1/2 E_t[max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2)]."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --------------------------------------------------------------------------- GRPO


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Outcome supervision: A_i = (r_i - mean(r_group)) / (std(r_group) + eps) for each of the G answers
    of a prompt (rewards (B,) with B = prompts x G, a prompt's answers adjacent); std is the unbiased
    one; `scale=False` leaves the centred rewards (Dr. GRPO)."""
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale:
        centred = centred / (groups.std(1, keepdim=True) + eps)
    return centred.flatten()


class GRPOLoss(NamedTuple):
    loss: torch.Tensor  # scalar
    kl: torch.Tensor  # mean per-token KL estimate against the reference (detached)
    clip_fraction: torch.Tensor


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float, beta: float,
              normalize: str = "sequence", *, ratio_weighted_kl: bool = False) -> GRPOLoss:
    """GRPO's objective (eq. 3) as a loss, per token t of answer i:

    l_it = -[min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i) - beta D_KL,it]
    D_KL,it = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1       (eq. 4, the unbiased estimator k3)
    rho_it = pi_theta(o_it) / pi_old(o_it)                       (per token; old = the sampling policy)

    `normalize`: "sequence" averages each answer's tokens, then the answers (the paper's 1/G sum 1/|o_i|);
    "token" averages every token of the batch (DAPO, Yu et al. 2025). `ref_logprobs` None with beta 0:
    no reference and no KL term. `ratio_weighted_kl` multiplies each D_KL,it by rho_it (gradient kept), so
    that the KL term's gradient is that of KL(pi_theta || pi_ref) for answers sampled from pi_old
    (DeepSeek-AI 2025, DeepSeek-V3.2, "unbiased KL estimate"); rho_it is 1 on a first pass over fresh
    answers but its gradient is not 0, so the update changes there too. The reported `kl` is the masked
    mean of the estimate as added to the loss."""
    ratio = torch.exp(logprobs - old_logprobs)
    adv = advantages.unsqueeze(1)
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip, 1 + clip) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if beta and ref_logprobs is not None:
        delta = ref_logprobs - logprobs
        kl = torch.exp(delta) - delta - 1
        if ratio_weighted_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
    if normalize == "sequence":
        loss = masked_mean(per_token, mask, dim=1).mean()
    elif normalize == "token":
        loss = masked_mean(per_token, mask)
    else:
        raise ValueError(f"normalize must be 'sequence' or 'token', got {normalize!r}")
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return GRPOLoss(loss, masked_mean(kl, mask).detach(), clip_fraction.detach())
