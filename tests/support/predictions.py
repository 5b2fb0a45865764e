"""Synthetic multi-label predictions for the metric tests: logits that separate the classes."""

from __future__ import annotations

import numpy as np


def predictions(
    n: int, seed: int, signal: float = 1.5, prevalence: float = 0.3, k: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, multi-hot targets) of ``n`` examples and ``k`` labels; ``signal`` is how far
    a positive's logit is shifted up (0: no signal, AUROC 0.5)."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < prevalence).astype(float)
    logits = rng.normal(size=targets.shape) + signal * (targets - prevalence)
    return logits, targets
