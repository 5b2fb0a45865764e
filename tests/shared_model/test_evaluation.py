"""Held-out statistics that add up: the federation's metrics from sums alone."""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from shared_model.evaluation import SCORE_BINS, EvalStats, score_bins
from shared_model.metrics import classification_metrics
from tests.support.tier import examples

LABELS = ("a", "b", "c")


def predictions(n, seed, signal=1.5):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    logits = rng.normal(size=targets.shape) + signal * (targets - 0.3)
    losses = rng.random(n)
    return logits, targets, losses


@settings(max_examples=examples(40), deadline=None)
@given(n=st.integers(5, 400), seed=st.integers(0, 10_000), signal=st.floats(0.0, 4.0))
def test_metrics_from_the_statistics_match_the_exact_ones(n, seed, signal):
    logits, targets, losses = predictions(n, seed, signal)
    got = EvalStats.from_predictions(LABELS, logits, targets, losses).metrics()
    scores = 1 / (1 + np.exp(-logits))
    exact = classification_metrics(targets, scores, LABELS)
    for key in ("accuracy", "precision", "recall", "f1", "exact-match"):
        assert got[key] == pytest.approx(exact[key], abs=1e-12), key  # 0.5 is a bin edge
    assert got["loss"] == pytest.approx(losses.mean())
    for j, label in enumerate(LABELS):
        if 0 < targets[:, j].sum() < n:
            exact_auc = roc_auc_score(targets[:, j], logits[:, j])
            # same-bin pairs count one half: the error is at most their share of all pairs
            bins = score_bins(logits[:, j])
            pos, neg = bins[targets[:, j] > 0], bins[targets[:, j] == 0]
            tied = (pos[:, None] == neg[None, :]).mean()
            assert abs(got[f"auroc.{label}"] - exact_auc) <= tied / 2 + 1e-12
        else:
            assert math.isnan(got[f"auroc.{label}"])


def test_the_sum_of_two_hospitals_is_the_statistics_of_their_union():
    a, b = predictions(120, 1), predictions(80, 2)
    union = tuple(np.concatenate([x, y]) for x, y in zip(a, b, strict=True))
    summed = EvalStats.from_predictions(LABELS, *a) + EvalStats.from_predictions(LABELS, *b)
    whole = EvalStats.from_predictions(LABELS, *union)
    assert (summed.hospitals, whole.hospitals) == (2.0, 1.0)  # the sum counts its hospitals
    whole.hospitals = 2.0
    np.testing.assert_allclose(summed.to_vector(), whole.to_vector())
    assert summed.metrics() == pytest.approx(whole.metrics(), nan_ok=True)


def test_a_vector_round_trips_and_a_malformed_one_is_refused():
    stats = EvalStats.from_predictions(LABELS, *predictions(50, 3))
    again = EvalStats.from_vector(LABELS, stats.to_vector())
    np.testing.assert_array_equal(again.to_vector(), stats.to_vector())
    assert EvalStats.vector_size(len(LABELS)) == stats.to_vector().size == 6 + 6 * SCORE_BINS
    noised = dataclasses.replace(stats, noised=1.0, noise_variance=4.0)
    unknown = EvalStats.from_vector(LABELS, np.delete(noised.to_vector(), 5))  # older runs'
    assert unknown.noised == 1.0 and math.isnan(unknown.noise_variance)
    assert EvalStats.from_vector(LABELS, noised.to_vector()).noise_variance == 4.0
    noiseless = EvalStats.from_vector(LABELS, np.delete(stats.to_vector(), [4, 5]))
    assert noiseless.hospitals == 1.0 and noiseless.noised == 0.0
    assert noiseless.noise_variance == 0.0
    legacy = EvalStats.from_vector(LABELS, np.delete(stats.to_vector(), [3, 4, 5]))
    assert math.isnan(legacy.hospitals) and legacy.metrics() == stats.metrics()
    assert math.isnan(legacy.rounded().hospitals)
    with pytest.raises(ValueError, match="expected"):
        EvalStats.from_vector(LABELS, stats.to_vector()[:-4])
    for bad in (np.nan, -1.0, np.inf):
        vector = stats.to_vector()
        vector[7] = bad
        with pytest.raises(ValueError, match="finite and non-negative"):
            EvalStats.from_vector(LABELS, vector)


def test_roc_curve_runs_from_the_origin_to_one_one():
    stats = EvalStats.from_predictions(LABELS, *predictions(300, 4))
    fpr, tpr = stats.roc_curve(0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(stats.auroc(0), abs=1e-9)


def test_no_examples_give_no_metrics():
    assert EvalStats.zeros(LABELS).metrics() == {}
