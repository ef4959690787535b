"""Fitting the parametric scaling law L(N, D) = E + A / N^alpha + B / D^beta to measured losses.

The method of Hoffmann et al. 2022 (Sec. 3.3, Approach 3): minimise the Huber loss (delta = 1e-3)
between log L and log of the law, written as LSE(a - alpha log N, b - beta log D, e) with
A = e^a, B = e^b, E = e^e, by L-BFGS from a grid of starting points; the best minimum wins.
Uncertainty is the spread over bootstrap resamples of the runs (as Besiroglu et al. 2024 report it).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmlab.plan.estimate import PlanError
from llmlab.plan.scaling import ParametricLaw

NAMES = ("E", "A", "B", "alpha", "beta", "size_exponent")


@dataclass
class LawFit:
    law: ParametricLaw
    stderr: dict[str, float]  # bootstrap standard deviation of each constant and of the size exponent
    objective: float  # mean Huber loss at the optimum
    n_runs: int


def _objective(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor, log_l: torch.Tensor,
               delta: float) -> torch.Tensor:
    a, b, e, alpha, beta = theta
    pred = torch.logsumexp(torch.stack([a - alpha * log_n, b - beta * log_d, e.expand_as(log_n)]), dim=0)
    return torch.nn.functional.huber_loss(pred, log_l, delta=delta, reduction="mean")


def _fit_once(log_n, log_d, log_l, starts, delta) -> tuple[torch.Tensor, float]:
    best, best_value = None, float("inf")
    for start in starts:
        theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1.0, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            value = _objective(theta, log_n, log_d, log_l, delta)
            value.backward()
            return value

        opt.step(closure)
        with torch.no_grad():
            value = float(_objective(theta, log_n, log_d, log_l, delta))
        if value < best_value and torch.isfinite(theta).all():
            best, best_value = theta.detach().clone(), value
    return best, best_value


def _law(theta: torch.Tensor, source: str) -> ParametricLaw:
    a, b, e, alpha, beta = theta.tolist()
    return ParametricLaw(float(torch.tensor(e).exp()), float(torch.tensor(a).exp()), float(torch.tensor(b).exp()),
                         alpha, beta, source)


def fit_law(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *, delta: float = 1e-3,
            bootstrap: int = 50, seed: int = 0) -> LawFit:
    """Fit L(N, D) to runs (params[i], tokens[i]) -> losses[i] (nats/token).

    Raises:
        PlanError: fewer than 5 runs (the law has 5 constants), values that are not finite and > 0, a single
            model size or token count (the two exponents cannot be told apart).
    """
    n, d, loss = (torch.tensor([float(x) for x in v], dtype=torch.float64) for v in (params, tokens, losses))
    if not len(n) == len(d) == len(loss):
        raise PlanError(f"params, tokens and losses differ in length: {len(n)}, {len(d)}, {len(loss)}")
    if len(n) < 5:
        raise PlanError(f"fitting 5 constants needs at least 5 runs, got {len(n)}")
    if not all(bool(((v > 0) & v.isfinite()).all()) for v in (n, d, loss)):
        raise PlanError("parameters, tokens and losses must all be finite and > 0")
    if len(set(n.tolist())) < 2 or len(set(d.tolist())) < 2:
        raise PlanError("the runs need at least two model sizes and two token counts")
    log_n, log_d, log_l = n.log(), d.log(), loss.log()
    # a coarse version of the grid of Hoffmann et al. (Sec. D.2): 2 x 2 x 3 x 2 x 2 = 48 starts
    grid = list(itertools.product((0.0, 10.0), (0.0, 10.0), (-1.0, 0.0, 1.0), (0.2, 0.8), (0.2, 0.8)))
    theta, value = _fit_once(log_n, log_d, log_l, grid, delta)
    if theta is None:
        raise PlanError("the fit did not converge from any starting point")
    samples = []
    generator = torch.Generator().manual_seed(seed)
    for _ in range(bootstrap):
        idx = torch.randint(0, len(n), (len(n),), generator=generator)
        if len(set(n[idx].tolist())) < 2 or len(set(d[idx].tolist())) < 2:
            continue
        boot, _ = _fit_once(log_n[idx], log_d[idx], log_l[idx], [theta.tolist()], delta)
        if boot is not None:
            law = _law(boot, "")
            samples.append([getattr(law, k) for k in NAMES])
    nan = [float("nan")] * len(NAMES)
    spread = torch.tensor(samples, dtype=torch.float64).std(dim=0).tolist() if len(samples) > 1 else nan
    return LawFit(_law(theta, f"fitted to {len(n)} runs"), dict(zip(NAMES, spread)), value, len(n))
