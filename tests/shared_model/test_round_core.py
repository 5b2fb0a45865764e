"""The round's arithmetic, shared by the plain driver, the SecAgg+ driver and the benchmark."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from shared_model.round_core import (
    HospitalUpdate,
    mean_of_model,
    mean_of_sum,
    mean_of_updates,
    round_result,
)
from shared_model.server_optimizer import ServerOptimizer

LAYOUT = WeightLayout.of({"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)})
STATE = LAYOUT.unpack(np.linspace(-0.5, 0.5, LAYOUT.size).astype(np.float32))
SENT = LAYOUT.pack(STATE)
MAX_WEIGHT = 1_000.0
LABELS = ("normal", "effusion")


def hospitals(seed: int = 0) -> list[HospitalUpdate]:
    """Three hospitals that trained (different N̂ and losses) and one that declined."""
    rng = np.random.default_rng(seed)
    trained = [
        HospitalUpdate(
            weights=(SENT + rng.normal(0, 0.05, SENT.size)).astype(np.float32),
            num_examples=n,
            train_loss=loss,
        )
        for n, loss in [(120, 0.9), (480, 0.6), (45, 1.4)]
    ]
    # a decline carries the weights it received (here: anything) and no record count
    declined = HospitalUpdate(
        weights=np.full(SENT.size, np.nan, np.float32), num_examples=0, train_loss=math.nan
    )
    return [*trained, declined]


def secagg_sum(updates: list[HospitalUpdate], sent: np.ndarray = SENT):
    """The unmasked sum of the hospitals' SecAgg+ uploads, as the server decodes it."""
    codec = UploadCodec(SENT.size, LABELS, 0.5, MAX_WEIGHT)
    uploads = []
    for u in updates:
        if u.num_examples > 0:
            delta = u.weights.astype(np.float64) - sent
            weight = u.num_examples / MAX_WEIGHT
        else:  # a declined hospital uploads a zero update with no weight
            delta, weight = np.zeros(SENT.size), 0.0
        uploads.append(codec.encode(delta, weight, u.train_loss, EvalStats.zeros(LABELS)))
    return codec.decode_sum(np.mean(uploads, axis=0), len(uploads))


def test_each_update_is_weighed_by_its_released_record_count():
    updates = hospitals()
    mean = mean_of_updates(SENT, updates)
    trained = updates[:3]
    n = np.array([u.num_examples for u in trained], dtype=np.float64)
    deltas = np.stack([u.weights.astype(np.float64) - SENT for u in trained])
    np.testing.assert_allclose(mean.delta, (n[:, None] * deltas).sum(0) / n.sum(), rtol=1e-12)
    assert mean.weight == n.sum()
    assert mean.train_loss == pytest.approx((120 * 0.9 + 480 * 0.6 + 45 * 1.4) / n.sum())


def test_a_declined_hospital_is_not_weighed_and_cannot_poison_the_mean():
    with_decline = mean_of_updates(SENT, hospitals())
    without = mean_of_updates(SENT, hospitals()[:3])
    assert np.isfinite(with_decline.delta).all()  # its NaN weights were never multiplied
    np.testing.assert_array_equal(with_decline.delta, without.delta)
    assert with_decline.train_loss == without.train_loss
    assert mean_of_updates(SENT, hospitals()[3:]) is None  # everybody declined


def test_the_secagg_sum_gives_the_plain_rounds_model_for_the_same_updates():
    plain, masked = ServerOptimizer(0.9, 0.5), ServerOptimizer(0.9, 0.5)
    plain_state = masked_state = STATE
    for server_round in range(3):  # the optimizers' momentum carries between rounds
        updates = hospitals(seed=server_round)
        sent = LAYOUT.pack(plain_state)
        updates = [
            HospitalUpdate(
                weights=(u.weights - SENT + sent).astype(np.float32),
                num_examples=u.num_examples,
                train_loss=u.train_loss,
            )
            for u in updates
        ]
        one = round_result(plain_state, mean_of_updates(sent, updates), LAYOUT, plain.step)
        other = round_result(
            masked_state, mean_of_sum(secagg_sum(updates, sent)), LAYOUT, masked.step
        )
        for name in STATE:
            torch.testing.assert_close(one.state[name], other.state[name], rtol=1e-6, atol=1e-7)
        assert other.train_loss == pytest.approx(one.train_loss, abs=1e-4)
        plain_state, masked_state = one.state, other.state
    assert not torch.equal(plain_state["a.bias"], STATE["a.bias"])  # the model did move


def test_nobody_trained_under_secagg_leaves_the_model_and_the_optimizer_alone():
    assert mean_of_sum(secagg_sum(hospitals()[3:])) is None
    optimizer = ServerOptimizer(0.9, 1.0, velocity={"a.bias": torch.ones(3)})
    result = round_result(STATE, None, LAYOUT, optimizer.step)
    assert result.state is STATE and result.train_loss is None
    assert torch.equal(optimizer.velocity["a.bias"], torch.ones(3))  # no step on no update


def test_the_server_optimizer_steps_along_the_mean_update():
    mean = mean_of_updates(SENT, hospitals())
    optimizer = ServerOptimizer(momentum=0.9, learning_rate=0.5)
    first = round_result(STATE, mean, LAYOUT, optimizer.step)
    # FedAvgM's first step: the learning rate times the mean update
    expected = (SENT.astype(np.float64) + 0.5 * mean.delta).astype(np.float32)
    np.testing.assert_allclose(LAYOUT.pack(first.state), expected, rtol=1e-6, atol=1e-7)
    fedavg = round_result(STATE, mean, LAYOUT, ServerOptimizer().step)
    np.testing.assert_allclose(LAYOUT.pack(fedavg.state), SENT + mean.delta, rtol=1e-6, atol=1e-7)
    assert first.train_loss == mean.train_loss


def test_a_mean_that_would_leave_the_model_non_finite_is_refused():
    """Never checkpointed, never sent: validation bounds every weight and norm, this is
    the last line behind it."""
    mean = mean_of_updates(SENT, hospitals())
    mean = dataclasses.replace(mean, delta=np.full_like(mean.delta, np.inf))
    with pytest.raises(FloatingPointError, match="leaves the model non-finite"):
        round_result(STATE, mean, LAYOUT, ServerOptimizer().step)


def test_a_robust_aggregate_is_the_update_with_fedavgs_weight_and_loss():
    median = np.median(np.stack([u.weights for u in hospitals()[:3]]), axis=0)
    robust = mean_of_model(SENT, median, hospitals())
    np.testing.assert_allclose(SENT + robust.delta, median, rtol=1e-6)
    fedavg = mean_of_updates(SENT, hospitals())
    assert robust.weight == fedavg.weight and robust.train_loss == fedavg.train_loss
