"""The server's sparse SecAgg+ plan, run through the real workflow and hospitals.

12 hospitals: each shares its keys with 9 (itself included), threshold 6, on the
neighbour graph Flower draws. The unmasked sum must still be every survivor's upload,
with a hospital dropping out after the key exchange.
"""

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.supercore.task_identity import TaskIdentity

from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from tests.support.loop_grid import loop_federation, secagg_round

LAYOUT = WeightLayout.of({"w": torch.zeros(50)})
NODES = [101 + i for i in range(12)]


@pytest.fixture(autouse=True)
def _task(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def federation(tmp_path):
    """12 simulated hospitals; node 101 + i uploads a delta of 0.001 * (i + 1) everywhere."""
    run = RunConfig.from_run_config(
        {
            "num-rounds": 1,
            "output-dir": str(tmp_path),
            "server.wait-for-hospitals-timeout": 5.0,
            "secagg.stage-timeout": 3.0,  # a silent hospital is waited for this long
            "secagg.sparse": True,
        }
    )
    codec = UploadCodec(LAYOUT.size, run.model.labels, run.secagg.clipping_range, 10_000.0)
    labels = run.model.labels

    def upload(node: int, config: dict) -> np.ndarray:
        rng = np.random.default_rng(node)
        stats = EvalStats.from_predictions(
            labels, rng.normal(size=(30, len(labels))), rng.random((30, len(labels))) < 0.3,
            rng.random(30),
        )  # fmt: skip
        return codec.encode(np.full(LAYOUT.size, 0.001 * (node - 100)), 0.5, 0.5, stats)

    return run, loop_federation(tmp_path, NODES, upload, codec, LAYOUT)


def key_lists(grid, wrapped) -> dict[int, int]:
    """How many hospitals' keys each hospital was sent at key sharing."""
    sizes: dict[int, int] = {}
    original = grid.app

    def app(msg, ctx):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        if configs.get(Key.STAGE) == Stage.SHARE_KEYS:
            sizes[msg.metadata.dst_node_id] = len([k for k in configs if k != Key.STAGE])
        return original(msg, ctx)

    grid.app = app
    wrapped()
    return sizes


def test_the_default_plan_at_12_hospitals_is_sparse_and_unmasks_every_upload(tmp_path):
    run, grid = federation(tmp_path)
    assert run.secagg_plan(12) == (12, 9, 6)
    holder = {}
    sizes = key_lists(grid, lambda: holder.update(driver=secagg_round(run, grid, LAYOUT)))
    driver = holder["driver"]
    assert set(sizes.values()) == {9} and len(sizes) == 12  # 9 of 12, not every hospital
    assert {h.status for h in driver.strategy.hospitals.values()} == {"trained"}
    np.testing.assert_allclose(driver.strategy.mean.delta, 0.001 * 6.5, atol=2e-6)


def test_a_sparse_round_survives_a_dropout_after_the_key_exchange(tmp_path):
    run, grid = federation(tmp_path)

    def drop(stage: str) -> None:
        if stage == Stage.COLLECT_MASKED_VECTORS:
            grid.silent.add(112)  # keys and key shares out, no upload

    grid.before_push = drop
    driver = secagg_round(run, grid, LAYOUT)
    trained = sorted(h.node_id for h in driver.strategy.hospitals.values() if h.status == "trained")
    assert trained == NODES[:-1]
    np.testing.assert_allclose(driver.strategy.mean.delta, 0.001 * 6.0, atol=2e-6)  # 1..11
