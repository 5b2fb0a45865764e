"""Held-out evaluation as sums, so that the server learns only the federation's results.

Every figure the server reports is computed from statistics that add up across
hospitals: per label, histograms of the predicted scores of the positive and of the
negative examples over fixed public bins, plus the example count, the loss sum, the
count of exact matches and the count of hospitals (1 from each hospital with held-out
records), so that the sum says how many hospitals it pools. Inside secure aggregation
the server unmasks only the sum of these vectors, never one hospital's, and derives
global AUROC, ROC curves, accuracy, precision, recall and F1 from it
(:meth:`EvalStats.metrics`).

The bins are uniform in logit space, 0.1 wide from -10 to 10 (scores from 4.5e-5 to
0.99995; scores beyond fall in the end bins). AUROC from the histogram counts pairs in
the same bin as ties (one half), so it is within the share of such pairs of the exact
value; the decision threshold 0.5 (logit 0) is a bin edge, so the threshold metrics are
exact.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared_model.metrics import histogram_auroc, macro_mean

__all__ = [
    "COARSE_EDGES",
    "COARSE_OF_FINE",
    "EVAL_LOSS_CLIP",
    "SCORE_BINS",
    "SCORE_EDGES",
    "EvalStats",
    "binormal_auroc",
    "binormal_auroc_draws",
    "coarse_cells",
    "readable",
]

SCORE_BINS = 200
_LOGIT_RANGE = 10.0
# The logits at the bins' edges (SCORE_BINS + 1 of them); bin i spans edges i and i + 1.
SCORE_EDGES = np.linspace(-_LOGIT_RANGE, _LOGIT_RANGE, SCORE_BINS + 1)
# Per-example held-out losses are clipped to this before summing, which bounds the sum
# (secure aggregation needs a bound on every value); an honest loss never comes close.
EVAL_LOSS_CLIP = 20.0
# examples, loss sum, exact matches, hospitals, hospitals that noised theirs, and the sum
# of their noise variances (per count; the loss sum's is EVAL_LOSS_CLIP^2 times it)
_HEADER = 6
_UNKNOWN_VARIANCE_HEADER = 5  # statistics saved before hospitals said their noise
_NOISELESS_HEADER = 4  # statistics saved before hospitals noised theirs
_LEGACY_HEADER = 3  # statistics saved before the hospital count was summed
# Inner edges, in logit, of the 16 bins a hospital releases noised statistics in
# (client/dp/held_out.py); on the 0.1 grid, with 0 among them.
COARSE_EDGES = (-4.0, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0)


# For each fine bin, the coarse bin (0 to 15) it lies in.
COARSE_OF_FINE = np.searchsorted(
    np.array(COARSE_EDGES), (SCORE_EDGES[:-1] + SCORE_EDGES[1:]) / 2, side="right"
)
# The coarse bins' edges (the ends open) and, for a starting guess, their middles.
_COARSE_BOUNDS = np.array([-np.inf, *COARSE_EDGES, np.inf])
_COARSE_MIDDLES = np.array(
    [
        COARSE_EDGES[0] - 0.5,
        *((a + b) / 2 for a, b in itertools.pairwise(COARSE_EDGES)),
        COARSE_EDGES[-1] + 0.5,
    ]
)


def coarse_cells(counts: np.ndarray) -> np.ndarray:
    """A label's fine-bin counts summed into the 16 coarse bins of COARSE_EDGES."""
    return np.bincount(COARSE_OF_FINE, weights=counts, minlength=len(COARSE_EDGES) + 1)


