"""Calibrated probabilities from logits: temperature scaling and how well it fits.

A label's calibrated probability is ``sigmoid(logit / T)`` with a positive temperature
``T`` per label (``T = 1`` leaves the model as it is). Temperature scaling is monotone,
so it changes neither the ranking of the examples (AUROC) nor any decision made by
comparing a logit with a threshold logit; it changes only what the probabilities say.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "brier_score",
    "expected_calibration_error",
    "fit_temperatures",
    "negative_log_likelihood",
    "probabilities",
    "reliability_bins",
]


def _temperatures(temperatures: np.ndarray, num_labels: int) -> np.ndarray:
    t = np.asarray(temperatures, dtype=np.float64)
    if t.shape != (num_labels,):
        raise ValueError(f"temperatures must have shape ({num_labels},), got {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"temperatures must be finite and positive, got {t.tolist()}")
    return t


def probabilities(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """The calibrated probabilities ``sigmoid(logit / T_k)``, shape ``(n, K)``."""
    from scipy.special import expit  # loaded here, not at import: the CLI starts fast

    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be a 2-d array (n, K), got shape {z.shape}")
    return expit(z / _temperatures(temperatures, z.shape[1]))


def negative_log_likelihood(
    logits_k: np.ndarray, targets_k: np.ndarray, temperature: float
) -> float:
    """Mean binary cross-entropy of ``sigmoid(logit / T)`` against 0/1 targets (one label)."""
    s = np.asarray(logits_k, dtype=np.float64) / temperature
    y = np.asarray(targets_k, dtype=np.float64)
    # -[y log σ(s) + (1-y) log(1-σ(s))] = log(1 + e^s) - y s, computed without overflow
    return float(np.mean(np.logaddexp(0.0, s) - y * s))


def fit_temperatures(
    logits: np.ndarray, targets: np.ndarray, *, bounds: tuple[float, float] = (0.05, 20.0)
) -> np.ndarray:
    """Per label, the temperature minimising the negative log-likelihood on this data.

    Each label's temperature is found by a bounded scalar search over ``log T`` within
    ``bounds``. A label whose targets hold only one class keeps ``T = 1.0``: there the
    likelihood only improves as the probabilities approach that class, so the fit would
    run to a bound and say nothing about calibration.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    if z.ndim != 2 or z.shape != y.shape:
        raise ValueError(f"logits and targets must be 2-d of one shape, got {z.shape}, {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("cannot fit temperatures on zero examples")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits must be finite (found NaN or infinity)")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("targets must be 0 or 1")
    from scipy.optimize import minimize_scalar  # loaded here, not at import: as expit above

    low, high = bounds
    if not 0 < low < 1 < high:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}")
    out = np.ones(z.shape[1])
    for k in range(z.shape[1]):
        if y[:, k].min() == y[:, k].max():  # one class only: nothing to fit
            continue
        res = minimize_scalar(
            lambda u, k=k: negative_log_likelihood(z[:, k], y[:, k], math.exp(u)),
            bounds=(math.log(low), math.log(high)),
            method="bounded",
            options={"xatol": 1e-6},
        )
        out[k] = math.exp(res.x)
    return out


def _check_one_label(probs_k: np.ndarray, targets_k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs_k, dtype=np.float64)
    y = np.asarray(targets_k, dtype=np.float64)
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(
            f"probabilities and targets must be 1-d of one length, got {p.shape}, {y.shape}"
        )
    if p.size == 0:
        raise ValueError("no examples")
    if not np.all((p >= 0) & (p <= 1)):
        raise ValueError("probabilities must lie in [0, 1]")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("targets must be 0 or 1")
    return p, y


def reliability_bins(
    probs_k: np.ndarray, targets_k: np.ndarray, bins: int = 10
) -> list[dict[str, Any]]:
    """Equal-width probability bins of one label: edges, count, mean predicted, observed.

    Each bin is ``{"lower", "upper", "count", "mean_predicted", "observed_frequency"}``;
    bins are ``[lower, upper)`` except the last, which includes 1.0. An empty bin has
    count 0 and both means ``None``.
    """
    p, y = _check_one_label(probs_k, targets_k)
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    counts = np.bincount(index, minlength=bins)
    sum_p = np.bincount(index, weights=p, minlength=bins)
    sum_y = np.bincount(index, weights=y, minlength=bins)
    out = []
    for b in range(bins):
        c = int(counts[b])
        out.append(
            {
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": c,
                "mean_predicted": float(sum_p[b] / c) if c else None,
                "observed_frequency": float(sum_y[b] / c) if c else None,
            }
        )
    return out


def expected_calibration_error(probs_k: np.ndarray, targets_k: np.ndarray, bins: int = 10) -> float:
    """ECE of one label: mean |predicted - observed| over equal-width bins, weighted by count."""
    table = reliability_bins(probs_k, targets_k, bins)
    n = sum(b["count"] for b in table)
    return float(
        sum(
            b["count"] * abs(b["mean_predicted"] - b["observed_frequency"])
            for b in table
            if b["count"]
        )
        / n
    )


def brier_score(probs_k: np.ndarray, targets_k: np.ndarray) -> float:
    """Mean squared difference between the predicted probability and the 0/1 target."""
    p, y = _check_one_label(probs_k, targets_k)
    return float(np.mean((p - y) ** 2))
