"""Log-probabilities of given tokens under a model: what every alignment objective is written on."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[b, t] | ...) from `logits` (B, T, V), per position (B, T) in fp32; 0 where the
    target is -100. With `temperature`, p = softmax(logits / temperature): the distribution that
    sampling at that temperature draws from."""
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none", ignore_index=IGNORE)
    return -nll.view(targets.shape)


def sequence_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor, *,
                      average: bool = False) -> torch.Tensor:
    """Each row's summed log-probability of its targets (B,) (averaged over its target tokens with
    `average`). `targets[b, t]` is the token after `input_ids[b, t]`, -100 where nothing is scored;
    rows are right-padded, so padding never reaches a scored position."""
    logps = token_logprobs(model(input_ids), targets)
    total = logps.sum(1)
    return total / (targets != IGNORE).sum(1).clamp(min=1) if average else total
