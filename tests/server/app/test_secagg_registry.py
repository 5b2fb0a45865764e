"""The coordinator's SecAgg+ rounds with the hospitals' real SecAgg+ code, in one process.

The ServerApp's driver (server/app/secagg.py: SignedSecAggPlusWorkflow and the strategy)
runs unchanged on a grid that calls each hospital's ClientApp directly
(tests/support/loop_grid.py). The hospitals upload known vectors.
"""

import logging

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.secaggplus_constants import Stage
from flwr.supercore.task_identity import TaskIdentity

from server.app.registry import REGISTRY_ENV
from server.app.secagg import SecAggRounds
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import UploadCodec
from shared_model.packing import WeightLayout
from tests.support.loop_grid import loop_federation, secagg_round

LAYOUT = WeightLayout.of({"w": torch.zeros(50)})
NODES = [101, 102, 103, 104]


@pytest.fixture(autouse=True)
def _task(monkeypatch):
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def federation(tmp_path, claimed_hospitals: dict[int, float] | None = None):
    """4 hospitals with real SecAgg+ mods; node 101+i uploads a delta of i + 1 everywhere."""
    run = RunConfig.from_run_config(
        {"num-rounds": 1, "output-dir": str(tmp_path), "server.wait-for-hospitals-timeout": 5.0}
    )
    codec = UploadCodec(LAYOUT.size, run.model.labels, run.secagg.clipping_range, 10_000.0)
    labels = run.model.labels

    def upload(node: int, config: dict) -> np.ndarray:
        rng = np.random.default_rng(node)
        n = 30
        stats = EvalStats.from_predictions(
            labels,
            rng.normal(size=(n, len(labels))),
            rng.random((n, len(labels))) < 0.3,
            rng.random(n),
        )
        stats.hospitals = (claimed_hospitals or {}).get(node, 1.0)
        return codec.encode(np.full(LAYOUT.size, 0.001 * (node - 100)), 0.5, 0.5, stats)

    return run, loop_federation(tmp_path, NODES, upload, codec, LAYOUT)


def registry(tmp_path, names: list[str]):
    """A server.toml registering ``names`` (the keys the simulated hospitals make)."""
    keys = ", ".join(f'"secagg-members/{n}.pub"' for n in names)
    (tmp_path / "server.toml").write_text(f"[server]\nhospitals = [{keys}]\n")


def one_round(run, grid) -> SecAggRounds:
    return secagg_round(run, grid, LAYOUT)


def test_an_honest_round_through_the_real_workflow_averages_every_upload(tmp_path):
    run, grid = federation(tmp_path)
    driver = one_round(run, grid)
    assert {h.status for h in driver.strategy.hospitals.values()} == {"trained"}
    # the mean of deltas 0.001 * (1, 2, 3, 4), each weighted 0.5
    np.testing.assert_allclose(driver.strategy.mean.delta, 0.0025, atol=2e-6)
    stages = {stage for _, stage in grid.delivered}
    assert "fedfusion_consistency" in stages and Stage.UNMASK in stages


@pytest.mark.fault(
    "The operator removes a hospital's key from server.toml while a SecAgg+ round runs",
    "That hospital gets no further message, the server's log names it; the round "
    "completes with the others (its masks removed as a dropout's)",
    "the round's mean over the other hospitals",
)
def test_a_hospital_whose_key_is_removed_mid_run_is_refused_and_the_round_completes(
    tmp_path, monkeypatch, caplog
):
    # Prepare: all four registered; hospital-3's key leaves server.toml after key sharing
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "server.toml"))
    registry(tmp_path, ["hospital-0", "hospital-1", "hospital-2", "hospital-3"])
    run, grid = federation(tmp_path)

    def revoke(stage: str) -> None:
        if stage == Stage.SHARE_KEYS:  # its key shares go out, then it is revoked
            registry(tmp_path, ["hospital-0", "hospital-1", "hospital-2"])

    grid.before_push = revoke
    # Execute
    with caplog.at_level(logging.WARNING):
        driver = one_round(run, grid)
    # Assert: no message reached it after the revocation; the others' mean was applied
    stages_104 = [stage for node, stage in grid.delivered if node == 104]
    assert stages_104 == [Stage.SETUP, Stage.SHARE_KEYS]
    assert "hospital-3 (node 104): its key is no longer registered" in caplog.text
    np.testing.assert_allclose(driver.strategy.mean.delta, 0.002, atol=2e-6)  # (1 + 2 + 3) / 3
    trained = sorted(h.node_id for h in driver.strategy.hospitals.values() if h.status == "trained")
    assert trained == [101, 102, 103]


@pytest.mark.fault(
    "A hospital whose key is not in server.toml answers SecAgg+ key setup",
    "Its keys are refused at key setup (named in the server's log); the round runs "
    "with the registered hospitals",
    "the round's mean over the registered hospitals",
)
def test_a_hospital_not_registered_is_left_out_from_key_setup(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(REGISTRY_ENV, str(tmp_path / "server.toml"))
    registry(tmp_path, ["hospital-0", "hospital-1", "hospital-2"])
    run, grid = federation(tmp_path)
    with caplog.at_level(logging.WARNING):
        driver = one_round(run, grid)
    assert "node 104: its keys carry no signature of a registered hospital" in caplog.text
    assert [stage for node, stage in grid.delivered if node == 104] == [Stage.SETUP]
    np.testing.assert_allclose(driver.strategy.mean.delta, 0.002, atol=2e-6)


@pytest.mark.fault(
    "A hospital writes a false hospital count into its masked held-out statistics",
    "The count recorded is capped by the uploads the server summed (a warning names the claim)",
    "the round's pooled statistics",
)
def test_the_hospital_count_of_pooled_statistics_cannot_be_inflated_by_an_upload(tmp_path):
    # one hospital writes 50 into the count slot of its held-out statistics
    run, grid = federation(tmp_path, claimed_hospitals={101: 50.0})
    driver = one_round(run, grid)
    ((stats, _),) = driver.strategy.evaluations.values()
    assert stats.hospitals == 4  # the uploads in the sum, not 53
