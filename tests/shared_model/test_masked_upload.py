"""The masked upload through Flower's own SecAgg+ arithmetic: sums come out right.

Masks cancel in the sum, so the server's view is reproduced here with Flower's functions
for the parts that do not cancel: the weighting, the clipping and stochastic
quantization at each hospital, and the dequantization and mean at the server.
"""

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from tests.support.tier import examples

LABELS = ("normal", "effusion")
TARGET, MODULUS = 2**22, 2**32  # Flower's default quantization and modulus ranges


def through_secagg(uploads, codec):
    """What SecAggPlusWorkflow hands the strategy for these (unmasked) uploads."""
    vectors = []
    for upload in uploads:
        ratio = codec.flower_weight / codec.max_weight
        q_ratio = round(ratio * TARGET)
        scaled = parameters_multiply([upload], q_ratio / TARGET)
        quantized = factor_combine(q_ratio, quantize(scaled, codec.clipping_range, TARGET))
        vectors.append([a.astype(np.int64) for a in quantized])  # as the int64 masks make it
    total = vectors[0]
    for v in vectors[1:]:
        total = parameters_addition(total, v)
    total = parameters_mod(total, MODULUS)
    q_total, total = factor_extract(total)
    (mean,) = dequantize(total, codec.clipping_range, TARGET)
    mean += -(len(uploads) - 1) * codec.clipping_range
    return mean * (TARGET / q_total)


def evaluation(n, seed):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, 2)) < 0.4).astype(float)
    return EvalStats.from_predictions(
        LABELS, rng.normal(size=(n, 2)) + targets, targets, rng.random(n)
    )


@settings(max_examples=examples(25), deadline=None)
@given(
    hospitals=st.integers(3, 12),
    seed=st.integers(0, 10_000),
    clipping=st.sampled_from([0.5, 8.0]),
    declined=st.integers(0, 2),
)
def test_the_server_reads_the_weighted_mean_update_and_the_summed_evaluation(
    hospitals, seed, clipping, declined
):
    rng = np.random.default_rng(seed)
    codec = UploadCodec(params=50, labels=LABELS, clipping_range=clipping, max_weight=10_000)
    sizes = rng.integers(50, 3000, size=hospitals)
    deltas = [rng.normal(scale=0.02, size=50) for _ in range(hospitals)]
    losses = rng.random(hospitals)
    evals = [evaluation(int(rng.integers(10, 300)), seed + i) for i in range(hospitals)]
    uploads = []
    for i in range(hospitals):
        trained = i >= declined
        weight = sizes[i] / codec.max_weight if trained else 0.0
        uploads.append(
            codec.encode(deltas[i] if trained else np.zeros(50), weight, losses[i], evals[i])
        )
    got = codec.decode_sum(through_secagg(uploads, codec), hospitals)
    w = np.array([sizes[i] if i >= declined else 0 for i in range(hospitals)], float)
    want = sum(w[i] * deltas[i] for i in range(hospitals)) / w.sum()
    # Stochastic quantization errs by under one level (2 * clipping / TARGET) per value and
    # hospital; dividing the weighted sum by the summed weight scales that error up.
    level = 2 * clipping / TARGET
    bound = 2 * hospitals * level / (w.sum() / codec.max_weight)
    np.testing.assert_allclose(got.update, want, atol=max(1e-4, bound))
    assert got.weight * codec.max_weight == pytest.approx(w.sum(), abs=0.5)
    assert got.train_loss == pytest.approx((w * losses).sum() / w.sum(), abs=1e-3)
    summed = evals[0]
    for e in evals[1:]:
        summed = summed + e
    exact = summed.to_vector()
    exact[1] = 0.0  # the loss sum is not an integer: compared below
    read = got.evaluation.to_vector()
    read_loss = read[1]
    read[1] = 0.0
    np.testing.assert_array_equal(read, exact)  # every count exactly, after rounding
    # the loss sum to within one quantization step per hospital: 2c / 2^22 of its unit
    step = 2 * codec.clipping_range / TARGET / (codec.clipping_range / codec.max_weight / 20)
    assert abs(read_loss - summed.loss_sum) <= hospitals * step


def test_a_round_where_every_hospital_declines_still_sums_the_evaluation():
    codec = UploadCodec(params=10, labels=LABELS, clipping_range=0.5, max_weight=10_000)
    evals = [evaluation(40, i) for i in range(3)]
    uploads = [codec.encode(np.zeros(10), 0.0, math.nan, e) for e in evals]
    got = codec.decode_sum(through_secagg(uploads, codec), 3)
    assert got.weight == 0 and math.isnan(got.train_loss) and not got.update.any()
    assert got.evaluation.examples == 120


def test_an_upload_out_of_range_is_refused_before_it_leaves():
    codec = UploadCodec(params=3, labels=LABELS, clipping_range=0.5, max_weight=100)
    with pytest.raises(ValueError, match=r"exceeds secagg\.max-weight"):
        codec.encode(np.zeros(3), 1.5, 0.3, EvalStats.zeros(LABELS))
    with pytest.raises(ValueError, match="expected 3"):
        codec.encode(np.zeros(4), 0.5, 0.3, EvalStats.zeros(LABELS))


def test_a_noise_variance_the_upload_cannot_carry_is_refused_not_clipped():
    """The summed variance widens the server's intervals; clipped, they would be too
    narrow without anyone knowing."""
    codec = UploadCodec(params=3, labels=LABELS, clipping_range=0.5, max_weight=100)
    noised = evaluation(40, 0)
    noised.noised, noised.noise_variance = 1.0, 100 * 100  # what the slot carries: read back
    got = codec.decode_sum(through_secagg([codec.encode(np.zeros(3), 0.5, 0.3, noised)], codec), 1)
    assert got.evaluation.noise_variance == pytest.approx(10_000, abs=0.5)
    noised.noise_variance = 100 * 100 + 1
    with pytest.raises(ValueError, match=r"raise secagg\.max-weight or this hospital's held-out"):
        codec.encode(np.zeros(3), 0.5, 0.3, noised)
