"""Compute-optimal sizing: how many parameters and tokens a FLOP budget should buy.

Three published answers, all with C = 6 N D:
- the parametric law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, "Training
  Compute-Optimal Large Language Models", Approach 3), whose minimum under the budget is
  N = G (C/6)^(beta/(alpha+beta)), D = (C/6) / N, with G = (alpha A / (beta B))^(1/(alpha+beta));
  with the constants as published or as re-estimated by Besiroglu et al. 2024;
- a fixed number of tokens per parameter (about 20, the paper's headline rule);
- Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", Sec. 6.1): N = 1.3e9 C^0.73 with C in
  petaflop/s-days and N counting non-embedding parameters, which favours larger models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmlab.models import LlamaConfig
from llmlab.plan.estimate import PF_DAY, PlanError, count, positive


@dataclass(frozen=True)
class ParametricLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta, N parameters, D training tokens, L in nats/token."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str = ""

    def loss(self, params: float, tokens: float) -> float:
        n, d = positive("params", params), positive("tokens", tokens)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    @property
    def size_exponent(self) -> float:
        """a in N_opt ~ C^a: how the compute-optimal model size grows with the budget."""
        return self.beta / (self.alpha + self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N, D) minimising the loss at 6 N D = flops."""
        positive("flop budget", flops)
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / 6) ** self.size_exponent
        return n, flops / (6 * n)


CHINCHILLA = ParametricLaw(1.69, 406.4, 410.7, 0.34, 0.28, "Hoffmann et al. 2022, Eq. 10 (Approach 3)")
CHINCHILLA_REFIT = ParametricLaw(1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                                 "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt, Eq. 4")
TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022: Chinchilla, 70B parameters on 1.4T tokens


def tokens_per_param_optimal(flops: float, ratio: float = TOKENS_PER_PARAM) -> tuple[float, float]:
    """(N, D) with D = ratio N and 6 N D = flops."""
    n = math.sqrt(positive("flop budget", flops) / (6 * positive("tokens per parameter", ratio)))
    return n, ratio * n


def kaplan_optimal(flops: float) -> tuple[float, float]:
    """(N, D) by Kaplan et al. 2020: N (non-embedding) = 1.3e9 (C / PF-day)^0.73, D = C / (6 N)."""
    n = 1.3e9 * (positive("flop budget", flops) / PF_DAY) ** 0.73
    return n, flops / (6 * n)


LAWS = {"chinchilla": CHINCHILLA.optimal, "chinchilla-refit": CHINCHILLA_REFIT.optimal,
        "tokens-per-param": tokens_per_param_optimal, "kaplan": kaplan_optimal}

SMALLEST_DIM, SMALLEST_LAYERS = 64, 1


def config_for_params(params: float, *, vocab_size: int = 32000, max_seq_len: int = 2048,
                      aspect_ratio: float = 100.0) -> LlamaConfig:
    """A LLaMA config with about `params` parameters (untied embeddings, SwiGLU at 8/3 d).

    Widths are multiples of 64 with heads of 64 (128 from width 2048); the depth is chosen so that
    width / depth is nearest `aspect_ratio` (Kaplan et al. find the loss flat over a wide range of
    shapes; 7B-70B LLaMA models sit between 100 and 128) among shapes within 10% of the count.
    """
    positive("params", params)
    count("vocab_size", vocab_size)
    count("max_seq_len", max_seq_len)
    positive("aspect_ratio", aspect_ratio)
    best = None
    for layers in range(SMALLEST_LAYERS, 161):
        # 12 L d^2 (attention 4 d^2, SwiGLU 8 d^2) + 2 V d = params, solved for d
        d = (-2 * vocab_size + math.sqrt(4 * vocab_size**2 + 48 * layers * params)) / (24 * layers)
        head_dim = 128 if d >= 2048 else 64
        dim = max(SMALLEST_DIM, head_dim * round(d / head_dim))
        cfg = LlamaConfig(vocab_size=vocab_size, dim=dim, n_layers=layers, n_heads=dim // head_dim,
                          max_seq_len=max_seq_len)
        error = abs(cfg.num_params().total / params - 1)
        key = (error > 0.1, abs(math.log(dim / layers / aspect_ratio)), error)
        if best is None or key < best[0]:
            best = (key, cfg)
    cfg = best[1]
    if abs(cfg.num_params().total / params - 1) > 0.5:
        smallest = LlamaConfig(vocab_size=vocab_size, dim=SMALLEST_DIM, n_layers=SMALLEST_LAYERS, n_heads=1)
        raise PlanError(f"{params:.3g} parameters is below the smallest model with a {vocab_size}-token vocabulary "
                        f"({smallest.num_params().total:,} parameters: dim {SMALLEST_DIM}, 1 layer)")
    return cfg
