"""Calibrated probabilities: temperature scaling and its fit."""

import numpy as np
import pytest
from scipy.special import expit

from shared_model.inference.calibration import (
    fit_temperatures,
    negative_log_likelihood,
    probabilities,
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
