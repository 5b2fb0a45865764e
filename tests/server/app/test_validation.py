"""Broken and malicious updates (SecAgg+ off): refused with the reason; robust aggregators."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from client.app.secagg import legacy_fit_reply
from server.app.strategy import FederationError, HospitalFedAvg
from server.app.validation import update_problem
from shared_model.config import ConfigError, RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import PACKED_KEY, WeightLayout
from tests.support.flower import make_message
from tests.support.tier import examples

LAYOUT = WeightLayout.of({"a.weight": torch.zeros(4, 3), "a.bias": torch.zeros(4)})
SENT = np.linspace(-1.0, 1.0, LAYOUT.size).astype(np.float32)


def packed(values: np.ndarray) -> ArrayRecord:
    return ArrayRecord({PACKED_KEY: Array(values)})


def problem(values, *, reply_round=3, max_norm=10.0, arrays=None, num_examples=100):
    record = packed(values) if arrays is None else arrays
    return update_problem(
        record,
        LAYOUT,
        SENT,
        server_round=3,
        reply_round=reply_round,
        num_examples=num_examples,
        max_examples=10_000.0,
        max_norm=max_norm,
    )


deltas = st.lists(st.floats(-0.5, 0.5, width=32), min_size=LAYOUT.size, max_size=LAYOUT.size).map(
    lambda v: np.asarray(v, dtype=np.float32)
)


@settings(max_examples=examples(60), deadline=None)
@given(delta=deltas)
def test_a_finite_update_within_the_norm_of_this_round_is_accepted(delta):
    assert problem(SENT + delta) is None  # norm <= 0.5 * sqrt(16) = 2 < 10


@settings(max_examples=examples(60), deadline=None)
@given(delta=deltas, data=st.data())
def test_nan_and_inf_anywhere_are_refused_and_counted(delta, data):
    values = SENT + delta
    spots = data.draw(st.lists(st.integers(0, LAYOUT.size - 1), min_size=1, unique=True))
    kinds = data.draw(
        st.lists(
            st.sampled_from([np.nan, np.inf, -np.inf]), min_size=len(spots), max_size=len(spots)
        )
    )
    values[spots] = kinds
    nan = sum(np.isnan(k) for k in kinds)
    assert problem(values) == f"{nan} NaN and {len(kinds) - nan} infinite values in the weights"


@settings(max_examples=examples(60), deadline=None)
@given(direction=deltas.filter(lambda d: np.linalg.norm(d) > 1e-3), norm=st.floats(0.1, 1e6))
def test_the_update_norm_is_bounded(direction, norm):
    delta = direction / np.linalg.norm(direction.astype(np.float64)) * norm
    values = (SENT.astype(np.float64) + delta).astype(np.float32)
    actual = np.linalg.norm(values.astype(np.float64) - SENT)
    got = problem(values, max_norm=10.0)
    if actual > 10.0:
        assert got is not None and got.startswith(f"update norm {actual:.4g} exceeds")
    else:
        assert got is None
    assert problem(values, max_norm=0.0) is None  # 0: no limit


@settings(max_examples=examples(40), deadline=None)
@given(size=st.integers(0, 40).filter(lambda n: n != LAYOUT.size))
def test_wrong_shapes_dtypes_and_records_are_refused(size):
    assert problem(np.zeros(size, np.float32)) == (
        f"weights of shape ({size},), expected ({LAYOUT.size},)"
    )
    assert problem(SENT.astype(np.float64)) == "weights of dtype float64, expected float32"
    assert problem(SENT.astype(np.int64)) == "weights of dtype int64, expected float32"
    assert problem(SENT.reshape(4, 4)) == f"weights of shape (4, 4), expected ({LAYOUT.size},)"
    two = ArrayRecord({PACKED_KEY: Array(SENT), "extra": Array(SENT)})
    assert (
        problem(SENT, arrays=two) == "expected one packed 'weights' array, got ['weights', 'extra']"
    )
    assert problem(SENT, arrays=ArrayRecord()).startswith("expected one packed")


@given(reply_round=st.one_of(st.integers(-5, 50), st.none(), st.text(max_size=3), st.booleans()))
def test_a_stale_or_unnamed_round_is_refused(reply_round):
    got = problem(SENT, reply_round=reply_round)
    if isinstance(reply_round, int) and not isinstance(reply_round, bool) and reply_round == 3:
        assert got is None
    elif isinstance(reply_round, int) and not isinstance(reply_round, bool):
        assert got == f"stale update: trained for round {reply_round}, this is round 3"
    else:
        assert got == "the reply does not say which round it trained"


@given(
    count=st.one_of(
        st.integers(-5, 10**9), st.floats(), st.none(), st.text(max_size=3), st.booleans()
    )
)
def test_an_update_needs_a_record_count_from_1_to_the_max_weight(count):
    """The count is the update's weight in the mean: none, zero, negative or NaN would
    drop the update silently; a huge one would let one hospital outweigh the rest without
    bound, or overflow the weighted sum to a non-finite model."""
    got = problem(SENT, num_examples=count)
    number = isinstance(count, int | float) and not isinstance(count, bool)
    if number and 1 <= count <= 10_000:
        assert got is None
    elif number and count > 10_000:  # Inf included
        assert got == (
            f"a record count (num-examples) of {count:g} exceeds secagg.max-weight 10000, "
            "the largest weight a hospital may have"
        )
    else:
        assert got == f"a record count (num-examples) of {count!r}: the update has no weight"


# ------------------------------------------------------------------ the strategy


def reply(node: int, values: np.ndarray, n: int = 100, *, server_round: int = 1) -> Message:
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": n, "train-loss": 0.5, "declined": 0}),
            "hospital": ConfigRecord({"hospital-id": f"h{node}", "round": server_round}),
            "arrays": packed(values.astype(np.float32)),
        }
    )
    return Message(content, reply_to=make_message(RecordDict(), MessageType.TRAIN, node))


NO_WEIGHT = "the update has no weight"


def strategy(**kwargs) -> HospitalFedAvg:
    s = HospitalFedAvg(planned_rounds=3, layout=LAYOUT, max_update_norm=10.0, **kwargs)
    s.begin_round()
    list(s.configure_train(1, packed(SENT), ConfigRecord(), _Grid()))
    return s


class _Grid:
    """Just enough of a Grid for configure_train to sample nodes 1..9."""

    def get_node_ids(self):
        return list(range(1, 10))


@pytest.fixture(autouse=True)
def _run_id(monkeypatch):
    """Messages the strategy builds belong to a run, as in a ServerApp."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.mark.fault(
    (
        "Updates with NaN/Inf, wrong shape or dtype, an absurd norm, a stale round or no "
        "positive record count (SecAgg+ off)"
    ),
    "Rejected before averaging; the server logs which hospital and why",
    "the model (the good updates' FedAvg)",
)
def test_bad_updates_are_set_aside_naming_the_hospital_and_the_reason(caplog):
    good = [reply(1, SENT + 0.1, 100), reply(2, SENT - 0.1, 300)]
    nan = SENT.copy()
    nan[3] = np.nan
    bad = [reply(3, nan), reply(4, SENT + 1e4), reply(5, SENT, server_round=0)]
    bad += [reply(6, SENT + 0.1, -5), reply(7, SENT + 0.1, float("nan"))]
    bad += [reply(8, SENT + 2.0, 1e308)]  # would overflow the weighted sum to Inf
    s = strategy()
    with caplog.at_level(logging.WARNING):
        mean = s.aggregate_update(1, good + bad)
    expected = ((SENT + 0.1) * 100 + (SENT - 0.1) * 300) / 400
    np.testing.assert_allclose(SENT + mean.delta, expected, rtol=1e-6)
    assert mean.weight == 400 and s.rejected == 6 and s.failures == 0
    reasons = {h.hospital: (h.status, h.reason) for h in s.round_hospitals.values()}
    assert reasons["h3"] == ("rejected", "1 NaN and 0 infinite values in the weights")
    assert (
        reasons["h4"][0] == "rejected" and "exceeds server.max-update-norm 10" in reasons["h4"][1]
    )
    assert reasons["h5"] == ("rejected", "stale update: trained for round 0, this is round 1")
    assert reasons["h6"] == ("rejected", f"a record count (num-examples) of -5: {NO_WEIGHT}")
    assert reasons["h7"] == ("rejected", f"a record count (num-examples) of nan: {NO_WEIGHT}")
    assert reasons["h8"] == (
        "rejected",
        "a record count (num-examples) of 1e+308 exceeds secagg.max-weight 10000, "
        "the largest weight a hospital may have",
    )
    assert {h for h, (status, _) in reasons.items() if status == "trained"} == {"h1", "h2"}
    logged = [r.getMessage() for r in caplog.records]
    assert any("refused the update of h3 (node 3): 1 NaN" in m for m in logged)


