"""A hospital's own evaluation: per-label figures, their intervals and the macro means."""

import json
import math
import time

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from shared_model.inference.metrics import (
    LocalEvaluation,
    evaluate_predictions,
    wilson_interval,
)
from tests.support.predictions import predictions

LABELS = ("effusion", "edema", "cardiomegaly")


def evaluate(logits, targets, labels=LABELS, thresholds=None, temps=None, **kw):
    k = len(labels)
    thresholds = np.zeros(k) if thresholds is None else thresholds
    temps = np.ones(k) if temps is None else temps
    return evaluate_predictions(labels, logits, targets, thresholds, temps, **kw)


# ------------------------------------------------------------------------- Wilson
def test_wilson_matches_known_values_and_the_formula():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=5e-4)
    z = 1.959963984540054  # the standard normal's 97.5% quantile
    for x, n in [(3, 7), (50, 200), (1, 1), (999, 1000)]:
        p, denom = x / n, 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        expected = (max(0.0, centre - half), min(1.0, centre + half))
        assert wilson_interval(x, n) == pytest.approx(expected, abs=1e-12)


def test_wilson_at_the_edges_stays_in_the_unit_interval():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.0 < high == pytest.approx(0.2775, abs=5e-4)
    low, high = wilson_interval(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=5e-4)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


# ------------------------------------------------------------------------- AUROC
def test_auroc_matches_sklearn_on_random_data():
    logits, targets = predictions(300, seed=3)
    ev = evaluate(logits, targets, bootstrap=50)
    for j, f in enumerate(ev.per_label):
        assert f.auroc == pytest.approx(roc_auc_score(targets[:, j], logits[:, j]))
    assert ev.macro.auroc == pytest.approx(np.mean([f.auroc for f in ev.per_label]))


def test_perfect_separation_gives_auroc_one_and_a_ci_of_one():
    targets = np.tile([[1.0], [0.0]], (20, 3))
    logits = np.where(targets == 1, 2.0, -2.0) + np.linspace(0, 0.1, 40)[:, None]
    ev = evaluate(logits, targets, bootstrap=200)
    for f in ev.per_label:
        assert f.auroc == 1.0
        assert f.auroc_ci95 == (1.0, 1.0)
        assert f.sensitivity.value == 1.0 and f.specificity.value == 1.0
    assert ev.macro.auroc_ci95 == (1.0, 1.0)


def test_the_ci_contains_the_estimate_and_narrows_with_more_data():
    widths = []
    for n in (200, 3200):
        logits, targets = predictions(n, seed=5)
        ev = evaluate(logits, targets, bootstrap=400)
        for f in ev.per_label:
            assert f.auroc_ci95[0] < f.auroc < f.auroc_ci95[1]
            assert f.auroc_resamples == 400
        low, high = ev.macro.auroc_ci95
        assert low < ev.macro.auroc < high
        # the macro CI averages labels: narrower than each label's own
        assert high - low < min(f.auroc_ci95[1] - f.auroc_ci95[0] for f in ev.per_label)
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # 16x the data: about a quarter of the width


def test_the_bootstrap_is_reproducible_and_depends_on_the_seed():
    logits, targets = predictions(200, seed=6)
    a = evaluate(logits, targets, bootstrap=100, seed=1)
    b = evaluate(logits, targets, bootstrap=100, seed=1)
    c = evaluate(logits, targets, bootstrap=100, seed=2)
    assert a.to_dict() == b.to_dict()
    assert a.macro.auroc_ci95 != c.macro.auroc_ci95


def test_no_bootstrap_leaves_the_cis_undefined():
    logits, targets = predictions(100, seed=7)
    ev = evaluate(logits, targets, bootstrap=0)
    assert all(math.isnan(v) for v in ev.macro.auroc_ci95)
    assert ev.to_dict()["per_label"][0]["auroc_ci95"] == [None, None]


def test_a_single_class_label_has_no_auroc_and_is_left_out_of_the_macro():
    logits, targets = predictions(200, seed=8)
    targets[:, 1] = 0.0
    ev = evaluate(logits, targets, bootstrap=100)
    assert math.isnan(ev.label("edema").auroc)
    assert ev.label("edema").auroc_resamples == 0
    assert ev.macro.auroc_labels == ("effusion", "cardiomegaly")
    others = [ev.label(name).auroc for name in ev.macro.auroc_labels]
    assert ev.macro.auroc == pytest.approx(np.mean(others))
    assert ev.macro.auroc != pytest.approx(np.mean([*others, 0.5]))
    assert math.isnan(ev.label("edema").sensitivity.value)  # no positives
    assert ev.label("edema").specificity.total == 200
    d = ev.to_dict()["per_label"][1]
    assert d["auroc"] is None and d["auroc_ci95"] == [None, None]
    assert d["sensitivity"]["value"] is None


def test_resamples_with_one_class_are_skipped_for_that_label():
    logits, targets = predictions(60, seed=9)
    targets[:, 0] = 0.0
    targets[:2, 0] = 1.0  # two positives: many resamples hold none
    ev = evaluate(logits, targets, bootstrap=300)
    used = ev.label("effusion").auroc_resamples
    assert 0 < used < 300
    assert ev.macro.auroc_resamples <= used
    assert ev.label("edema").auroc_resamples == 300


