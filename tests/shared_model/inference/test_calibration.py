"""Calibrated probabilities: temperature scaling, its fit, ECE and reliability bins."""

import numpy as np
import pytest
from scipy.special import expit

from shared_model.inference.calibration import (
    brier_score,
    expected_calibration_error,
    fit_temperatures,
    negative_log_likelihood,
    probabilities,
    reliability_bins,
)


def test_probabilities_divide_the_logits_by_the_temperature_and_stay_finite():
    z = np.array([[0.0, 2.0], [-800.0, 800.0]])
    p = probabilities(z, np.array([1.0, 2.0]))
    assert p[0, 0] == 0.5
    assert p[0, 1] == pytest.approx(expit(1.0))
    assert np.all(np.isfinite(p))
    assert p[1, 0] == pytest.approx(0.0) and p[1, 1] == pytest.approx(1.0)


@pytest.mark.parametrize("temps", [np.array([1.0]), np.array([1.0, 0.0]), np.array([1.0, -2.0])])
def test_probabilities_refuse_bad_temperatures(temps):
    with pytest.raises(ValueError, match="temperatures"):
        probabilities(np.zeros((3, 2)), temps)


def test_fit_temperatures_recovers_a_known_temperature_and_lowers_the_loss():
    rng = np.random.default_rng(0)
    n = 20_000
    z = rng.normal(scale=3.0, size=(n, 2))
    true = np.array([2.5, 0.6])
    y = (rng.random((n, 2)) < expit(z / true)).astype(float)
    temps = fit_temperatures(z, y)
    assert abs(temps[0] - 2.5) < 0.15
    assert abs(temps[1] - 0.6) < 0.05
    for k in range(2):
        fitted = negative_log_likelihood(z[:, k], y[:, k], temps[k])
        assert fitted < negative_log_likelihood(z[:, k], y[:, k], 1.0) - 1e-3
        # it is the minimum: nudging the temperature either way does not help
        assert fitted <= negative_log_likelihood(z[:, k], y[:, k], temps[k] * 1.05)
        assert fitted <= negative_log_likelihood(z[:, k], y[:, k], temps[k] / 1.05)


def test_a_label_with_one_class_keeps_temperature_one():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(200, 3))
    y = (rng.random((200, 3)) < expit(z)).astype(float)
    y[:, 1] = 0.0
    y[:, 2] = 1.0
    temps = fit_temperatures(z, y)
    assert temps[1] == 1.0 and temps[2] == 1.0
    assert temps[0] != 1.0


def test_fit_temperatures_stays_within_its_bounds():
    z = np.array([[-1.0], [1.0], [-2.0], [2.0]])
    y = np.array([[0.0], [1.0], [0.0], [1.0]])  # perfectly separated: wants T -> 0
    (t,) = fit_temperatures(z, y, bounds=(0.1, 10.0))
    assert t == pytest.approx(0.1, rel=1e-3)


@pytest.mark.parametrize(
    ("z", "y", "message"),
    [
        (np.zeros((0, 2)), np.zeros((0, 2)), "zero examples"),
        (np.zeros((3, 2)), np.zeros((3, 1)), "one shape"),
        (np.array([[np.nan]]), np.array([[1.0]]), "finite"),
        (np.array([[0.0]]), np.array([[0.5]]), "0 or 1"),
    ],
)
def test_fit_temperatures_refuses_bad_inputs(z, y, message):
    with pytest.raises(ValueError, match=message):
        fit_temperatures(z, y)


def test_ece_is_small_for_calibrated_data_and_large_for_overconfident_data():
    rng = np.random.default_rng(2)
    p = rng.random(50_000)
    y = (rng.random(p.size) < p).astype(float)
    assert expected_calibration_error(p, y) < 0.01
    overconfident = expit(4 * (np.log(p) - np.log1p(-p)))  # logits x4
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
def test_ece_refuses_bad_inputs(p, y, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(p, y)
