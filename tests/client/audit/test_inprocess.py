"""The utility benchmark's in-process federation trains what a Flower simulation trains."""

import numpy as np
import pytest
from safetensors.torch import load_file

from benchmarks.federation import simulate_run
from client.audit.inprocess import federate

pytestmark = pytest.mark.slow  # a Flower simulation and an in-process federation

# Deterministic without DP: no modality dropout (it draws from the process's global RNG).
RUN = {
    "privacy.enabled": False,
    "data.max-reports": 300,
    "train.local-epochs": 1,
    "train.modality-dropout": 0.0,
    "server.momentum": 0.5,
}


@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_it_lands_on_the_flower_simulations_model(tmp_path, secagg):
    # max-weight 500: each hospital's ~80 records weigh ~0.16 in the upload, so SecAgg+'s
    # stochastic quantization (2^22 levels over +-0.5) moves the mean update by < 1e-5
    run = {**RUN, "secagg.enabled": secagg, "secagg.max-weight": 500.0}
    ours = federate(run, 3, 2, tmp_path / "in-process")
    flower = simulate_run(tmp_path / "flower", 3, 2, run)
    mine = load_file(tmp_path / "in-process" / "global_model.safetensors")
    theirs = load_file(tmp_path / "flower" / "global_model.safetensors")
    assert mine.keys() == theirs.keys()
    moved = max(float((mine[k] - theirs[k]).abs().max()) for k in mine)
    assert moved < (1e-5 if secagg else 1e-6)
    by_round = {r["round"]: r["eval_metrics"]["auroc"] for r in flower}
    # Under SecAgg+ a score moved by 1e-5 may cross into the next of the 200 score bins:
    # one pair of ~16 positives x ~60 negatives moves AUROC by ~1e-3.
    for r in ours:
        close = 3e-3 if secagg else 1e-4
        assert np.isclose(r["eval_metrics"]["auroc"], by_round[r["round"]], atol=close)
