"""SecAgg+ rounds sample every planned hospital, even one that registers a moment late."""

import logging
import threading
import time

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from server.app.grid import MeteredGrid
from server.app.secagg import SecAggFedAvg, SecAggRounds, TooFewHospitalsError
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from tests.support.grids import _task as _task  # the autouse fixture
from tests.support.loop_grid import loop_federation


class Hospital(ClientProxy):
    """A connected hospital as Flower's client manager lists it; the strategy only samples
    it here, so every call that would reach the hospital is refused."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def _unreachable(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("sampling must not contact a hospital")

    get_properties = get_parameters = fit = evaluate = reconnect = _unreachable


class NoGrid:
    """A grid with no hospital: the strategy's sampling never sends a message."""

    def get_node_ids(self) -> list[int]:
        return []


def strategy(planned: int, timeout: float) -> SecAggFedAvg:
    run = RunConfig.from_run_config(
        {"server.min-hospitals": 3, "server.wait-for-hospitals-timeout": timeout}
    )
    return SecAggFedAvg(run, [np.zeros(2)], MeteredGrid(NoGrid()), plan=(planned, 4, 3))


def test_a_hospital_registering_late_is_still_sampled():
    manager = SimpleClientManager()
    for node in range(3):
        manager.register(Hospital(node))
    late = threading.Timer(0.5, lambda: manager.register(Hospital(3)))
    late.start()
    sampled = strategy(4, timeout=30).configure_fit(1, ndarrays_to_parameters([]), manager)
    late.join()
    assert sorted(proxy.node_id for proxy, _ in sampled) == [0, 1, 2, 3]


def test_a_hospital_that_never_comes_does_not_stall_the_round():
    manager = SimpleClientManager()
    for node in range(3):
        manager.register(Hospital(node))
    started = time.monotonic()
    sampled = strategy(4, timeout=1).configure_fit(1, ndarrays_to_parameters([]), manager)
    assert len(sampled) == 3 and time.monotonic() - started < 10


def test_a_round_secagg_ended_before_aggregation_is_a_short_round_naming_the_timeout():
    """Too few hospitals in time: Flower skips aggregation; fedfusion must not carry on as
    if the round trained. The round driver then applies server.short-round to it."""
    s = strategy(3, timeout=30)
    s.begin(1)  # round 1 starts; no aggregate_fit follows
    s.sampled = 3
    s.meter.errors = {7: "<class 'ValueError'>:<'boom at the hospital'>"}
    short = s.not_aggregated()
    assert "round 1: SecAgg+ ended" in str(short) and "stage-timeout" in str(short)
    assert short.record.round == 1 and short.record.skipped
    assert short.record.failures == 3  # none of the 3 sampled got an update through
    (failed,) = short.record.hospitals  # the error a hospital replied with, by name
    assert failed.status == "failed" and failed.reason == "ValueError: boom at the hospital"
    s.meter.errors = {}
    s.begin(2)
    from server.app.strategy import ShortRoundError

    with pytest.raises(ShortRoundError, match="no hospital uploaded") as e:
        s.aggregate_fit(2, [], [])  # aggregation reached, with nothing to aggregate
    assert e.value.record.round == 2 and e.value.record.skipped


@pytest.mark.fault(
    "A hospital is lost for good and fewer than 3 remain for SecAgg+",
    "After server.wait-for-hospitals-timeout the run fails, naming who is missing; "
    "restartable later",
    "rounds before it, the run's record",
)
def test_fewer_hospitals_than_secagg_needs_fail_the_round_naming_who_is_missing(caplog):
    manager = SimpleClientManager()
    for node in range(2):
        manager.register(Hospital(node))
    s = strategy(3, timeout=1)
    s.known = {0: "hospital-0", 1: "hospital-1", 2: "hospital-2"}  # from earlier rounds
    started = time.monotonic()
    with pytest.raises(TooFewHospitalsError) as e, caplog.at_level(logging.INFO):
        s.configure_fit(2, ndarrays_to_parameters([]), manager)
    assert "waiting up to 1s for 3 hospitals, 2 connected" in caplog.text  # said at once
    assert time.monotonic() - started < 10
    said = str(e.value)
    assert "round 2/" in said and "only 2 hospitals connected after 1s" in said
    assert "wait-for-hospitals-timeout" in said and "needs at least 3" in said
    assert said.endswith("not connected: hospital-2")
    manager.register(Hospital(5))  # it came back (under a new node id): the round goes on
    assert len(s.configure_fit(2, ndarrays_to_parameters([]), manager)) == 3


def test_a_hospital_dropped_just_after_the_wait_is_waited_for_again():
    """Flower unregisters a dead hospital on its own thread, possibly right after the
    wait saw it; the round then waits for its return instead of failing at once."""

    class Racing(SimpleClientManager):
        def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
            seen = super().wait_for(num_clients, timeout)
            if "2" in self.clients:  # its heartbeat expired just now
                self.unregister(self.clients["2"])
                threading.Timer(0.5, lambda: self.register(Hospital(5))).start()  # rejoins
            return seen

    manager = Racing()
    for node in range(3):
        manager.register(Hospital(node))
    sampled = strategy(3, timeout=30).configure_fit(2, ndarrays_to_parameters([]), manager)
    assert sorted(proxy.node_id for proxy, _ in sampled) == [0, 1, 5]


def test_too_few_hospitals_for_the_final_evaluation_only_loses_that_evaluation(tmp_path, caplog):
    """Training is done when the last exchange (evaluation only) lacks hospitals: the
    real driver trains a round with three hospitals, which are then gone."""
    layout = WeightLayout.of({"w": torch.zeros(8)})
    run = RunConfig.from_run_config(
        {"num-rounds": 1, "output-dir": str(tmp_path), "server.wait-for-hospitals-timeout": 1}
    )
    codec = UploadCodec(layout.size, run.model.labels, run.secagg.clipping_range, 10_000.0)
    nothing = EvalStats.zeros(run.model.labels)
    grid = loop_federation(
        tmp_path,
        [101, 102, 103],
        lambda node, config: codec.encode(np.full(layout.size, 0.01), 0.5, 0.5, nothing),
        codec,
        layout,
    )
    context = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(), run_config={})
    driver = SecAggRounds(grid, context, run, layout, "", hospitals=3)
    state = layout.unpack(np.zeros(layout.size, layout.numpy_dtype))
    trained = driver.train_round(1, state, lambda state, new: new)
    assert {h.status for h in trained.record.hospitals} == {"trained"}
    grid.silent.update(grid.contexts)  # every hospital gone before the final evaluation
    with caplog.at_level(logging.WARNING):
        assert driver.finish(trained.state) == {}
    assert "final model could not be evaluated: the final evaluation: only 0" in caplog.text
    assert not driver.rounds._thread.is_alive()  # the client manager's thread was stopped