def test_all_updates_refused_gives_no_model_and_the_reasons():
    s = strategy()
    assert s.aggregate_update(1, [reply(1, SENT + 1e4)]) is None and s.rejected == 1
    assert s.failure_reasons()[0].startswith("update norm")


def outliers() -> list[Message]:
    """Four honest hospitals near +0.1 and one attacker far off (inside the norm limit)."""
    rng = np.random.default_rng(0)
    honest = [reply(i, SENT + 0.1 + rng.normal(0, 0.01, SENT.size)) for i in range(1, 5)]
    return [*honest, reply(9, SENT - 2.0)]


@pytest.mark.fault(
    "One attacker's huge update under median / trimmed-mean / Krum",
    "The robust aggregate stays near the honest ones (the mean does not)",
    "the model",
)
@pytest.mark.parametrize("aggregator", ["median", "trimmed-mean", "krum"])
def test_robust_aggregators_resist_one_attacker_that_the_mean_follows(aggregator):
    mean = strategy().aggregate_update(1, outliers())
    robust = strategy(aggregator=aggregator).aggregate_update(1, outliers())
    assert 0.08 < robust.delta.mean() < 0.12  # the honest hospitals' update
    assert mean.delta.mean() < -0.2  # the mean is dragged off


def test_krums_train_loss_comes_from_the_updates_it_selected():
    """A Byzantine hospital's crafted loss must not reach the round's record either."""
    attacked = outliers()
    attacked[-1].content["metrics"]["train-loss"] = 1e6
    robust = strategy(aggregator="krum").aggregate_update(1, attacked)
    assert robust.train_loss == pytest.approx(0.5)  # the honest hospitals' loss
    assert strategy().aggregate_update(1, attacked).train_loss > 1e5  # the mean's is not


