"""SecAgg+ at protocol level, with hospitals whose deltas are known.

Fake hospitals speak the real protocol (Flower's SecAggPlusWorkflow on the server,
secaggplus_mod through client/secagg.py) but upload fixed random deltas, so the test
can check what the server received against the truth.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.secagg import legacy_fit_reply, legacy_request, secagg_mod
from server.secagg import run_secagg_rounds
from shared_model.config import RunConfig, SecAggConfig
from shared_model.packing import WeightLayout

pytestmark = pytest.mark.slow
# Large enough that a chance correlation with a masked upload is ~0.005 (sd 1/sqrt(n)).
SHAPES = {"layer.weight": (200, 200), "layer.bias": (50,)}
WEIGHTS = [300, 500, 700, 900]  # training-set sizes of the 4 hospitals
LAYOUT = WeightLayout.of({k: torch.zeros(s) for k, s in SHAPES.items()})
SIZE = LAYOUT.size  # the weights travel, and are masked, as one flat array


def true_delta(hospital: int) -> list[np.ndarray]:
    rng = np.random.default_rng(100 + hospital)
    return [rng.normal(0, 0.05, shape).astype(np.float32) for shape in SHAPES.values()]


def packed_delta(hospital: int) -> np.ndarray:
    return np.concatenate([d.ravel() for d in true_delta(hospital)])


def fake_hospitals(failing: int | None, declining: bool = False) -> ClientApp:
    app = ClientApp(mods=[secagg_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        hospital = int(ctx.node_config["partition-id"])
        if hospital == failing:  # called in the masked-upload stage: after the key exchange
            raise RuntimeError("hospital lost power")
        legacy_request(msg, LAYOUT)
        if declining:  # a spent budget: a zero update with weight 0, as client/handlers.py
            return legacy_fit_reply(
                msg,
                [np.zeros(SIZE, np.float32)],
                0,
                {"hospital-id": f"hospital-{hospital}", "declined": 1, "reason": "budget"},
                SecAggConfig(),
            )
        return legacy_fit_reply(
            msg,
            [packed_delta(hospital)],
            WEIGHTS[hospital],
            {
                "hospital-id": f"hospital-{hospital}",
                "declined": 0,
                "train-loss": 0.5,
                "epsilon": 1.0,
            },
            SecAggConfig(),
        )

    return app


class RecordingGrid:
    """Delegates to the real grid and keeps every reply the server receives."""

    def __init__(self, grid: Grid) -> None:
        self._grid, self.replies = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def pull_messages(self, message_ids):  # what server/wire.py's send_and_receive calls
        replies = list(self._grid.pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def received_arrays(replies) -> list[np.ndarray]:
    """Every numeric array in every reply: array records and serialized bytes in configs."""
    found = []
    for msg in replies:
        if msg.has_error():
            continue
        for record in msg.content.array_records.values():
            found += [arr.numpy() for arr in record.values()]
        for record in msg.content.config_records.values():
            for value in record.values():
                for item in value if isinstance(value, list) else [value]:
                    if isinstance(item, bytes):
                        with contextlib.suppress(Exception):  # key material, not an array
                            found.append(bytes_to_ndarray(item))
    return found


def run_round(failing: int | None, declining: bool = False):
    outcome = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, ctx: Context) -> None:
        recording = RecordingGrid(grid)
        run = RunConfig.from_run_config(
            {"num-rounds": 1, "server.fraction-evaluate": 0.0, "server.min-hospitals": 4}
        )
        initial = {k: torch.zeros(s) for k, s in SHAPES.items()}
        rounds = []
        final = run_secagg_rounds(
            recording, ctx, run, initial, "", 4, lambda rec, state: rounds.append(rec)
        )
        outcome.update(final=final, replies=recording.replies, rounds=rounds)

    run_simulation(
        server_app=server,
        client_app=fake_hospitals(failing, declining),
        num_supernodes=4,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    return outcome


def fedavg(hospitals: list[int]) -> list[np.ndarray]:
    total = sum(WEIGHTS[h] for h in hospitals)
    return [
        sum(WEIGHTS[h] * true_delta(h)[i] for h in hospitals) / total for i in range(len(SHAPES))
    ]


def test_server_sees_only_the_sum():
    outcome = run_round(failing=None)
    expected = fedavg([0, 1, 2, 3])
    for got, want in zip(outcome["final"].values(), expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4)  # quantization error only
    arrays = [
        a.astype(np.float64).ravel()
        for a in received_arrays(outcome["replies"])
        if np.issubdtype(a.dtype, np.number)
    ]
    uploads = [a for a in arrays if a.size == SIZE]
    assert len(uploads) >= 4, "the recording did not capture every hospital's masked upload"
    raw = [a for a in received_arrays(outcome["replies"]) if a.size == SIZE]
    assert all(a.dtype == np.uint32 for a in raw)  # compact masked uploads (client/secagg.py)
    (record,) = outcome["rounds"]
    plain_update = 4 * sum(int(np.prod(s)) for s in SHAPES.values())  # float32
    assert sorted(h.hospital for h in record.hospitals) == [f"hospital-{i}" for i in range(4)]
    for h in record.hospitals:  # every stage's upload: keys, shares, masked vector, unmask
        assert 0 < h.key_bytes_up < 0.05 * plain_update, h
        assert plain_update < h.bytes_up - h.key_bytes_up <= 1.1 * plain_update, h
    for hospital in range(4):
        t = packed_delta(hospital).astype(np.float64)
        for arr in uploads:
            assert not np.allclose(arr, t, atol=1e-3)  # no plain update, ever
            assert abs(np.corrcoef(arr, t)[0, 1]) < 0.05  # a chance correlation: ~1/sqrt(size)


@pytest.mark.fault(
    "A hospital drops out of SecAgg+ after the key exchange",
    "The survivors unmask the sum; the server still sees no single update",
    "the survivors' updates",
)
def test_round_survives_a_hospital_dropping_out_after_the_key_exchange():
    outcome = run_round(failing=3)
    assert outcome["rounds"] and outcome["rounds"][0].failures == 1
    expected = fedavg([0, 1, 2])  # the survivors only
    for got, want in zip(outcome["final"].values(), expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4)


@pytest.mark.fault(
    "Every hospital declines a SecAgg+ round (budgets spent)",
    "The round ends without an update, the model unchanged",
    "the model, each ledger",
)
def test_a_round_where_every_hospital_declines_ends_without_an_update():
    """Each uploads a zero update with weight 0: no update, the model stays as it was."""
    outcome = run_round(failing=None, declining=True)
    (record,) = outcome["rounds"]
    assert record.declined == 4 and record.failures == 0
    for got in outcome["final"].values():
        assert not got.numpy().any()
