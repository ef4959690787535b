"""Fitting the parametric law recovers known constants and predicts a held-out run."""

from __future__ import annotations

import itertools
import random

import pytest

from llmlab.plan.estimate import PlanError
from llmlab.plan.fit import fit_law
from llmlab.plan.scaling import ParametricLaw

TRUE = ParametricLaw(1.8, 400.0, 1200.0, 0.34, 0.33)


def grid_runs(noise: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    runs = [(n, d, TRUE.loss(n, d) * (1 + rng.gauss(0, noise)))
            for n, d in itertools.product((1e5, 3e5, 1e6, 3e6, 1e7), (1e7, 3e7, 1e8, 3e8))]
    return [list(x) for x in zip(*runs)]


def test_fit_recovers_the_constants_of_noiseless_runs():
    fit = fit_law(*grid_runs(), bootstrap=0)
    assert fit.law.alpha == pytest.approx(TRUE.alpha, rel=0.02)
    assert fit.law.beta == pytest.approx(TRUE.beta, rel=0.02)
    assert fit.law.E == pytest.approx(TRUE.E, rel=0.02)


def test_fit_on_noisy_runs_predicts_a_held_out_larger_run_and_reports_uncertainty():
    n, d, loss = grid_runs(noise=0.005, seed=1)
    fit = fit_law(n, d, loss, bootstrap=20)
    held_out = TRUE.loss(3e7, 1e9)  # beyond every run in both directions
    assert fit.law.loss(3e7, 1e9) == pytest.approx(held_out, rel=0.05)
    assert 0.1 < fit.law.alpha < 0.7 and 0.1 < fit.law.beta < 0.7
    assert all(s > 0 for s in fit.stderr.values())


@pytest.mark.parametrize("args, message", [
    (([1e5] * 4, [1e7] * 4, [3.0] * 4), "at least 5 runs"),
    (([1e5] * 6, [1e7, 2e7, 3e7, 4e7, 5e7, 6e7], [3.0] * 6), "two model sizes"),
    (([1e5, 2e5, 3e5, 4e5, -1], [1e7] * 5, [3.0] * 5), "must all be finite and > 0"),
    (([1e5, 2e5, 3e5, 4e5, 5e5], [1e7] * 4 + [float("inf")], [3.0] * 5), "must all be finite and > 0"),
    (([1e5, 2e5, 3e5, 4e5, 5e5], [1e7, 2e7, 3e7, 4e7, 5e7], [3.0] * 4 + [float("nan")]), "finite and > 0"),
    (([1e5, 2e5], [1e7], [3.0]), "differ in length"),
])
def test_bad_runs_are_clear_errors(args, message):
    with pytest.raises(PlanError, match=message):
        fit_law(*args)
