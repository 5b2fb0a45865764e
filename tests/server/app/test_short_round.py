"""server.short-round = retry | skip | fail, through the ServerApp itself.

A round with too few updates is tried again from the last checkpoint (retry, up to
server.round-retries times, then the run fails), recorded as skipped with the model
unchanged (skip; under SecAgg+ too), or fails the run. Hospitals see every attempt
as the same round number, so their ledgers count each attempt they trained in full.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from server.app import server_app
from server.app.rounds import after_short_round
from server.app.store import RoundRecord, RunStore
from server.app.strategy import FederationError, ShortRoundError
from shared_model.config import RunConfig
from shared_model.packing import PACKED_KEY
from tests.support.grids import Grid
from tests.support.grids import _task as _task  # the autouse fixture


class FlakyGrid(Grid):
    """Hospitals 1..3 train (+1 on every weight); ``crashes[(node, round)]`` is how many
    of that round's attempts the node crashes in before it answers."""

    def __init__(self, crashes: dict[tuple[int, int], int]) -> None:
        super().__init__({1: "ok", 2: "ok", 3: "ok"})
        self.crashes = Counter(crashes)
        self.asked: Counter[int] = Counter()  # train requests per round (all attempts)

    def _reply(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        server_round = int(msg.content["config"]["server-round"])
        self.asked[server_round] += 1
        if self.crashes[(node, server_round)] > 0:
            self.crashes[(node, server_round)] -= 1
            return Message(Error(code=1, reason="<class 'OSError'>:<'link down'>"), reply_to=msg)
        weights = msg.content["arrays"][PACKED_KEY].numpy() + 1.0
        content = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": 10, "train-loss": 0.5, "declined": 0}),
                "hospital": ConfigRecord({"hospital-id": f"h{node}", "round": server_round}),
                "arrays": ArrayRecord({PACKED_KEY: Array(weights)}),
            }
        )
        return Message(content, reply_to=msg)


def serve(tmp_path, grid: Grid, **settings) -> tuple[dict, list[dict]]:
    run_config = {
        "num-rounds": 3,
        "secagg.enabled": False,
        "server.fraction-evaluate": 0.0,
        "server.min-hospitals": 1,
        "server.round-timeout": 1.0,
        "server.momentum": 0.0,  # plain FedAvg: the updates' arithmetic is checked
        "output-dir": str(tmp_path),
        **settings,
    }
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    try:
        server_app.main(grid, context)
    finally:
        info = json.loads((tmp_path / "run.json").read_text())
        rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    return info, rounds


def assert_trained(tmp_path, rounds: int) -> None:
    """The exported model is the initial one plus ``rounds`` completed rounds of +1."""
    from safetensors.torch import load_file

    from shared_model.weights import initial_model, shared_state

    start = shared_state(initial_model(RunConfig.from_run_config({}).model, 7))
    final = load_file(str(tmp_path / "global_model.safetensors"))
    assert final.keys() == start.keys()
    for key, value in start.items():
        torch.testing.assert_close(final[key], value + float(rounds), rtol=0, atol=1e-5)


@pytest.mark.fault(
    "Two of three hospitals lose their link in round 2",
    "With short-round = retry the round runs again from round 1's checkpoint and completes",
    "the model (exactly 3 rounds of updates), every attempt in run.json",
)
def test_retry_runs_a_short_round_again_from_its_checkpoint(tmp_path):
    grid = FlakyGrid({(2, 2): 1, (3, 2): 1})  # round 2, first attempt: 2 of 3 lost
    info, rounds = serve(tmp_path, grid, **{"server.short-round": "retry", "seed": 7})
    assert info["status"] == "completed"
    assert [r["round"] for r in rounds] == [1, 2, 3] and not any(r["skipped"] for r in rounds)
    assert rounds[1]["failures"] == 0  # the attempt that completed
    assert [r["round"] for r in info["retried_rounds"]] == [2]
    assert "OSError: link down" in info["retried_rounds"][0]["reason"]
    assert grid.asked == {1: 3, 2: 6, 3: 3}  # round 2 asked twice, as round 2
    # three completed rounds of +1, not four: the short attempt changed nothing
    assert_trained(tmp_path, 3)


@pytest.mark.fault(
    "The same round stays short through every retry",
    "The run fails, naming server.round-retries; restartable later",
    "rounds before it, the run's record",
)
def test_retries_used_up_fail_the_run_naming_the_setting(tmp_path):
    grid = FlakyGrid({(2, 2): 5, (3, 2): 5})
    settings = {"server.short-round": "retry", "server.round-retries": 2, "seed": 7}
    with pytest.raises(FederationError, match=r"tried 3 times, server.round-retries 2"):
        serve(tmp_path, grid, **settings)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["status"] == "failed" and len(info["retried_rounds"]) == 2
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1]  # nothing of round 2 was recorded as done
    assert grid.asked[2] == 9


@pytest.mark.fault(
    "A SecAgg+ round ends with too few hospitals",
    "Recorded as skipped, the model unchanged, the next round goes on",
    "the model, the round's record",
)
def test_skip_under_secagg_records_the_round_and_keeps_the_model(tmp_path):
    """SecAgg+ ends a short round inside Flower's workflow; the ServerApp skips it."""
    run = RunConfig.from_run_config({"server.short-round": "skip", "num-rounds": 3})
    store = RunStore(tmp_path)
    store.begin({}, "")
    kept, fresh = {"w": torch.full((4,), 1.0)}, {"w": torch.zeros(4)}
    store.save_round(RoundRecord(1, 0.5, None, None, {}, [], 0.1), kept)
    short = RoundRecord(2, None, None, None, {}, [], 0.1, failures=2, skipped=True)
    shown: list[RoundRecord] = []
    state, next_round = after_short_round(
        ShortRoundError("round 2: too few", short), run, store, {}, shown.append, fresh
    )
    assert next_round == 3 and torch.equal(state["w"], kept["w"])
    assert [r["round"] for r in store.rounds] == [1, 2] and store.rounds[1]["skipped"]
    saved = store.latest_checkpoint()
    assert saved is not None and saved[0] == 2 and torch.equal(saved[1]["w"], kept["w"])
    assert shown == [short]
    fail = RunConfig.from_run_config({"server.short-round": "fail"})
    with pytest.raises(ShortRoundError):
        after_short_round(
            ShortRoundError("round 3: too few", short), fail, store, {}, shown.append, fresh
        )
