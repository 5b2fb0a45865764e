"""Hospitals that crash, go silent or send refused updates mid-round (SecAgg+ off).

Up to a third of the sampled hospitals may be lost and the round still completes with
the others' FedAvg. Beyond that (server.min-update-fraction) the round is skipped with
the model unchanged, or fails the run (server.short-round); every lost hospital is
recorded with its reason, and no wait is without a timeout.
"""

import json
import time

import numpy as np
import pytest
from flwr.app import Message

from server.app.rounds import PlainRounds, run_rounds
from server.app.store import RunStore
from server.app.strategy import FederationError, build_strategy
from shared_model.config import RunConfig
from tests.support.grids import LAYOUT, START, Grid
from tests.support.grids import _task as _task  # the autouse fixture


def federate(tmp_path, behaviour, grid=None, **settings):
    run = RunConfig.from_run_config(
        {
            "num-rounds": 2,
            "secagg.enabled": False,
            "server.fraction-evaluate": 0.0,
            "server.min-hospitals": 1,
            "server.round-timeout": 1.0,
            "server.momentum": 0.0,  # plain FedAvg: the updates' arithmetic is checked
            **settings,
        }
    )
    store = RunStore(tmp_path)
    store.start({})
    strategy = build_strategy(run, "", LAYOUT)
    grid = (grid or Grid)(behaviour)
    final = run_rounds(PlainRounds(grid, run, strategy), run, store, START)
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    return LAYOUT.pack(final), rounds


@pytest.mark.fault(
    "A third of a round's hospitals crash or never answer (SecAgg+ off)",
    (
        "The round completes with the others' FedAvg; each lost hospital recorded with its "
        "reason; the wait ends at server.round-timeout"
    ),
    "the survivors' updates, every reason",
)
def test_a_round_completes_with_a_third_of_its_hospitals_lost(tmp_path):
    behaviour = {1: "ok", 2: "crash", 3: "ok", 4: "silent", 5: "ok", 6: "ok"}
    started = time.monotonic()
    weights, rounds = federate(tmp_path, behaviour)
    assert time.monotonic() - started < 30  # the silent hospital costs one timeout a round
    np.testing.assert_allclose(weights, 2.0)  # two rounds of the survivors' FedAvg
    for r in rounds:
        assert not r["skipped"] and r["failures"] == 2
        reasons = {h["hospital"]: h["reason"] for h in r["hospitals"] if h["status"] == "failed"}
        assert reasons == {
            "node-2": "RuntimeError: killed",
            "node-4": "no reply within server.round-timeout (1s)",
        }


@pytest.mark.fault(
    "Half of a round's hospitals crash, go silent or send NaN",
    "The round is skipped (server.short-round = skip), the model unchanged",
    "the model, every reason",
)
@pytest.mark.parametrize("lost", ["crash", "silent", "nan"])
def test_too_many_lost_skips_the_round_and_keeps_the_model(tmp_path, lost):
    behaviour = {1: "ok", 2: lost, 3: lost, 4: "ok"}  # half lost: more than a third
    weights, rounds = federate(tmp_path, behaviour)
    np.testing.assert_allclose(weights, 0.0)  # nothing averaged: the model is unchanged
    assert [r["skipped"] for r in rounds] == [True, True]
    statuses = {h["hospital"]: h["status"] for h in rounds[0]["hospitals"]}
    expected = "rejected" if lost == "nan" else "failed"
    assert [s for h, s in sorted(statuses.items()) if s == expected] == [expected] * 2


def test_too_many_lost_fails_the_run_when_configured(tmp_path):
    behaviour = {1: "ok", 2: "crash", 3: "silent"}
    with pytest.raises(FederationError, match=r"2 of 3 sampled .*server\.min-update-fraction"):
        federate(tmp_path, behaviour, **{"server.short-round": "fail"})
    # a lower bar lets the same round through
    weights, _ = federate(tmp_path / "low", behaviour, **{"server.min-update-fraction": 0.3})
    np.testing.assert_allclose(weights, 2.0)


class GoneInRoundTwo(Grid):
    """Node 13 trains in round 1, then the SuperLink reports it unavailable."""

    def _reply(self, msg: Message) -> Message | None:
        second = int(msg.content["config"]["server-round"]) == 2
        self.behaviour[13] = "unavailable" if second else "ok"
        return super()._reply(msg)


@pytest.mark.fault(
    "A hospital whose heartbeat stopped: the SuperLink answers for it (as node 1)",
    "Counted once, under its own name with Flower's reason; the round completes without it",
    "the others' updates",
)
def test_a_node_the_superlink_reports_unavailable_is_counted_once_under_its_own_name(tmp_path):
    _, (first, second) = federate(tmp_path, {11: "ok", 12: "ok", 13: "ok"}, GoneInRoundTwo)
    assert first["failures"] == 0
    assert second["failures"] == 1 and not second["skipped"]  # not also counted as silent
    failed = [(h["hospital"], h["reason"]) for h in second["hospitals"] if h["status"] == "failed"]
    assert failed == [("h13", "Error: Node Unavailable")]  # its name from round 1, not node 1