def _fit_normals(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(means, stds) of the normals whose binned counts best fit each row of ``cells``.

    Least squares between a row's (noised) coarse counts and its total times each bin's
    probability, by Levenberg-Marquardt on (mean, log std), all rows at once (written
    here: scipy's solvers fit one problem at a time, and a bootstrap fits thousands),
    from two starting widths, keeping the better fit. The std stays within e^-3 to e^3.
    """
    cells = np.atleast_2d(np.asarray(cells, dtype=np.float64))
    weights = np.clip(np.nan_to_num(cells), 0.0, None)
    mass = weights.sum(1)
    mean = np.divide(weights @ _COARSE_MIDDLES, mass, out=np.zeros(len(cells)), where=mass > 0)
    fits = [_levenberg_marquardt(cells, mean, np.full(len(cells), start)) for start in (0.5, -1.0)]
    (m1, l1, c1), (m2, l2, c2) = fits
    better = c2 < c1
    return np.where(better, m2, m1), np.exp(np.where(better, l2, l1))


def _levenberg_marquardt(
    cells: np.ndarray, mean: np.ndarray, log_std: np.ndarray, iterations: int = 60
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One start of :func:`_fit_normals`: (means, log stds, costs)."""
    # scipy loads here, not at import: a hospital imports this module in every message's
    # process, and only the server fits normals to pooled counts.
    from scipy.special import ndtr  # the standard normal CDF, without scipy.stats' checks

    total = cells.sum(1, keepdims=True)
    damping = np.full(len(cells), 1e-2)

    def fit(mean: np.ndarray, log_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = (_COARSE_BOUNDS - mean[:, None]) / np.exp(log_std)[:, None]
        return cells - total * np.diff(ndtr(z), axis=1), z

    residual, z = fit(mean, log_std)
    cost = (residual**2).sum(1)
    for _ in range(iterations):
        density = np.exp(-0.5 * np.square(z)) / math.sqrt(2.0 * math.pi)  # 0 at the open ends
        tilted = density * np.where(np.isfinite(z), z, 0.0)
        jacobian = total[..., None] * np.stack(
            [np.diff(density, axis=1) / np.exp(log_std)[:, None], np.diff(tilted, axis=1)], -1
        )  # d residual / d (mean, log std)
        normal = jacobian.transpose(0, 2, 1) @ jacobian
        gradient = (jacobian.transpose(0, 2, 1) @ residual[..., None])[..., 0]
        diagonal = np.diagonal(normal, axis1=1, axis2=2)
        damped = normal + (damping[:, None] * diagonal + 1e-9)[..., None] * np.eye(2)
        step = np.linalg.solve(damped, -gradient[..., None])[..., 0]
        trial_mean, trial_log = mean + step[:, 0], np.clip(log_std + step[:, 1], -3.0, 3.0)
        trial_residual, trial_z = fit(trial_mean, trial_log)
        trial_cost = (trial_residual**2).sum(1)
        better = trial_cost < cost
        mean = np.where(better, trial_mean, mean)
        log_std = np.where(better, trial_log, log_std)
        residual = np.where(better[:, None], trial_residual, residual)
        z = np.where(better[:, None], trial_z, z)
        cost = np.where(better, trial_cost, cost)
        damping = np.clip(np.where(better, damping / 3.0, damping * 4.0), 1e-12, 1e12)
    return mean, log_std, cost


def binormal_auroc(
    positives: np.ndarray, negatives: np.ndarray, noise_std: float = 0.0
) -> np.ndarray:
    """AUROC Phi((m1 - m0) / sqrt(s1^2 + s0^2)) of normals fitted to coarse cells.

    ``positives`` and ``negatives``: (..., 16) coarse counts of one label's classes, with
    Gaussian noise of ``noise_std`` per cell; NaN where a class is not :func:`readable`.
    """
    # Written here: ROC libraries take each example's score, not noised binned counts.
    from scipy.stats import norm  # loaded here, not at import: as ndtr above

    shape = np.shape(positives)[:-1]
    pos = np.reshape(positives, (-1, positives.shape[-1]))
    neg = np.reshape(negatives, (-1, negatives.shape[-1]))
    (m1, s1), (m0, s0) = _fit_normals(pos), _fit_normals(neg)
    auroc = norm.cdf((m1 - m0) / np.hypot(s1, s0))
    empty = ~(readable(pos.sum(1), noise_std) & readable(neg.sum(1), noise_std))
    return np.where(empty, np.nan, auroc).reshape(shape)


def readable(total: np.ndarray | float, noise_std: float) -> np.ndarray:
    """Whether a class's (noised) total says it holds examples at all.

    At least one example, and, under noise of ``noise_std`` per coarse cell, at least
    twice the std of the noise on a total of 16 cells: a class with no example passes
    by chance 2% of the time. A NaN std (not recorded) reads as no noise.
    """
    floor = max(1.0, 8.0 * noise_std) if math.isfinite(noise_std) else 1.0
    return np.isfinite(total) & (np.asarray(total) >= floor)


def binormal_auroc_draws(
    positives: np.ndarray,
    negatives: np.ndarray,
    noise_std: float,
    draws: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Bootstrap draws of :func:`binormal_auroc` for noised coarse cells (one label).

    A parametric bootstrap (Ferrando, Wang and Sheldon, AISTATS 2022): each draw samples
    each class's count from its fitted normal's bins, adds fresh Gaussian noise of the
    release's ``noise_std`` to every cell, and fits again; so the spread holds both the
    sampling and the privacy noise.
    """
    # Written here: no library's bootstrap adds the release's privacy noise to each draw.
    from scipy.stats import norm  # loaded here, not at import: as ndtr above

    out = []
    for cells in (positives, negatives):
        (mean,), (std,) = _fit_normals(cells)
        p = np.diff(norm.cdf((_COARSE_BOUNDS - mean) / std))
        n = max(round(float(cells.sum())), 1)
        out.append(rng.multinomial(n, p, size=draws) + rng.normal(0.0, noise_std, (draws, p.size)))
    return binormal_auroc(*out)  # the label was readable: no draw is dropped for noise


def score_bins(logits: np.ndarray) -> np.ndarray:
    """The bin index of each logit: 0.1-wide bins from -10 to 10, the ends open."""
    index = np.floor((np.asarray(logits, dtype=np.float64) + _LOGIT_RANGE) * SCORE_BINS / 20.0)
    return np.clip(index, 0, SCORE_BINS - 1).astype(np.int64)


@dataclass(kw_only=True)
class EvalStats:
    """Summable held-out statistics of one model on one or more hospitals' test splits."""

    labels: tuple[str, ...]
    examples: float
    loss_sum: float
    exact_matches: float
    positives: np.ndarray  # (labels, SCORE_BINS): count of positive examples per score bin
    negatives: np.ndarray  # (labels, SCORE_BINS): count of negative examples per score bin
    hospitals: float = 0.0  # hospitals whose records are in the sum (NaN: not recorded)
    noised: float = 0.0  # of them, hospitals whose statistics carry Gaussian noise
    # the variance of the Gaussian noise on each count (a public function of the
    # hospitals' settings, summed with them; NaN: not recorded)
    noise_variance: float = 0.0

    # ------------------------------------------------------------------ building
    @classmethod
    def from_predictions(
        cls,
        labels: Sequence[str],
        logits: np.ndarray,
        targets: np.ndarray,
        losses: np.ndarray,
        weights: np.ndarray | None = None,
    ) -> EvalStats:
        """Statistics of predictions ``logits`` (n, K) against multi-hot ``targets`` (n, K).

        ``losses`` (n,) are the per-example losses (clipped to EVAL_LOSS_CLIP here).
        ``weights`` (n,), each record's weight in every sum (default 1): with 1/k for a
        patient's k records, each patient weighs 1, so one patient moves the statistics
        no more than one record does.
        """
        logits, targets = np.asarray(logits, np.float64), np.asarray(targets) > 0.5
        k = len(labels)
        if logits.ndim != 2 or logits.shape[1] != k or targets.shape != logits.shape:
            raise ValueError(f"expected (n, {k}) logits and targets, got {logits.shape}")
        w = np.ones(len(logits)) if weights is None else np.asarray(weights, np.float64)
        bins = score_bins(logits)
        positives = np.zeros((k, SCORE_BINS))
        negatives = np.zeros((k, SCORE_BINS))
        for j in range(k):
            pos = targets[:, j]
            positives[j] = np.bincount(bins[pos, j], weights=w[pos], minlength=SCORE_BINS)
            negatives[j] = np.bincount(bins[~pos, j], weights=w[~pos], minlength=SCORE_BINS)
        exact = (((logits >= 0) == targets).all(axis=1) * w).sum()
        clipped = np.clip(np.asarray(losses, np.float64), 0.0, EVAL_LOSS_CLIP)
        return cls(
            labels=tuple(labels),
            examples=float(w.sum()),
            loss_sum=float((clipped * w).sum()),
            exact_matches=float(exact),
            positives=positives,
            negatives=negatives,
            hospitals=1.0 if len(logits) else 0.0,
        )

    @classmethod
    def zeros(cls, labels: Sequence[str]) -> EvalStats:
        """No examples: what a hospital that does not evaluate adds."""
        k = len(labels)
        return cls(
            labels=tuple(labels),
            examples=0.0,
            loss_sum=0.0,
            exact_matches=0.0,
            positives=np.zeros((k, SCORE_BINS)),
            negatives=np.zeros((k, SCORE_BINS)),
        )

    @staticmethod
    def vector_size(num_labels: int) -> int:
        """Length of :meth:`to_vector` for ``num_labels`` labels."""
        return _HEADER + 2 * num_labels * SCORE_BINS

    def to_vector(self) -> np.ndarray:
        """The statistics as one float64 vector: what is summed across hospitals."""
        header = np.array(
            [
                self.examples,
                self.loss_sum,
                self.exact_matches,
                self.hospitals,
                self.noised,
                self.noise_variance,
            ]
        )
        return np.concatenate([header, self.positives.ravel(), self.negatives.ravel()])

    @classmethod
    def from_vector(
        cls, labels: Sequence[str], vector: np.ndarray, *, current: bool = False
    ) -> EvalStats:
        """Inverse of :meth:`to_vector`; ValueError if the length does not fit ``labels``.

        A vector saved before the hospital count was summed reads with ``hospitals`` NaN,
        one saved before the noise variance was summed with ``noise_variance`` NaN (when
        noised): not recorded. ``current``: only the current layout (what a hospital sends
        now), so no reply can bring a NaN into a sum.
        """
        k = len(labels)
        vector = np.asarray(vector, dtype=np.float64).ravel()
        header = vector.size - 2 * k * SCORE_BINS
        older = (_UNKNOWN_VARIANCE_HEADER, _NOISELESS_HEADER, _LEGACY_HEADER)
        if header != _HEADER and (current or header not in older):
            raise ValueError(
                f"evaluation statistics of {vector.size} values, expected "
                f"{cls.vector_size(k)} for {k} labels"
            )
        noised = float(vector[4]) if header >= _UNKNOWN_VARIANCE_HEADER else 0.0
        unknown = math.nan if noised > 0 else 0.0  # saved before the variance was summed
        variance = float(vector[5]) if header == _HEADER else unknown
        negative = (vector[3:header] < 0).any() or (noised == 0.0 and (vector < 0).any())
        if not np.isfinite(vector).all() or negative:
            raise ValueError(
                "evaluation statistics must be finite and non-negative (only noised "
                "statistics hold negative counts)"
            )
        hist = vector[header:].reshape(2, k, SCORE_BINS)
        examples, loss_sum, exact_matches = map(float, vector[:_LEGACY_HEADER])
        return cls(
            labels=tuple(labels),
            examples=examples,
            loss_sum=loss_sum,
            exact_matches=exact_matches,
            positives=hist[0].copy(),
            negatives=hist[1].copy(),
            hospitals=float(vector[3]) if header >= _NOISELESS_HEADER else math.nan,
            noised=noised,
            noise_variance=variance,
        )

    def __add__(self, other: EvalStats) -> EvalStats:
        if other.labels != self.labels:
            raise ValueError("cannot add evaluation statistics of different labels")
        return EvalStats(
            labels=self.labels,
            examples=self.examples + other.examples,
            loss_sum=self.loss_sum + other.loss_sum,
            exact_matches=self.exact_matches + other.exact_matches,
            positives=self.positives + other.positives,
            negatives=self.negatives + other.negatives,
            hospitals=self.hospitals + other.hospitals,
            noised=self.noised + other.noised,
            noise_variance=self.noise_variance + other.noise_variance,
        )

    def rounded(self) -> EvalStats:
        """Counts rounded to whole examples (a secure sum carries quantization noise).

        Noised statistics are left as they are: their noise dwarfs the quantization's,
        and rounding or clipping them would bias what is estimated from them.
        """
        if self.noised > 0:
            return self
        return EvalStats(
            labels=self.labels,
            examples=float(round(self.examples)),
            loss_sum=max(self.loss_sum, 0.0),
            exact_matches=float(round(self.exact_matches)),
            positives=np.maximum(np.round(self.positives), 0.0),
            negatives=np.maximum(np.round(self.negatives), 0.0),
            hospitals=float(round(self.hospitals)) if math.isfinite(self.hospitals) else math.nan,
            noised=0.0,
        )

    # ------------------------------------------------------------------ figures
    def auroc(self, j: int) -> float:
        """Label ``j``'s AUROC from the histograms; same-bin pairs count one half.

        NaN when the examples hold only one class of the label.
        """
        if self.noised > 0:
            return self._binormal_auroc(j)
        pos, neg = np.clip(self.positives[j], 0, None), np.clip(self.negatives[j], 0, None)
        return float(histogram_auroc(pos, neg))

    def _binormal_auroc(self, j: int) -> float:
        """Label ``j``'s AUROC from noised counts: a normal fitted to each class's scores.

        Counts released with Gaussian noise sum to a histogram whose cells may be
        negative; AUROC read cell by cell adds up that noise. Fitting one normal (in
        logit) to each class's 16 coarse cells by least squares, AUROC is
        Phi((m1 - m0) / sqrt(s1^2 + s0^2)): the binormal model of ROC analysis. Only
        released values are used (post-processing).
        """
        cells = [coarse_cells(h[j]) for h in (self.positives, self.negatives)]
        return float(binormal_auroc(*cells, noise_std=self.noise_std))

    @property
    def noise_std(self) -> float:
        """The std of the noise on each summed count (0: exact; NaN: not recorded)."""
        if math.isnan(self.noise_variance):
            return math.nan
        return math.sqrt(max(self.noise_variance, 0.0))

    def has_both_classes(self, j: int) -> bool:
        """Whether label ``j`` has positives and negatives, as far as the sums tell."""
        totals = self.positives[j].sum(), self.negatives[j].sum()
        if self.noised > 0:
            return all(bool(readable(t, self.noise_std)) for t in totals)
        return all(t > 0 for t in totals)

    def roc_curve(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(false positive rates, true positive rates) of label ``j`` at every bin edge."""
        # Written here: sklearn's roc_curve takes each example's score, not summed counts.
        pos = np.clip(self.positives[j][::-1], 0, None)  # highest scores first
        neg = np.clip(self.negatives[j][::-1], 0, None)
        tpr = np.concatenate([[0.0], np.cumsum(pos)]) / max(pos.sum(), 1.0)
        fpr = np.concatenate([[0.0], np.cumsum(neg)]) / max(neg.sum(), 1.0)
        return fpr, tpr

    def clamped(self) -> EvalStats:
        """These statistics with noised counts put back in range (post-processing).

        Hospitals may release their statistics with Gaussian noise, so sums can hold
        negative counts, a loss below zero or more exact matches than examples.
        """
        examples = max(self.examples, 1.0)
        return dataclasses.replace(
            self,
            examples=examples,
            loss_sum=min(max(self.loss_sum, 0.0), EVAL_LOSS_CLIP * examples),
            exact_matches=min(max(self.exact_matches, 0.0), examples),
            positives=np.clip(self.positives, 0.0, None),
            negatives=np.clip(self.negatives, 0.0, None),
        )

    def metrics(self) -> dict[str, float]:
        """Loss, macro accuracy, precision, recall, F1, exact match and AUROC.

        AUROC per label and macro; the others at the decision threshold 0.5; NaN where
        undefined.
        """
        if self.examples <= 0:
            return {}
        if self.noised > 0 or (self.positives < 0).any() or (self.negatives < 0).any():
            # noised counts (a hospital's DP release): AUROC from the raw sums (the noise
            # is unbiased), the rest from counts clipped at zero
            out = self.clamped()._counted_metrics()
        else:
            out = self._counted_metrics()
        aurocs = [self.auroc(j) for j in range(len(self.labels))]
        for label, value in zip(self.labels, aurocs, strict=True):
            out[f"auroc.{label}"] = value
        out["auroc"] = macro_mean(aurocs)
        return out

    def _counted_metrics(self) -> dict[str, float]:
        """Loss, accuracy, precision, recall, F1 and exact match at threshold 0.5."""
        # Written here: sklearn's metrics take each example's decision, not summed counts.
        n = self.examples
        half = SCORE_BINS // 2  # bins from here up have logit >= 0: predicted positive
        tp = self.positives[:, half:].sum(1)
        fn = self.positives[:, :half].sum(1)
        fp = self.negatives[:, half:].sum(1)
        tn = self.negatives[:, :half].sum(1)
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        f1 = np.divide(
            2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=(2 * tp + fp + fn) > 0
        )
        out = {
            "loss": self.loss_sum / n,
            "accuracy": float(np.mean((tp + tn) / n)),
            "exact-match": self.exact_matches / n,
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "f1": float(f1.mean()),
        }
        return out
