"""A hospital's own evaluation of a model: per-label figures with 95% confidence intervals.

Everything is computed from the model's logits and this hospital's labelled test set;
nothing here leaves the machine it runs on. Per label (see :func:`evaluate_predictions`):

- AUROC (scikit-learn) with a percentile bootstrap 95% CI. The rows are resampled with
  replacement jointly for all labels, so the macro CI uses the same resamples. A label
  whose targets hold one class has no AUROC (NaN, ``None`` in JSON): it is left out of
  the macro mean, never counted as 0.5. A resample in which a label has one class is
  skipped for that label (and for the macro); the figures record how many were used.
- Sensitivity, specificity, PPV and NPV at the given threshold logits (positive iff
  ``logit >= threshold``), each with a Wilson score 95% interval; NaN when the
  denominator is 0. Decisions do not depend on the temperatures.
- ECE (10 equal-width bins) and Brier score of the calibrated probabilities
  ``sigmoid(logit / T)``, and the reliability bins behind the ECE.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from shared_model.inference.calibration import probabilities
from shared_model.metrics import (
    bootstrap_aurocs,
    brier_score,
    expected_calibration_error,
    macro_mean,
    per_label_auroc,
    percentile_ci,
    reliability_bins,
)

__all__ = [
    "LabelFigures",
    "LocalEvaluation",
    "MacroFigures",
    "Proportion",
    "check_predictions",
    "evaluate_predictions",
    "wilson_interval",
]


def wilson_interval(successes: int, total: int) -> tuple[float, float]:
    """Wilson score 95% interval of a binomial proportion; ``(nan, nan)`` when ``total`` is 0."""
    if total == 0:
        return (math.nan, math.nan)
    from scipy.stats import binomtest  # loaded here, not at import: the CLI starts fast

    ci = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def _json(value: Any) -> Any:
    """``value`` as plain JSON: NaN -> None, tuples -> lists, numpy scalars -> Python."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _ToDict:
    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready values (NaN and infinities as ``None``)."""
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True)
class Proportion(_ToDict):
    """A proportion ``successes / total`` with its Wilson 95% interval (NaN if total is 0)."""

    value: float
    ci95: tuple[float, float]
    successes: int
    total: int

    @classmethod
    def of(cls, successes: int, total: int) -> Proportion:
        """The proportion and its interval."""
        value = successes / total if total else math.nan
        return cls(
            value=value, ci95=wilson_interval(successes, total), successes=successes, total=total
        )


@dataclass(frozen=True, kw_only=True)
class LabelFigures(_ToDict):
    """One label's figures on this hospital's test set."""

    label: str
    n: int
    positives: int
    prevalence: float
    auroc: float  # NaN when the targets hold one class
    auroc_ci95: tuple[float, float]
    auroc_resamples: int  # bootstrap resamples in which the AUROC was defined
    threshold_logit: float
    temperature: float
    threshold_probability: float  # sigmoid(threshold_logit / temperature)
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Proportion  # tp / (tp + fn)
    specificity: Proportion  # tn / (tn + fp)
    ppv: Proportion  # tp / (tp + fp)
    npv: Proportion  # tn / (tn + fn)
    ece: float
    brier: float
    reliability: tuple[dict[str, Any], ...]


@dataclass(frozen=True, kw_only=True)
class MacroFigures(_ToDict):
    """Unweighted means over labels, each over the labels where the figure is defined."""

    auroc: float
    auroc_ci95: tuple[float, float]
    auroc_resamples: int
    auroc_labels: tuple[str, ...]  # the labels the macro AUROC averages
    sensitivity: float
    specificity: float
    ppv: float
    npv: float
    ece: float
    brier: float


@dataclass(frozen=True, kw_only=True)
class LocalEvaluation(_ToDict):
    """The whole evaluation: per-label figures, the macro means and how they were made."""

    per_label: tuple[LabelFigures, ...]
    macro: MacroFigures
    n: int
    bootstrap: int
    seed: int

    @property
    def labels(self) -> tuple[str, ...]:
        """The label names, in order."""
        return tuple(f.label for f in self.per_label)

    def label(self, name: str) -> LabelFigures:
        """The figures of the label called ``name``."""
        for f in self.per_label:
            if f.label == name:
                return f
        raise KeyError(name)


def check_predictions(
    labels: Sequence[str],
    logits: np.ndarray,
    targets: np.ndarray,
    threshold_logits: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float64 copies of the inputs; ``ValueError`` saying what is wrong."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(targets, dtype=np.float64)
    k = len(labels)
    if len(set(labels)) != k:
        raise ValueError(f"label names must be unique, got {list(labels)}")
    if z.ndim != 2 or z.shape[1] != k:
        raise ValueError(f"logits must have shape (n, {k}) for {k} labels, got {z.shape}")
    if y.shape != z.shape:
        raise ValueError(f"targets must have the logits' shape {z.shape}, got {y.shape}")
    if z.shape[0] == 0:
        raise ValueError("no examples to evaluate (n == 0)")
    if not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be finite: {int(np.sum(~np.isfinite(z)))} are NaN or inf")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("targets must be multi-hot: every value 0 or 1")
    t = np.asarray(threshold_logits, dtype=np.float64)
    if t.shape != (k,):
        raise ValueError(f"threshold_logits must have shape ({k},), got {t.shape}")
    if np.any(np.isnan(t)):  # +-inf is allowed: never / always positive
        raise ValueError("threshold_logits must not be NaN")
    return z, y, t


def evaluate_predictions(
    labels: Sequence[str],
    logits: np.ndarray,
    targets: np.ndarray,
    threshold_logits: np.ndarray,
    temperatures: np.ndarray,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
) -> LocalEvaluation:
    """Every figure of the evaluation of ``logits`` against ``targets`` (see the module doc).

    ``bootstrap`` resamples (0 for none: the AUROC CIs are then NaN) are drawn from a
    generator seeded with ``seed``, so the same inputs always give the same figures.
    """
    z, y, thresholds = check_predictions(labels, logits, targets, threshold_logits)
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    probs = probabilities(z, temperatures)
    temps = np.asarray(temperatures, dtype=np.float64)
    n, k = z.shape
    positives = y.sum(axis=0).astype(int)
    aurocs = per_label_auroc(y, z)
    defined = ~np.isnan(aurocs)  # both classes present
    boot = bootstrap_aurocs(y, z, bootstrap, seed) if bootstrap else np.empty((0, k))
    decided = z >= thresholds
    threshold_probs = probabilities(thresholds[None, :], temps)[0]
    per_label = []
    for j, name in enumerate(labels):
        yj, dj = y[:, j] == 1, decided[:, j]
        tp, fp = int(np.sum(dj & yj)), int(np.sum(dj & ~yj))
        tn, fn = int(np.sum(~dj & ~yj)), int(np.sum(~dj & yj))
        resampled = boot[:, j][~np.isnan(boot[:, j])] if defined[j] else np.empty(0)
        per_label.append(
            LabelFigures(
                label=name,
                n=n,
                positives=int(positives[j]),
                prevalence=float(positives[j] / n),
                auroc=float(aurocs[j]),
                auroc_ci95=percentile_ci(resampled),
                auroc_resamples=int(resampled.size),
                threshold_logit=float(thresholds[j]),
                temperature=float(temps[j]),
                threshold_probability=float(threshold_probs[j]),
                tp=tp,
                fp=fp,
                tn=tn,
                fn=fn,
                sensitivity=Proportion.of(tp, tp + fn),
                specificity=Proportion.of(tn, tn + fp),
                ppv=Proportion.of(tp, tp + fp),
                npv=Proportion.of(tn, tn + fn),
                ece=expected_calibration_error(probs[:, j], y[:, j]),
                brier=brier_score(probs[:, j], y[:, j]),
                reliability=tuple(reliability_bins(probs[:, j], y[:, j])),
            )
        )
    used = [j for j in range(k) if defined[j]]
    macro_boot = boot[:, used]
    macro_boot = macro_boot[np.all(~np.isnan(macro_boot), axis=1)] if used else np.empty((0, 0))
    macro_values = macro_boot.mean(axis=1) if used else np.empty(0)
    macro = MacroFigures(
        auroc=macro_mean(f.auroc for f in per_label),
        auroc_ci95=percentile_ci(macro_values),
        auroc_resamples=int(macro_values.size),
        auroc_labels=tuple(labels[j] for j in used),
        sensitivity=macro_mean(f.sensitivity.value for f in per_label),
        specificity=macro_mean(f.specificity.value for f in per_label),
        ppv=macro_mean(f.ppv.value for f in per_label),
        npv=macro_mean(f.npv.value for f in per_label),
        ece=macro_mean(f.ece for f in per_label),
        brier=macro_mean(f.brier for f in per_label),
    )
    return LocalEvaluation(
        per_label=tuple(per_label), macro=macro, n=n, bootstrap=bootstrap, seed=seed
    )
