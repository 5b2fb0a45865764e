import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common import MessageType

from server.app.store import HospitalRound, RoundRecord, RunStore
from server.app.strategy import (
    FederationError,
    HospitalFedAvg,
    nan_aware_weighted_mean,
    wait_for_hospitals,
)
from shared_model.packing import PACKED_KEY
from tests.support.flower import make_message
from tests.support.grids import _task as _task  # the autouse fixture

SENT = np.zeros(3, dtype=np.float32)  # the packed model the round sent


def reply(node: int, weights: float | None, n: int, *, declined: bool = False, eps: float = 1.0):
    content = RecordDict(
        {
            "metrics": MetricRecord(
                {"num-examples": n, "train-loss": 0.5, "epsilon": eps, "declined": int(declined)}
            ),
            "hospital": ConfigRecord(
                {"hospital-id": f"h{node}", "reason": "why" if declined else ""}
            ),
        }
    )
    if weights is not None:
        content["arrays"] = ArrayRecord({PACKED_KEY: Array(np.full(3, weights, dtype=np.float32))})
    # A reply comes from the node the instruction was sent to.
    return Message(content, reply_to=make_message(RecordDict(), MessageType.TRAIN, node))


def failed(node: int) -> Message:
    instruction = make_message(RecordDict(), MessageType.TRAIN, node)
    return Message(Error(code=1, reason="boom"), reply_to=instruction)


class _Nodes:
    """Just enough of a Grid for configure_train to sample nodes 1..4."""

    def get_node_ids(self):
        return [1, 2, 3, 4]


def sent(strategy: HospitalFedAvg) -> HospitalFedAvg:
    """The strategy after it sent SENT for round 1, as a round begins."""
    strategy.begin_round()
    list(
        strategy.configure_train(
            1, ArrayRecord({PACKED_KEY: Array(SENT)}), ConfigRecord(), _Nodes()
        )
    )
    return strategy


def test_weighted_fedavg_sets_declines_and_failures_aside():
    strategy = sent(HospitalFedAvg(planned_rounds=3))
    replies = [reply(1, 1.0, 100), reply(2, 4.0, 300), reply(3, None, 0, declined=True), failed(4)]
    mean = strategy.aggregate_update(1, replies)
    assert np.allclose(SENT + mean.delta, (1.0 * 100 + 4.0 * 300) / 400)
    assert strategy.declined == 1 and strategy.failures == 1
    status = {h.hospital: h.status for h in strategy.round_hospitals.values()}
    assert status == {"h1": "trained", "h2": "trained", "h3": "declined", "node-4": "failed"}
    assert mean.weight == 400 and mean.train_loss == pytest.approx(0.5)


def test_all_declined_gives_no_update():
    strategy = sent(HospitalFedAvg(planned_rounds=1))
    assert strategy.aggregate_update(2, [reply(1, None, 0, declined=True)]) is None
    assert strategy.declined == 1


def test_flowers_own_averaging_is_not_reachable():
    """It would skip the checks and the declines; these rounds aggregate through the core."""
    with pytest.raises(NotImplementedError, match="aggregate_update"):
        sent(HospitalFedAvg(planned_rounds=1)).aggregate_train(1, [reply(1, 1.0, 100)])


