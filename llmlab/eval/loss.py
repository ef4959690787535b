"""Validation loss: the one definition of "loss per token" that training and evaluation share.

The loss of a set of batches is the sum of next-token losses over every target token divided by
the number of target tokens (targets of -100 count for nothing), so a batch with more answer
tokens weighs more, and padding or prompt tokens weigh nothing. Perplexity is exp(loss) and bits
per byte loss / ln 2 * tokens / bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class TokenLoss:
    nats: float  # summed negative log-likelihood of the target tokens
    tokens: int  # target tokens scored

    @property
    def mean(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.mean, 700.0))

    def bits_per_byte(self, bytes_per_token: float) -> float:
        return self.mean / math.log(2) / bytes_per_token


@torch.no_grad()
def token_loss(model, batches: Iterable[dict]) -> TokenLoss:
    """Loss per target token over `batches` (each the keyword arguments of `model(**batch)`, with
    `targets`); the model is put in eval mode for the pass and back in its mode after."""
    training = model.training
    model.eval()
    nats, tokens = 0.0, 0
    try:
        for batch in batches:
            n = int((batch["targets"] != IGNORE).sum())
            if n:
                nats += float(model(**batch)) * n  # the model returns the mean over its target tokens
                tokens += n
    finally:
        model.train(training)
    return TokenLoss(nats, tokens)