# ------------------------------------------------------------------ threshold figures
def test_threshold_figures_by_hand():
    logits = np.array([[2.0], [1.0], [0.5], [-1.0], [-2.0], [0.0]])
    targets = np.array([[1.0], [1.0], [0.0], [1.0], [0.0], [0.0]])
    ev = evaluate(logits, targets, labels=("x",), thresholds=np.array([0.5]), bootstrap=0)
    f = ev.label("x")
    assert (f.tp, f.fp, f.tn, f.fn) == (2, 1, 2, 1)  # logit >= 0.5 is positive
    assert f.sensitivity.value == pytest.approx(2 / 3)
    assert f.specificity.value == pytest.approx(2 / 3)
    assert f.ppv.value == pytest.approx(2 / 3) and f.npv.value == pytest.approx(2 / 3)
    assert f.ppv.ci95 == pytest.approx(wilson_interval(2, 3))
    assert f.prevalence == 0.5 and f.positives == 3
    assert f.threshold_probability == pytest.approx(1 / (1 + math.exp(-0.5)))


def test_no_positive_decisions_leave_ppv_undefined():
    logits, targets = predictions(100, seed=10)
    ev = evaluate(logits, targets, thresholds=np.full(3, np.inf), bootstrap=0)
    for f in ev.per_label:
        assert f.tp == f.fp == 0
        assert math.isnan(f.ppv.value) and f.sensitivity.value == 0.0
    assert math.isnan(ev.macro.ppv)
    assert json.loads(json.dumps(ev.to_dict()))["macro"]["ppv"] is None


def test_temperatures_change_calibration_but_not_decisions_or_auroc():
    logits, targets = predictions(500, seed=11)
    thresholds = np.array([-0.5, 0.0, 0.7])
    cold = evaluate(logits, targets, thresholds=thresholds, bootstrap=50)
    warm = evaluate(logits, targets, thresholds=thresholds, temps=np.full(3, 3.0), bootstrap=50)
    for a, b in zip(cold.per_label, warm.per_label, strict=True):
        assert a.sensitivity == b.sensitivity and a.specificity == b.specificity
        assert a.ppv == b.ppv and a.npv == b.npv
        assert a.auroc == b.auroc and a.auroc_ci95 == b.auroc_ci95
        assert a.ece != b.ece and a.brier != b.brier
        assert b.threshold_probability == pytest.approx(1 / (1 + math.exp(-b.threshold_logit / 3)))


def test_ece_and_brier_use_the_calibrated_probabilities():
    rng = np.random.default_rng(12)
    z = rng.normal(scale=3.0, size=(20_000, 1))
    targets = (rng.random(z.shape) < 1 / (1 + np.exp(-z / 2.5))).astype(float)
    raw = evaluate(z, targets, labels=("x",), bootstrap=0)
    calibrated = evaluate(z, targets, labels=("x",), temps=np.array([2.5]), bootstrap=0)
    assert raw.macro.ece > 0.05
    assert calibrated.macro.ece < 0.02
    assert calibrated.macro.brier < raw.macro.brier


# ------------------------------------------------------------------------- output
def test_to_dict_is_json_with_every_figure():
    logits, targets = predictions(120, seed=13)
    ev = evaluate(logits, targets, bootstrap=20, seed=3)
    d = json.loads(json.dumps(ev.to_dict(), allow_nan=False))
    assert set(d) == {"per_label", "macro", "n", "bootstrap", "seed"}
    assert (d["n"], d["bootstrap"], d["seed"]) == (120, 20, 3)
    label = d["per_label"][0]
    figures = "auroc auroc_ci95 sensitivity specificity ppv npv ece brier prevalence positives"
    figures += " tp fp tn fn threshold_logit temperature threshold_probability reliability"
    assert set(figures.split()) <= set(label)
    assert set(label["sensitivity"]) == {"value", "ci95", "successes", "total"}
    assert len(label["reliability"]) == 10
    assert d["macro"]["auroc_labels"] == list(LABELS)
    assert isinstance(ev, LocalEvaluation) and ev.labels == LABELS


def test_evaluation_of_a_thousand_records_is_fast():
    logits, targets = predictions(1000, seed=14, k=7)
    labels = [f"finding {j}" for j in range(7)]
    start = time.perf_counter()
    evaluate(logits, targets, labels=labels, bootstrap=1000)
    assert time.perf_counter() - start < 5.0


# ------------------------------------------------------------------------- bad input
GOOD_Z, GOOD_Y = predictions(10, seed=15)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logits": GOOD_Z[:, :2]}, r"logits must have shape \(n, 3\)"),
        ({"targets": GOOD_Y[:5]}, "targets must have the logits' shape"),
        ({"logits": GOOD_Z[:0], "targets": GOOD_Y[:0]}, r"n == 0"),
        ({"logits": np.where(np.eye(10, 3) == 1, np.nan, GOOD_Z)}, "finite: 3 are NaN"),
        ({"targets": GOOD_Y * 2}, "0 or 1"),
        ({"threshold_logits": np.zeros(2)}, r"threshold_logits must have shape \(3,\)"),
        ({"threshold_logits": np.array([0.0, np.nan, 0.0])}, "NaN"),
        ({"temperatures": np.array([1.0, 0.0, 1.0])}, "positive"),
        ({"labels": ("a", "a", "b")}, "unique"),
        ({"bootstrap": -1}, "bootstrap"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(change, message):
    kwargs = {
        "labels": LABELS,
        "logits": GOOD_Z,
        "targets": GOOD_Y,
        "threshold_logits": np.zeros(3),
        "temperatures": np.ones(3),
        "bootstrap": 10,
    }
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        evaluate_predictions(**kwargs)
