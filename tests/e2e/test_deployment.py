"""A real deployment on loopback: TLS, authenticated hospitals, their own manifests.

Three hospitals, each with a manifest of PNG radiographs and reports written by the
test, join a TLS SuperLink with SuperNode authentication. `flwr run` submits 2 rounds
with DP and SecAgg+ on (the defaults). The outcome is judged from Flower's run status,
the run directory and each hospital's ledger, not from `flwr run`'s exit code (which is
0 even on failure).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_model.datasets.iu_reports import load_reports
from shared_model.datasets.phantoms import hospital_acquisition, render_phantom
from tests.e2e.conftest import BIN

pytestmark = pytest.mark.slow
RECORDS = 160


def write_manifest(folder: Path, hospital: int) -> Path:
    """A hospital's own data: PNG files and a CSV manifest (real reports, phantom images)."""
    folder.mkdir(parents=True)
    reports = load_reports()[hospital * RECORDS : (hospital + 1) * RECORDS]
    rows = []
    for report in reports:
        image = render_phantom(
            report.labels,
            np.random.default_rng(int(report.uid)),
            64,
            hospital_acquisition(0, hospital),
        )
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{report.uid}.png")
        rows.append(
            {
                "image": f"{report.uid}.png",
                "report": report.text,
                "labels": "|".join(report.labels),
                "patient_id": report.uid,
            }
        )
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "report", "labels", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def test_three_hospitals_train_over_tls(deployment):
    """`fedfusion server --config` and three `fedfusion hospital --config`, nothing else."""
    d = deployment
    names = ["hospital-0", "hospital-1", "hospital-2"]
    server_toml = d.server_file(
        names,
        "num-rounds = 2\nserver.min-hospitals = 3\nserver.wait-for-hospitals-timeout = 120.0\n",
    )
    server = d.start(
        [str(BIN / "fedfusion"), "server", "--config", str(server_toml)], "fedfusion-server.log"
    )
    d.wait_registered(3)
    for i, name in enumerate(names):
        cmd, marker = d.hospital(name, write_manifest(d.tmp / f"{name}-data", i))
        d.start(cmd, f"{name}.log", (marker,))
    code = server.wait(300)
    log = (d.tmp / "fedfusion-server.log").read_text()
    assert code == 0, log[-4000:]
    assert "round 2/2 (SecAgg+)" in log  # updates travelled masked (the default)
    (out,) = (d.tmp / "server-state" / "runs").iterdir()
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed", info
    rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["failures"] == 0 and r["eval_failures"] == 0 and r["declined"] == 0
        assert sorted(h["hospital"] for h in r["hospitals"]) == names
    assert (out / "checkpoints" / "round-0002.safetensors").exists()
    assert (out / "global_model.safetensors").exists()
    assert (d.tmp / "server-state" / "superlink.db").exists()
    for name in names:
        ledger = json.loads((d.tmp / f"{name}-state" / "privacy_ledger.json").read_text())
        assert [e["round"] for e in ledger["history"]] == [1, 2]
        reported = [h["epsilon"] for h in rounds[2]["hospitals"] if h["hospital"] == name]
        assert 0 < ledger["epsilon"] <= 6.0  # the hospital's own cap, below the server's 8
        assert reported == [pytest.approx(ledger["epsilon"])]