def test_nan_aware_mean_ignores_undefined_metrics():
    records = [
        RecordDict({"m": MetricRecord({"num-examples": 10, "auroc.x": 0.8, "loss": 1.0})}),
        RecordDict({"m": MetricRecord({"num-examples": 30, "auroc.x": float("nan"), "loss": 2.0})}),
    ]
    out = nan_aware_weighted_mean(records, "num-examples")
    assert out["auroc.x"] == pytest.approx(0.8)
    assert out["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert out["num-examples"] == 40


def test_waiting_for_hospitals_times_out():
    class Grid:
        def get_node_ids(self):
            return [1]

    with pytest.raises(FederationError, match="only 1 of the required 2 hospitals"):
        wait_for_hospitals(Grid(), 2, timeout=1.0)


def test_run_store_round_trip(tmp_path):
    import torch

    store = RunStore(tmp_path / "run")
    store.start({"num-rounds": 2})
    state = {"w": torch.arange(4.0)}
    rec = RoundRecord(
        round=1,
        train_loss=0.5,
        eval_loss=float("nan"),
        eval_auroc=0.7,
        eval_metrics={"auroc.x": float("nan")},
        hospitals=[HospitalRound("h0", 1, "trained", epsilon=math.inf)],
        seconds=1.0,
    )
    store.save_round(rec, state)
    latest = store.latest_checkpoint()
    assert latest is not None and latest[0] == 1 and torch.equal(latest[1]["w"], state["w"])
    text = (tmp_path / "run" / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    store.finish("completed", state)
    assert (tmp_path / "run" / "global_model.safetensors").exists()


def test_short_reason_strips_remote_tracebacks():
    from server.app.strategy import short_reason

    ray = (
        "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'ray::ClientAppActor.run()"
        '\n  File "x.py", line 3\nValueError: deep\n\nflwr.clientapp.client_app.'
        "ClientAppException: \nException ClientAppException occurred. Message: cannot split "
        "15 records'>"
    )
    assert short_reason(ray) == "cannot split 15 records"
    assert short_reason("<class 'ValueError'>:<'bad label'>") == "ValueError: bad label"
    assert short_reason("Traceback\n  x\nKeyError: 'k'\n") == "KeyError: 'k'"


def evaluation_reply(
    node: int, stats=None, *, withheld: bool = False, vector=None, held_out=None
) -> Message:
    status = {"hospital-id": f"h{node}", "status": "withheld" if withheld else "evaluated"}
    figures = {"held-out-epsilon": held_out, "max-held-out-epsilon": 8.0} if held_out else {}
    content = RecordDict(
        {
            "metrics": MetricRecord({"num-examples": 0, **figures}),
            "hospital": ConfigRecord(status),
        }
    )
    if stats is not None or vector is not None:
        values = stats.to_vector() if stats is not None else vector
        content["evaluation"] = ArrayRecord({"statistics": Array(values)})
    return Message(content, reply_to=make_message(RecordDict(), MessageType.EVALUATE, node))


def test_evaluation_is_summed_over_the_hospitals_that_share_it():
    from shared_model.evaluation import EvalStats

    labels = ("a", "b")
    rng = np.random.default_rng(0)

    def stats(n):
        targets = (rng.random((n, 2)) < 0.4).astype(float)
        return EvalStats.from_predictions(
            labels, rng.normal(size=(n, 2)) + targets, targets, rng.random(n)
        )

    one, two = stats(60), stats(90)
    strategy = HospitalFedAvg(planned_rounds=1, labels=labels)
    strategy.begin_round()
    bad = np.full(EvalStats.vector_size(2), -1.0)  # counts below zero: not statistics
    metrics = strategy.aggregate_evaluate(
        1,
        [
            evaluation_reply(1, one, held_out=1.25),
            evaluation_reply(2, two),
            evaluation_reply(3, withheld=True),
            evaluation_reply(4, vector=bad),
        ],
    )
    assert metrics["auroc"] == pytest.approx((one + two).metrics()["auroc"])
    assert metrics["num-examples"] == 150
    assert strategy.withheld == 1 and strategy.eval_failures == 1
    by_name = {h.hospital: h for h in strategy.round_hospitals.values()}
    assert by_name["h4"].status == "failed" and "malformed evaluation" in by_name["h4"].reason
    assert by_name["h3"].eval_auroc is None  # withheld: the server knows nothing of it
    # the held-out epsilon a hospital states with its (noised) statistics is recorded
    assert (by_name["h1"].held_out_epsilon, by_name["h1"].max_held_out_epsilon) == (1.25, 8.0)
    assert by_name["h2"].held_out_epsilon is None
    np.testing.assert_array_equal(strategy.evaluation.to_vector(), (one + two).to_vector())
