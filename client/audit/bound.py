"""The one-run audit's bound: an empirical lower bound on epsilon from guess counts.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023,
arXiv 2305.08846): m canaries are each included in training independently with
probability 1/2; after one run an auditor guesses "included" or "excluded" for r of them
and gets v right. Under (epsilon, delta)-DP the number of right guesses is stochastically
dominated by Binomial(r, e^eps / (1 + e^eps)) (randomized response), up to a delta term;
the p-value below is the paper's (its appendix code, written out here because no
maintained library ships it), and the bound is the largest epsilon it rejects.

The bound is capped by the guess count: even r perfect guesses only reject epsilon up to
about 3.5 (r = 100), 5.8 (1,000) or 8.1 (10,000) at 95% confidence.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

__all__ = ["epsilon_cap", "epsilon_lower_bound", "p_value"]


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least ``v`` of ``r`` guesses right] under (epsilon, delta)-DP: the paper's bound.

    ``m`` canaries, each included with probability 1/2; ``r`` guesses (abstentions left
    out); ``v`` of them right.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1 / (1 + math.exp(-epsilon))  # the accuracy of epsilon-DP randomized response
    beta = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    if v == 0 or delta == 0:
        return min(beta, 1.0)
    # alpha = max over i in 1..v of P[v > Binomial(r, q) >= v - i] / i (the paper's loop)
    mass = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
    alpha = float(np.max(mass / np.arange(1, v + 1)))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that ``v`` right guesses of ``r`` reject at ``confidence``.

    0 when the guesses reject nothing (e.g. chance level). Binary search as in the paper:
    p_value falls as epsilon falls, so every epsilon below the result is rejected too.
    """
    p = 1 - confidence
    if p_value(m, r, v, 0.0, delta) >= p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < p:
        low, high = high, high + 1.0
    for _ in range(40):
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) < p:
            low = mid
        else:
            high = mid
    return low


def epsilon_cap(m: int, r: int, delta: float, confidence: float = 0.95) -> float:
    """The most an audit of ``r`` guesses among ``m`` canaries can show: all guesses right."""
    return epsilon_lower_bound(m, r, r, delta, confidence)
