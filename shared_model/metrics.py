"""Classification metrics, written once for every caller.

The training engine, the federation's summed held-out statistics
(:mod:`shared_model.evaluation`), a hospital's own evaluation
(:mod:`shared_model.inference.metrics`) and the membership-inference audit all read
their figures from here:

- per-label AUROC (scikit-learn) and the macro mean over the labels where it is defined:
  a label whose targets hold one class has no AUROC (NaN) and is left out of the mean,
  never counted as 0.5;
- AUROC from class counts over ordered score bins, the form that summed histograms and
  bootstrap resamples take;
- one percentile bootstrap over examples (seeded; optionally stratified) and its 95%
  interval;
- reliability bins, expected calibration error and Brier score of one label's
  probabilities.

Only numpy loads at import: the training processes import this module and never need
scikit-learn.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "bootstrap_aurocs",
    "brier_score",
    "classification_metrics",
    "expected_calibration_error",
    "histogram_auroc",
    "macro_mean",
    "per_label_auroc",
    "percentile_ci",
    "reliability_bins",
]

_BOOTSTRAP_CELLS = 4_000_000  # resamples x examples held in memory at once


# ------------------------------------------------------------------------- AUROC
def per_label_auroc(targets: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each label's AUROC of ``scores`` (n, K) against multi-hot ``targets`` (n, K).

    NaN for a label whose targets hold only one class: its AUROC is undefined.
    """
    # scikit-learn loads here, not at import: a deployed hospital starts a process per
    # message, the training ones never need it, and the command line starts fast without it.
    from sklearn.metrics import roc_auc_score

    y, s = np.asarray(targets), np.asarray(scores)
    out = np.full(y.shape[1], math.nan)
    for k in range(y.shape[1]):
        if 0 < y[:, k].sum() < len(y):
            out[k] = roc_auc_score(y[:, k], s[:, k])
    return out


def macro_mean(values: Iterable[float]) -> float:
    """The unweighted mean of a per-label figure over the labels where it is defined.

    NaN values (undefined) are left out; NaN when no label has the figure.
    """
    defined = [float(v) for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def histogram_auroc(positives: np.ndarray, negatives: np.ndarray) -> np.ndarray:
    """AUROC from the counts of positive and of negative examples over ascending score bins.

    ``positives`` and ``negatives``: (..., bins), bin i scoring below bin i + 1. A pair in
    one bin is a tie and counts one half (the Mann-Whitney U statistic), as in
    scikit-learn's ``roc_auc_score``. Counts may be weights. NaN where a class is empty.
    """
    # Written here: roc_auc_score takes one sample per call, and this runs over thousands
    # of bootstrap draws at once.
    pos, neg = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    below = np.cumsum(neg, axis=-1) - neg  # negatives in lower bins
    pairs = pos.sum(-1) * neg.sum(-1)
    wins = (pos * (below + 0.5 * neg)).sum(-1)
    return np.divide(wins, pairs, out=np.full(np.shape(pairs), math.nan), where=pairs > 0)


# ------------------------------------------------------------------------- bootstrap
def bootstrap_aurocs(
    targets: np.ndarray,
    scores: np.ndarray,
    resamples: int,
    seed: int,
    *,
    strata: Sequence[np.ndarray] | None = None,
) -> np.ndarray:
    """AUROC of each label on each bootstrap resample of the examples, shape ``(resamples, K)``.

    A resample draws the examples (rows) with replacement, jointly for all labels, from a
    generator seeded with ``seed``. ``strata``: index arrays of disjoint groups of rows
    (members and non-members, say); a resample then draws from each group as many rows as
    it holds, in the order given, so each group keeps its size. NaN where a resample holds
    one class of a label.
    """
    # Written here: scikit-learn has no bootstrap, and calling roc_auc_score per resample
    # and label is slow. A resample is a vector of row multiplicities, and its AUROC comes
    # from one sort per label: the weighted counts per distinct score, as histograms.
    y, s = np.asarray(targets), np.asarray(scores, np.float64)
    n, k = s.shape
    groups = [np.arange(n)] if strata is None else [np.asarray(g) for g in strata]
    groups = [g for g in groups if g.size]
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, k))
    ties = []
    for j in range(k):
        order = np.argsort(s[:, j], kind="stable")
        sorted_scores = s[order, j]
        starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
        ties.append((order, y[order, j] == 1, starts))
    chunk = max(1, _BOOTSTRAP_CELLS // max(n, 1))
    for first in range(0, resamples, chunk):
        c = min(chunk, resamples - first)
        if len(groups) == 1:  # one call for the chunk: the same draws, far faster
            rows = groups[0][rng.integers(0, groups[0].size, size=(c, groups[0].size))]
        else:  # resample by resample, each group in turn
            rows = np.stack(
                [
                    np.concatenate([g[rng.integers(0, g.size, g.size)] for g in groups])
                    for _ in range(c)
                ]
            )
        rows += (np.arange(c) * n)[:, None]
        weights = np.bincount(rows.ravel(), minlength=c * n).reshape(c, n).astype(np.float64)
        for j, (order, positive, starts) in enumerate(ties):
            w = weights[:, order]
            pos = np.add.reduceat(np.where(positive, w, 0.0), starts, axis=1)
            neg = np.add.reduceat(np.where(positive, 0.0, w), starts, axis=1)
            out[first : first + c, j] = histogram_auroc(pos, neg)
    return out


def percentile_ci(draws: np.ndarray) -> tuple[float, float]:
    """The 95% percentile interval of bootstrap draws, NaN draws left out; NaN if none is left."""
    values = np.asarray(draws, np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


# ------------------------------------------------------------------------- at a threshold
def classification_metrics(
    y_true: np.ndarray, y_score: np.ndarray, labels: Sequence[str], threshold: float = 0.5
) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (macro) and ROC-AUC (per label and macro).

    A label with only one class in ``y_true`` has no defined AUROC: it is reported as NaN
    and left out of the macro mean, never counted as 0.5.
    """
    # scikit-learn loads here, not at import: a deployed hospital starts a process per
    # message, and the training ones never need it.
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    y_pred = (y_score >= threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, average="macro", zero_division=0
    )
    out = {
        "accuracy": float(
            np.mean([accuracy_score(y_true[:, k], y_pred[:, k]) for k in range(len(labels))])
        ),
        "exact-match": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
    aurocs = per_label_auroc(y_true, y_score)
    for label, auc in zip(labels, aurocs, strict=True):
        out[f"auroc.{label}"] = float(auc)
    out["auroc"] = macro_mean(aurocs)
    return out


# ------------------------------------------------------------------------- calibration
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
    # Written here: sklearn's calibration_curve drops empty bins and returns no counts,
    # which the reliability table and the ECE need (its bins are also (lower, upper]).
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
    # Written here: scikit-learn has no ECE.
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
    from sklearn.metrics import brier_score_loss  # loaded here, not at import: start-up time

    p, y = _check_one_label(probs_k, targets_k)
    return float(brier_score_loss(y, p))
