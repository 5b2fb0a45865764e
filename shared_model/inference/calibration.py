"""Calibrated probabilities from logits: temperature scaling and its fit.

A label's calibrated probability is ``sigmoid(logit / T)`` with a positive temperature
``T`` per label (``T = 1`` leaves the model as it is). Temperature scaling is monotone,
so it changes neither the ranking of the examples (AUROC) nor any decision made by
comparing a logit with a threshold logit; it changes only what the probabilities say.
How well they are calibrated (reliability bins, ECE, Brier score) is measured in
:mod:`shared_model.metrics`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_temperatures", "negative_log_likelihood", "probabilities"]


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
