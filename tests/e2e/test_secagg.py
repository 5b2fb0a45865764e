"""SecAgg+ at protocol level, with hospitals whose deltas are known.

Fake hospitals speak the real protocol (Flower's SecAggPlusWorkflow on the server,
secaggplus_mod through client/app/secagg.py) but upload fixed random deltas, so the test
can check what the server received against the truth.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app.outbound import outbound_guard, unlisted_fields
from client.app.secagg import legacy_fit_reply, legacy_request, secagg_mod
from client.app.secagg_checks import SIM_MEMBERS_ENV
from server.app.rounds import run_rounds
from server.app.secagg import SecAggRounds
from server.app.store import RoundRecord, RunStore
from shared_model.config import RunConfig, SecAggConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from shared_model.protocol import Request

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


LABELS = RunConfig().model.labels
CODEC = UploadCodec(SIZE, LABELS, SecAggConfig().clipping_range, SecAggConfig().max_weight)


def held_out(hospital: int) -> EvalStats:
    """A fake hospital's evaluation of whatever model it receives: known, per hospital."""
    rng = np.random.default_rng(200 + hospital)
    n = 40 + 10 * hospital
    targets = (rng.random((n, len(LABELS))) < 0.3).astype(float)
    logits = rng.normal(size=targets.shape) + 2 * targets
    return EvalStats.from_predictions(LABELS, logits, targets, rng.random(n))


def fake_hospitals(failing: int | None, declining: bool = False) -> ClientApp:
    app = ClientApp(mods=[outbound_guard, secagg_mod])

    @app.train()
    def train(msg: Message, ctx: Context) -> Message:
        hospital = int(ctx.node_config["partition-id"])
        if hospital == failing:  # called in the masked-upload stage: after the key exchange
            raise RuntimeError("hospital lost power")
        _, config = legacy_request(msg, LAYOUT)
        evaluation = held_out(hospital) if config.get(Request.EVALUATE) else EvalStats.zeros(LABELS)
        public = {"hospital-id": f"hospital-{hospital}", "epsilon": 1.0}
        if declining or config.get(Request.EVALUATE_ONLY):  # as client/app/handlers.py does
            upload = CODEC.encode(np.zeros(SIZE), 0.0, float("nan"), evaluation)
            return legacy_fit_reply(msg, upload, CODEC, {**public, "declined": int(declining)})
        weight = WEIGHTS[hospital] / CODEC.max_weight
        upload = CODEC.encode(packed_delta(hospital), weight, 0.5, evaluation)
        return legacy_fit_reply(msg, upload, CODEC, {**public, "declined": 0})

    return app


class RecordingGrid:
    """Delegates to the real grid and keeps every reply the server receives."""

    def __init__(self, grid: Grid) -> None:
        self._grid, self.replies = grid, []

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def pull_messages(self, message_ids):  # what server/app/grid.py's send_and_receive calls
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


class KeepingStore(RunStore):
    """A run directory that also keeps what the rounds recorded, as objects."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.records: list[RoundRecord] = []
        self.evaluations: dict[int, EvalStats] = {}
        self.start({})

    def save_round(self, record, state, optimizer=None):  # type: ignore[no-untyped-def]
        self.records.append(record)
        return super().save_round(record, state, optimizer)

    def save_evaluation(self, server_round, stats):  # type: ignore[no-untyped-def]
        self.evaluations[server_round] = stats
        super().save_evaluation(server_round, stats)


@pytest.fixture(autouse=True)
def _members_folder(tmp_path, monkeypatch):
    """Flower's run_simulation passes an empty run config: the simulated hospitals keep
    their signing keys in a folder of this test's own, not under runs/ of the cwd."""
    monkeypatch.setenv(SIM_MEMBERS_ENV, str(tmp_path / "secagg-members"))


