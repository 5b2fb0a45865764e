"""Decision thresholds and headline figures from the federation's pooled evaluation statistics.

The server holds, per round, the sum over hospitals of each label's score histograms
(:class:`~shared_model.evaluation.EvalStats`: 0.1-wide logit bins). Everything here
reads only that sum, so no threshold or figure depends on one hospital's records. A
threshold is a bin edge, so the sensitivity and specificity stated for it are exact on
the pooled held-out records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared_model.evaluation import (
    COARSE_EDGES,
    SCORE_EDGES,
    EvalStats,
    binormal_auroc_draws,
    coarse_cells,
)
from shared_model.metrics import histogram_auroc, macro_mean, percentile_ci

__all__ = [
    "OPERATING_POINT_HELP",
    "PooledLabel",
    "choose_thresholds",
    "parse_operating_point",
    "pooled_figures",
]

OPERATING_POINT_HELP = (
    "How each label's decision threshold is chosen on the federation's pooled held-out "
    "statistics: youden (maximise sensitivity + specificity - 1), sensitivity=0.9 (the "
    "highest threshold keeping at least that sensitivity), specificity=0.9, or "
    "probability=0.5 (a fixed threshold)."
)
_EDGES = SCORE_EDGES  # threshold at edge i: bins i and above are positive
# Noised statistics hold counts per coarse bin only: their thresholds are coarse edges
# (and the two ends), where the stated rates are those of the records.
_COARSE_EDGE_INDEX = np.array(
    [0, *np.searchsorted(SCORE_EDGES, np.array(COARSE_EDGES) - 1e-9), len(SCORE_EDGES) - 1]
)


def parse_operating_point(text: str) -> tuple[str, float]:
    """('youden', nan) or (kind, value); ValueError explains the accepted forms."""
    rule = text.strip().lower()
    if rule == "youden":
        return rule, math.nan
    kind, sep, raw = rule.partition("=")
    try:
        value = float(raw) if sep else math.nan
    except ValueError:
        value = math.nan
    if kind in {"sensitivity", "specificity"} and 0.0 < value <= 1.0:
        return kind, value
    if kind == "probability" and 0.0 < value < 1.0:
        return kind, value
    if kind in {"sensitivity", "specificity", "probability"}:
        bound = "at most 1" if kind != "probability" else "below 1"
        problem = f"{kind} needs a number above 0 and {bound} ({kind}=0.9)"
    else:
        problem = "use youden, sensitivity=X, specificity=X or probability=X"
    raise ValueError(f"operating point {text!r}: {problem}")


def _rates(stats: EvalStats, j: int) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of label ``j`` at every edge (index i: bins >= i positive)."""
    pos, neg = stats.positives[j], stats.negatives[j]
    tp = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]])  # positives in bins >= i
    tn = np.concatenate([[0.0], np.cumsum(neg)])  # negatives in bins < i
    sens, spec = tp / max(pos.sum(), 1.0), tn / max(neg.sum(), 1.0)
    return np.clip(sens, 0.0, 1.0), np.clip(spec, 0.0, 1.0)  # noised sums may stray


def choose_thresholds(stats: EvalStats, rule: str) -> tuple[np.ndarray, list[str]]:
    """Per-label threshold logits by ``rule`` (:data:`OPERATING_POINT_HELP`), and notes.

    A label whose pooled statistics lack positives or negatives cannot be tuned: it gets
    probability 0.5, and a note says so.
    """
    kind, value = parse_operating_point(rule)
    # Noised statistics hold coarse bins only; their raw sums are read as they are (the
    # noise is unbiased; clipping cells at zero is not), the rates clipped to [0, 1].
    candidates = _COARSE_EDGE_INDEX if stats.noised > 0 else np.arange(len(_EDGES))
    thresholds, notes = np.zeros(len(stats.labels)), []
    for j, label in enumerate(stats.labels):
        sens, spec = _rates(stats, j)
        if kind == "probability":
            thresholds[j] = math.log(value / (1.0 - value))
            continue
        if not stats.has_both_classes(j):
            notes.append(
                f"{label}: one class only in the pooled held-out records (or too few to "
                "read under the hospitals' noise); threshold 0.5"
            )
            continue
        sens, spec = sens[candidates], spec[candidates]
        if kind == "youden":
            i = int(np.argmax(sens + spec - 1.0))  # ties: the lowest, most sensitive one
        elif kind == "sensitivity":
            i = int(np.flatnonzero(sens >= value - 1e-12).max())
        else:
            i = int(np.flatnonzero(spec >= value - 1e-12).min())
        thresholds[j] = _EDGES[candidates[i]]
    return thresholds, notes


