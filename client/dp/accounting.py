"""Epsilon from a history of Gaussian mechanisms, and the noise that keeps it on target.

A history is a list of ``(noise_multiplier, sample_rate, steps)``: ``steps`` releases of a
Gaussian mechanism with that noise multiplier (noise std / sensitivity) on a Poisson
sample of rate ``sample_rate`` (1.0: the whole dataset). Every release a hospital makes
is such an entry, so one history composes them all.

The math is Opacus's (``opacus.accountants.analysis``); this module keeps the per-step
RDP of each (noise, rate) pair, which costs 0.02-0.2 s to compute, in an
:class:`RdpTable` that a deployed hospital carries between its message processes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "PLAN_ORDERS",
    "RDP_ORDERS",
    "RdpTable",
    "compute_epsilon",
    "plan_noise_multiplier",
]

History = Sequence[tuple[float, float, int]]

# RDP orders searched for the tightest conversion to (epsilon, delta). Opacus's default
# stops at 63, too low for the small sample rates and few steps of a hospital round
# (Opacus then warns "optimal order is the largest alpha"); a wider grid gives a
# tighter, still valid, bound. Used for everything a hospital reports.
RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(11, 64),
    *(64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024),
)
# The noise is planned at integer orders only. There Opacus's RDP and Google's
# dp-accounting agree to 1e-14 (at fractional orders dp-accounting's bound is looser,
# by up to ~1% in epsilon), and these orders are in both libraries' default grids: a
# plan that keeps epsilon <= target here keeps it <= target under either accountant,
# and the reported epsilon (over more orders) can only be lower.
PLAN_ORDERS: tuple[int, ...] = (*range(2, 64), 128, 256, 512, 1024)
assert set(PLAN_ORDERS) <= set(RDP_ORDERS)  # the reported epsilon is at most the planned


class RdpTable:
    """Per-step RDP of each (noise multiplier, sample rate) pair at every order, cached.

    RDP composes additively and is linear in the number of steps, so epsilon for any
    history is a weighted sum of these rows, converted once.
    """

    def __init__(self) -> None:
        self._rows: dict[tuple[float, float, tuple[float, ...]], tuple[float, ...]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def per_step(
        self, noise_multiplier: float, sample_rate: float, orders: Sequence[float] = RDP_ORDERS
    ) -> tuple[float, ...]:
        """The RDP of one step at each of ``orders``."""
        orders = tuple(orders)
        key = (float(noise_multiplier), float(sample_rate), orders)
        if key not in self._rows:
            # Opacus (and torch) load on the first epsilon computed: reading a ledger,
            # or a key-exchange message, never needs them
            from opacus.accountants.analysis.rdp import compute_rdp

            rdp = compute_rdp(q=key[1], noise_multiplier=key[0], steps=1, orders=list(orders))
            self._rows[key] = tuple(float(x) for x in rdp)
        return self._rows[key]

    def epsilon(
        self, history: History, delta: float, orders: Sequence[float] = RDP_ORDERS
    ) -> float:
        """Epsilon of ``history`` at ``delta`` under RDP; 0 for an empty history."""
        if not history:
            return 0.0
        from opacus.accountants.analysis.rdp import get_privacy_spent  # as in per_step

        total = [0.0] * len(orders)
        for sigma, q, steps in history:
            if steps < 0 or steps != int(steps):  # a count of mechanisms: never less
                raise ValueError(f"a release of {steps!r} steps")
            row = self.per_step(sigma, q, orders)
            total = [t + int(steps) * r for t, r in zip(total, row, strict=True)]
        with warnings.catch_warnings():
            # A lone, lightly noised release (the record count) is tightest at the lowest
            # order of the grid, 1.1: a valid bound, and Opacus's warning would alarm.
            warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
            eps, _ = get_privacy_spent(orders=list(orders), rdp=total, delta=delta)
        return float(eps)

    def export(self, pairs: Iterable[tuple[float, float]]) -> dict[str, list[float]]:
        """The rows computed so far for these pairs (at RDP_ORDERS), to carry elsewhere.

        Keyed exactly (``sigma|q`` in float hex); a pair not computed yet is left out. A
        simulation worker serves many hospitals, so each carries only its own pairs.
        """
        out = {}
        for s, q in {(float(s), float(q)) for s, q in pairs}:
            row = self._rows.get((s, q, RDP_ORDERS))
            if row is not None:
                out[f"{s.hex()}|{q.hex()}"] = list(row)
        return out

    def absorb(self, carried: Mapping[str, Any]) -> int:
        """Take back what :meth:`export` gave; returns how many rows were usable.

        A row is used only if its key parses and it holds one finite, non-negative value
        per order; anything else is left out and computed again when needed.
        """
        used = 0
        for key, values in carried.items():
            try:
                sigma, q = (float.fromhex(part) for part in str(key).split("|"))
                row = tuple(float(v) for v in values)
            except (TypeError, ValueError):
                continue
            if len(row) == len(RDP_ORDERS) and all(math.isfinite(v) and v >= 0 for v in row):
                self._rows.setdefault((sigma, q, RDP_ORDERS), row)
                used += 1
        return used


# One table per process: a simulation worker serves many hospitals, and they share it.
RDP = RdpTable()


def compute_epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Epsilon after ``history`` at ``delta``, with Opacus's RDP or PRV accountant."""
    if not history:
        return 0.0
    if accountant == "rdp":
        return RDP.epsilon(history, delta)
    from opacus.accountants import create_accountant  # loaded late, as in RdpTable.per_step

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


def _planning_epsilon(history: History, delta: float, accountant: str) -> float:
    if accountant == "rdp":
        return RDP.epsilon(history, delta, PLAN_ORDERS)
    return compute_epsilon(history, delta, accountant)


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: History = (),
) -> float:
    """The smallest noise multiplier (to 0.1%) that keeps epsilon <= the target.

    Epsilon is that of ``prior`` (releases already made) followed by ``steps`` steps at
    ``sample_rate``. Under RDP it is computed at :data:`PLAN_ORDERS`, so the plan holds
    under Opacus and under dp-accounting alike. ValueError if ``prior`` alone already
    spends the target.
    """
    prior = list(prior)
    if steps < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"cannot plan {steps} steps at sample rate {sample_rate:g}")

    def eps(sigma: float) -> float:
        return _planning_epsilon([*prior, (sigma, sample_rate, steps)], delta, accountant)

    if prior and _planning_epsilon(prior, delta, accountant) >= target_epsilon:
        raise ValueError(
            f"releases already made spend epsilon {compute_epsilon(prior, delta, accountant):.3f}"
            f", nothing is left of the target {target_epsilon:g} for training"
        )
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, high * 2
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon:g}")
    while high - low > 1e-3 * high:  # epsilon(high) <= target throughout
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
