"""The one-run audit's bound: the paper's caps, its shape, and its 95% guarantee."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.stats import binom

from client.audit.bound import epsilon_cap, epsilon_lower_bound, p_value


def _p_value_loop(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The paper's appendix code, line for line."""
    q = 1 / (1 + math.exp(-epsilon))
    beta = binom.sf(v - 1, r, q)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1)


@pytest.mark.parametrize(("guesses", "cap"), [(100, 3.49), (1_000, 5.81), (10_000, 8.11)])
def test_perfect_guesses_reach_the_quoted_caps(guesses: int, cap: float) -> None:
    assert epsilon_cap(guesses, guesses, 0.0) == pytest.approx(cap, abs=0.01)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 200, 150, 1.0, 1e-5),
        (1000, 200, 199, 3.0, 1e-3),
        (50, 40, 25, 0.2, 0.01),
        (10, 10, 0, 0.5, 0.1),
    ],
)
def test_the_p_value_is_the_papers_loop(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(_p_value_loop(m, r, v, eps, delta))


def test_the_bound_grows_with_right_guesses_and_is_zero_at_chance() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 10)]
    assert bounds[0] == 0.0  # half right: what a coin toss gets
    assert all(b <= c for b, c in itertools.pairwise(bounds))
    assert bounds[-1] > bounds[len(bounds) // 2] > 0


def test_the_bound_is_rejected_at_the_stated_confidence() -> None:
    m, r, v, delta = 1000, 200, 140, 1e-5
    eps = epsilon_lower_bound(m, r, v, delta)
    assert p_value(m, r, v, eps, delta) < 0.05 <= p_value(m, r, v, eps + 1e-3, delta)


def test_randomized_response_at_epsilon_is_bounded_by_epsilon_95_percent_of_the_time() -> None:
    """Guesses from exact epsilon-DP randomized response: the bound exceeds epsilon rarely."""
    rng = np.random.default_rng(7)
    eps, m, r, trials = 1.0, 1000, 200, 400
    right = rng.binomial(r, 1 / (1 + math.exp(-eps)), size=trials)
    over = sum(epsilon_lower_bound(m, r, int(v), 0.0) > eps for v in right)
    assert over / trials <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials)
    # and the audit has some power: a good share of runs show a positive bound
    assert sum(epsilon_lower_bound(m, r, int(v), 0.0) > 0 for v in right) > trials / 4


def test_impossible_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="v <= r <= m"):
        p_value(10, 20, 5, 1.0, 0.0)