@dataclass(frozen=True, kw_only=True)
class PooledLabel:
    """One label's figures on the pooled held-out records, at its threshold."""

    label: str
    positives: int
    negatives: int
    auroc: float
    auroc_ci95: tuple[float, float]
    sensitivity: float
    specificity: float
    ppv: float
    npv: float


def pooled_figures(
    stats: EvalStats, threshold_logits: np.ndarray, bootstrap: int = 2000, seed: int = 0
) -> tuple[list[PooledLabel], tuple[float, float, float]]:
    """Per-label figures and (macro AUROC, 95% CI low, high), from the histograms only.

    The CI resamples each label's positives and negatives from their histograms (the
    stratified bootstrap of the records, as far as the histograms tell it; NaN with
    ``bootstrap=0``). Statistics that hospitals released with Gaussian noise are
    resampled from the fitted binormal model with fresh noise of the same variance
    (:func:`~shared_model.evaluation.binormal_auroc_draws`), so their CI holds the
    privacy noise too; NaN when the noise variance was not recorded. A threshold between
    bin edges is read at the next edge up. The macro CI resamples labels independently:
    the histograms do not keep which records share labels, so it ignores the correlation
    between labels.
    """
    stats = stats.rounded()
    noised = stats.noised > 0
    rng = np.random.default_rng(seed)
    out, samples = [], []
    for j, label in enumerate(stats.labels):
        pos, neg = stats.positives[j], stats.negatives[j]  # noised: raw, unbiased sums
        n_pos, n_neg = max(round(float(pos.sum())), 0), max(round(float(neg.sum())), 0)
        i = int(np.searchsorted(_EDGES, threshold_logits[j] - 1e-9))
        tp, fn = pos[i:].sum(), pos[:i].sum()
        tn, fp = neg[:i].sum(), neg[i:].sum()
        auroc, draws = stats.auroc(j), None
        # Written here, not bootstrap_aurocs: the server holds summed histograms, never
        # the records, so the bootstrap resamples each class's histogram.
        if n_pos and n_neg and bootstrap and not noised:
            draws = histogram_auroc(
                rng.multinomial(n_pos, pos / n_pos, size=bootstrap),
                rng.multinomial(n_neg, neg / n_neg, size=bootstrap),
            )
        elif noised and bootstrap and math.isfinite(auroc * stats.noise_std):
            draws = binormal_auroc_draws(
                coarse_cells(pos), coarse_cells(neg), stats.noise_std, bootstrap, rng
            )
        if draws is not None:
            samples.append(draws)
            low, high = percentile_ci(draws)
        else:
            low = high = math.nan
        out.append(
            PooledLabel(
                label=label,
                positives=n_pos,
                negatives=n_neg,
                auroc=auroc,
                auroc_ci95=(float(low), float(high)),
                sensitivity=_ratio(tp, tp + fn),
                specificity=_ratio(tn, tn + fp),
                ppv=_ratio(tp, tp + fp),
                npv=_ratio(tn, tn + fn),
            )
        )
    macro = macro_mean(p.auroc for p in out)
    defined = sum(not math.isnan(p.auroc) for p in out)
    if samples and len(samples) == defined:
        low, high = percentile_ci(np.mean(samples, axis=0))
    else:
        low = high = math.nan
    return out, (macro, float(low), float(high))


def _ratio(a: float, b: float) -> float:
    """The ratio clipped to [0, 1] (noised sums may stray); NaN when b is not positive."""
    return float(min(max(a / b, 0.0), 1.0)) if b > 0 else math.nan
