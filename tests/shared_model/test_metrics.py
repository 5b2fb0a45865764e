"""The one metrics module: AUROC, its macro mean, the bootstrap, calibration and Brier."""

import math
import subprocess
import sys

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from shared_model.metrics import (
    bootstrap_aurocs,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    histogram_auroc,
    macro_mean,
    per_label_auroc,
    percentile_ci,
    reliability_bins,
)
from tests.support.predictions import predictions

LABELS = ("effusion", "edema", "cardiomegaly")


# ------------------------------------------------------------------------- AUROC
def test_per_label_auroc_is_sklearns_and_nan_for_a_single_class_label():
    logits, targets = predictions(200, seed=1)
    targets[:, 1] = 0.0
    targets[:, 2] = 1.0
    aurocs = per_label_auroc(targets, logits)
    assert aurocs[0] == pytest.approx(roc_auc_score(targets[:, 0], logits[:, 0]))
    assert math.isnan(aurocs[1]) and math.isnan(aurocs[2])


def test_the_macro_mean_skips_a_single_class_label_and_never_counts_it_as_a_half():
    logits, targets = predictions(300, seed=2)
    targets[:, 1] = 0.0
    scores = 1 / (1 + np.exp(-logits))
    m = classification_metrics(targets, scores, LABELS)
    assert math.isnan(m["auroc.edema"])
    defined = [m["auroc.effusion"], m["auroc.cardiomegaly"]]
    assert m["auroc"] == pytest.approx(np.mean(defined))
    assert m["auroc"] != pytest.approx(np.mean([*defined, 0.5]))
    assert macro_mean([math.nan, math.nan]) != macro_mean([math.nan, math.nan])  # NaN
    assert macro_mean([0.6, math.nan, 0.8]) == pytest.approx(0.7)


def test_histogram_auroc_is_sklearns_weighted_auroc_with_ties_one_half():
    rng = np.random.default_rng(3)
    for _ in range(20):
        bins = int(rng.integers(1, 12))
        pos, neg = rng.poisson(3.0, (2, bins)) * rng.random((2, bins))  # weights, not counts
        if pos.sum() == 0 or neg.sum() == 0:
            continue
        scores = np.r_[np.arange(bins), np.arange(bins)]  # the bin index is the score
        classes = np.r_[np.ones(bins), np.zeros(bins)]
        expected = roc_auc_score(classes, scores, sample_weight=np.r_[pos, neg])
        assert float(histogram_auroc(pos, neg)) == pytest.approx(expected, abs=1e-12)


def test_histogram_auroc_runs_over_leading_axes_and_is_nan_for_an_empty_class():
    rng = np.random.default_rng(4)
    pos, neg = rng.poisson(2.0, (2, 5, 7)).astype(float)
    pos[2] = 0.0
    rows = histogram_auroc(pos, neg)
    assert rows.shape == (5,) and math.isnan(rows[2])
    for i in (0, 1, 3, 4):
        assert rows[i] == float(histogram_auroc(pos[i], neg[i]))


# ------------------------------------------------------------------------- bootstrap
def test_bootstrap_aurocs_equal_sklearn_on_the_resampled_rows():
    logits, targets = predictions(151, seed=4)
    logits = np.round(logits, 1)  # ties, scored one half as sklearn does
    boot = bootstrap_aurocs(targets, logits, resamples=3, seed=11)
    rows = np.random.default_rng(11).integers(0, 151, size=(3, 151))
    for b in range(3):
        for j in range(len(LABELS)):
            expected = roc_auc_score(targets[rows[b], j], logits[rows[b], j])
            assert boot[b, j] == pytest.approx(expected, abs=1e-12)


def _audit_bootstrap(y, s, boots, seed):
    """The audit's own bootstrap before it used this module's: sklearn per resample."""
    rng = np.random.default_rng(seed)
    members, others = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    samples = []
    for _ in range(boots):
        idx = np.concatenate([rng.choice(members, len(members)), rng.choice(others, len(others))])
        samples.append(roc_auc_score(y[idx], s[idx]))
    return np.array(samples)


def test_the_stratified_bootstrap_is_the_audits_former_one():
    rng = np.random.default_rng(5)
    y = np.r_[np.ones(301), np.zeros(180)]
    s = np.round(rng.normal(0.4 * y, 1.0), 2)  # ties too
    strata = (np.flatnonzero(y == 1), np.flatnonzero(y == 0))
    draws = bootstrap_aurocs(y[:, None], s[:, None], 60, seed=9, strata=strata)[:, 0]
    former = _audit_bootstrap(y, s, 60, seed=9)
    np.testing.assert_allclose(draws, former, rtol=0, atol=1e-12)
    assert percentile_ci(draws) == pytest.approx(tuple(np.percentile(former, [2.5, 97.5])))


def test_strata_keep_their_sizes_in_every_resample():
    logits, targets = predictions(60, seed=6, k=1)
    targets[:, 0] = 0.0
    targets[:2, 0] = 1.0  # two positives: many plain resamples hold none
    plain = bootstrap_aurocs(targets, logits, 300, seed=1)
    assert np.isnan(plain).any()
    strata = (np.flatnonzero(targets[:, 0] == 1), np.flatnonzero(targets[:, 0] == 0))
    stratified = bootstrap_aurocs(targets, logits, 300, seed=1, strata=strata)
    assert not np.isnan(stratified).any()