def run_round(failing: int | None, declining: bool = False, evaluate: bool = False):
    outcome = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, ctx: Context) -> None:
        recording = RecordingGrid(grid)
        run = RunConfig.from_run_config(
            {
                "num-rounds": 1,
                "server.fraction-evaluate": 1.0 if evaluate else 0.0,
                "server.min-hospitals": 4,
            }
        )
        initial = {k: torch.zeros(s) for k, s in SHAPES.items()}
        store = KeepingStore(Path(tempfile.mkdtemp(prefix="secagg-e2e-")))
        driver = SecAggRounds(recording, ctx, run, LAYOUT, "", 4)
        final = run_rounds(driver, run, store, initial)
        trained = [r for r in store.records if r.round > 0]
        outcome.update(
            final=final,
            replies=recording.replies,
            rounds=trained,
            evaluations=store.evaluations,
        )
        shutil.rmtree(store.root, ignore_errors=True)

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
    outcome = run_round(failing=None, evaluate=True)
    expected = fedavg([0, 1, 2, 3])
    for got, want in zip(outcome["final"].values(), expected, strict=True):
        np.testing.assert_allclose(got.numpy(), want, atol=1e-4)  # quantization error only
    arrays = [
        a.astype(np.float64).ravel()
        for a in received_arrays(outcome["replies"])
        if np.issubdtype(a.dtype, np.number)
    ]
    uploads = [a for a in arrays if a.size == CODEC.size]
    assert len(uploads) >= 8, "the recording did not capture every hospital's masked uploads"
    raw = [a for a in received_arrays(outcome["replies"]) if a.size == CODEC.size]
    assert all(a.dtype == np.uint32 for a in raw)  # compact masked uploads (client/app/secagg.py)
    # Everything the server received in the clear is in the hospital's table of fields.
    assert all(unlisted_fields(m) == [] for m in outcome["replies"])
    (record,) = outcome["rounds"]
    plain_update = 4 * SIZE  # float32
    assert sorted(h.hospital for h in record.hospitals) == [f"hospital-{i}" for i in range(4)]
    for h in record.hospitals:  # every stage's upload: keys, shares, masked vector, unmask
        assert 0 < h.key_bytes_up < 0.05 * plain_update, h
        assert plain_update < h.bytes_up - h.key_bytes_up <= 1.1 * plain_update, h
        assert h.num_examples == 0 and h.train_loss is None  # inside the sum only
    for hospital in range(4):
        delta, own = packed_delta(hospital), held_out(hospital).to_vector()
        for arr in uploads:  # chance correlations: ~1/sqrt(size)
            assert abs(np.corrcoef(arr[:SIZE], delta)[0, 1]) < 0.05
            assert abs(np.corrcoef(arr[SIZE + 2 :], own)[0, 1]) < 0.1
    # The evaluation of each model comes out summed over the hospitals, and only so.
    total = held_out(0) + held_out(1) + held_out(2) + held_out(3)
    assert sorted(outcome["evaluations"]) == [0, 1]  # the initial and the final model
    for stats in outcome["evaluations"].values():
        np.testing.assert_array_equal(stats.positives, total.positives)
        np.testing.assert_array_equal(stats.negatives, total.negatives)
        assert stats.metrics()["auroc"] == pytest.approx(total.metrics()["auroc"])
        # quantized in the masked vector: within 0.1 per hospital (shared_model/masked_upload.py)
        assert stats.loss_sum == pytest.approx(total.loss_sum, abs=0.1 * 4)


@pytest.mark.fault(
    "A hospital drops out of SecAgg+ after the key exchange",
    "The survivors unmask the sum; the server still sees no single update",
    "the survivors' updates",
)
def test_round_survives_a_hospital_dropping_out_after_the_key_exchange():
    outcome = run_round(failing=3)
    assert outcome["rounds"] and outcome["rounds"][0].failures == 1
    failed = [h for h in outcome["rounds"][0].hospitals if h.status == "failed"]
    assert len(failed) == 1 and "RuntimeError" in failed[0].reason
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
