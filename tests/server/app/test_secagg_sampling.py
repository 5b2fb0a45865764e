"""SecAgg+ rounds sample every planned hospital, even one that registers a moment late."""

import threading
import time
from unittest.mock import MagicMock

import numpy as np
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from server.app.secagg import SecAggFedAvg
from shared_model.config import RunConfig


class Hospital(ClientProxy):
    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    get_properties = get_parameters = fit = evaluate = reconnect = MagicMock()


def strategy(planned: int, timeout: float) -> SecAggFedAvg:
    run = RunConfig.from_run_config(
        {"server.min-hospitals": 3, "server.wait-for-hospitals-timeout": timeout}
    )
    meter = MagicMock()
    meter.errors = {}
    return SecAggFedAvg(run, [np.zeros(2)], meter, plan=(planned, 4, 3))


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
    import pytest

    s = strategy(3, timeout=30)
    s.begin(1, s.current)  # round 1 starts; no aggregate_fit follows
    s.sampled = 3
    s.meter.errors = {7: "<class 'ValueError'>:<'boom at the hospital'>"}
    short = s.not_aggregated()
    assert "round 1: SecAgg+ ended" in str(short) and "stage-timeout" in str(short)
    assert short.record.round == 1 and short.record.skipped
    assert short.record.failures == 3  # none of the 3 sampled got an update through
    (failed,) = short.record.hospitals  # the error a hospital replied with, by name
    assert failed.status == "failed" and failed.reason == "ValueError: boom at the hospital"
    s.meter.errors = {}
    s.begin(2, s.current)
    from server.app.strategy import ShortRoundError

    with pytest.raises(ShortRoundError, match="no hospital uploaded") as e:
        s.aggregate_fit(2, [], [])  # aggregation reached, with nothing to aggregate
    assert e.value.record.round == 2 and e.value.record.skipped