def test_krum_with_too_few_updates_fails_the_round_naming_the_setting():
    with pytest.raises(FederationError, match=r"server\.byzantine-hospitals"):
        strategy(aggregator="krum", byzantine_hospitals=1).aggregate_update(1, outliers()[:4])


def test_robust_aggregators_are_refused_with_secagg():
    with pytest.raises(ConfigError, match=r"server\.aggregator 'median'.*secagg\.enabled"):
        RunConfig.from_run_config({"server.aggregator": "median"})
    ok = RunConfig.from_run_config({"server.aggregator": "median", "secagg.enabled": False})
    assert ok.server.aggregator == "median"


@pytest.mark.fault(
    "A non-finite update under SecAgg+",
    "The hospital refuses to mask and upload it",
    "the round's sum",
)
def test_under_secagg_a_hospital_refuses_to_upload_a_non_finite_update():
    codec = UploadCodec(LAYOUT.size, ("normal", "other"), 0.5, 10_000)
    upload = codec.encode(np.zeros(LAYOUT.size), 0.01, 0.3, EvalStats.zeros(codec.labels))
    upload[5] = np.inf
    msg = make_message(RecordDict(), MessageType.TRAIN)
    with pytest.raises(ValueError, match="1 NaN or infinite values; it is not uploaded"):
        legacy_fit_reply(msg, upload, codec, {})