def test_the_ci_contains_the_estimate_narrows_with_n_and_follows_the_seed():
    widths = []
    for n in (200, 3200):
        logits, targets = predictions(n, seed=7, k=1)
        auroc = per_label_auroc(targets, logits)[0]
        low, high = percentile_ci(bootstrap_aurocs(targets, logits, 400, seed=2))
        assert low < auroc < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the data: about a quarter of the width
    logits, targets = predictions(200, seed=7, k=1)
    again = bootstrap_aurocs(targets, logits, 50, seed=2)
    np.testing.assert_array_equal(again, bootstrap_aurocs(targets, logits, 50, seed=2))
    assert not np.array_equal(again, bootstrap_aurocs(targets, logits, 50, seed=3))


def test_percentile_ci_leaves_nan_draws_out():
    draws = np.r_[np.linspace(0.0, 1.0, 101), [np.nan] * 50]
    assert percentile_ci(draws) == pytest.approx((0.025, 0.975))
    assert all(math.isnan(v) for v in percentile_ci(np.full(4, np.nan)))


# ------------------------------------------------------------------------- calibration
def test_brier_score_is_the_mean_squared_error_of_the_probabilities():
    rng = np.random.default_rng(8)
    for y_fixed in (None, 0.0, 1.0):
        p = rng.random(500)
        y = (rng.random(500) < p).astype(float) if y_fixed is None else np.full(500, y_fixed)
        assert brier_score(p, y) == pytest.approx(np.mean((p - y) ** 2), rel=1e-12)


def test_reliability_bins_agree_with_sklearns_calibration_curve_off_the_edges():
    rng = np.random.default_rng(9)
    p = rng.random(2000) ** 2  # the top bins sparse
    y = (rng.random(p.size) < p).astype(float)
    table = [b for b in reliability_bins(p, y) if b["count"]]
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    assert len(table) == len(observed)
    np.testing.assert_allclose([b["observed_frequency"] for b in table], observed, atol=1e-12)
    np.testing.assert_allclose([b["mean_predicted"] for b in table], predicted, atol=1e-12)


def test_a_probability_on_an_edge_falls_in_the_bin_above_unlike_sklearns():
    p, y = np.array([0.25, 0.5, 0.75]), np.array([0.0, 1.0, 1.0])
    counts = [b["count"] for b in reliability_bins(p, y, bins=4)]
    assert counts == [0, 1, 1, 1]  # [lower, upper): 0.5 opens the third bin
    observed, _ = calibration_curve(y, p, n_bins=4)
    assert len(observed) == 3 and observed[0] == 0.0  # sklearn: (lower, upper], 0.25 in the first


def test_ece_is_small_for_calibrated_data_and_large_for_overconfident_data():
    rng = np.random.default_rng(2)
    p = rng.random(50_000)
    y = (rng.random(p.size) < p).astype(float)
    assert expected_calibration_error(p, y) < 0.01
    overconfident = 1 / (1 + np.exp(-4 * (np.log(p) - np.log1p(-p))))  # logits x4
    assert expected_calibration_error(overconfident, y) > 0.1
    assert brier_score(overconfident, y) > brier_score(p, y)


def test_ece_by_hand():
    # bin [0.1, 0.2): two examples, mean 0.15, one positive -> gap 0.35
    # bin [0.9, 1.0]: two examples, mean 0.95 (one exactly 1.0), both positive -> gap 0.05
    p = np.array([0.1, 0.2 - 1e-9, 0.9, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    assert expected_calibration_error(p, y) == pytest.approx((2 * 0.35 + 2 * 0.05) / 4)


def test_reliability_bins_have_edges_counts_and_none_for_empty_bins():
    p = np.array([0.05, 0.07, 0.55, 1.0])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    table = reliability_bins(p, y, bins=10)
    assert len(table) == 10
    assert [b["count"] for b in table] == [2, 0, 0, 0, 0, 1, 0, 0, 0, 1]
    assert table[0]["lower"] == 0.0 and table[0]["upper"] == 0.1 and table[9]["upper"] == 1.0
    assert table[0]["mean_predicted"] == pytest.approx(0.06)
    assert table[0]["observed_frequency"] == 0.5
    assert table[1]["mean_predicted"] is None and table[1]["observed_frequency"] is None


@pytest.mark.parametrize(
    ("p", "y", "message"),
    [
        (np.array([0.5, 1.5]), np.array([0.0, 1.0]), r"\[0, 1\]"),
        (np.array([0.5]), np.array([0.0, 1.0]), "one length"),
        (np.array([0.5]), np.array([2.0]), "0 or 1"),
        (np.array([]), np.array([]), "no examples"),
    ],
)
def test_calibration_figures_refuse_bad_inputs(p, y, message):
    for figure in (expected_calibration_error, brier_score):
        with pytest.raises(ValueError, match=message):
            figure(p, y)


# ------------------------------------------------------------------------- start-up
def test_importing_the_module_loads_neither_scikit_learn_nor_the_inference_package():
    """The training engine imports it; a hospital starts a process per message."""
    code = (
        "import sys, shared_model.metrics, shared_model.evaluation; "
        "print(sorted(m for m in ('sklearn', 'scipy', 'shared_model.inference') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
