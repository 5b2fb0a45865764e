"""A real deployment on loopback: TLS, authenticated hospitals, their own manifests.

Three hospitals, each with a manifest of PNG radiographs and reports written by the
test, join a TLS SuperLink with SuperNode authentication; a hospital whose key was never
registered, and a plaintext one, are refused meanwhile. `flwr run` submits 2 rounds
with DP and SecAgg+ on (the defaults). The outcome is judged from Flower's run status,
the run directory and each hospital's ledger, not from `flwr run`'s exit code (which is
0 even on failure).
"""

from __future__ import annotations

import json

import pytest

from shared_model.datasets.export import write_manifest
from tests.support.loopback import BIN
from tests.support.tracking import read_tracked_run

pytestmark = pytest.mark.slow
RECORDS = 160


@pytest.mark.fault(
    "An unregistered hospital key, and a plaintext SuperNode against the TLS SuperLink",
    "Refused; the hospital exits at once, saying what to register or fix",
    "the federation (no unauthenticated hospital joins; the run goes on)",
)
def test_three_hospitals_train_over_tls_and_strangers_are_refused(deployment):
    """`fedfusion server --config` and three `fedfusion hospital --config`, nothing else;
    meanwhile a hospital whose key was never registered, and one without TLS, try to join."""
    d = deployment
    names = ["hospital-0", "hospital-1", "hospital-2"]
    manifests = {n: write_manifest(d.tmp / f"{n}-data", i, RECORDS) for i, n in enumerate(names)}
    server = d.start(
        [
            str(BIN / "fedfusion"),
            "server",
            "--config",
            str(
                d.server_file(
                    names,
                    "num-rounds = 2\nserver.min-hospitals = 3\n"
                    "server.wait-for-hospitals-timeout = 120.0\n",
                )
            ),
        ],
        "fedfusion-server.log",
    )
    d.wait_registered(len(names))
    for name, manifest in manifests.items():
        cmd, marker = d.hospital(name, manifest)
        d.start(cmd, f"{name}.log", (marker,))

    cmd, marker = d.hospital("hospital-3")  # its key was never registered
    code, said = d.run_to_exit(cmd, "unregistered.log", markers=(marker,))
    assert code == 1, said  # exits by itself, and says why in plain words
    assert "refused to let this hospital join. Either its key is not registered" in said
    assert "flwr supernode register hospital-3.pub" in said
    cmd, marker = d.hospital("hospital-3", tls=False)  # plaintext against TLS
    code, said = d.run_to_exit(cmd, "plaintext.log", markers=(marker,))
    assert code == 1, said
    assert "WITHOUT TLS" in said and "stopped with exit code" in said
    assert "refused to let this hospital join" not in said  # no connection, let alone a key

    code = server.wait(300)
    log = (d.tmp / "fedfusion-server.log").read_text()
    out = next(iter(d.runs()), None)
    assert code == 0, log[-4000:]
    assert "round 2/2 (SecAgg+)" in log  # updates travelled masked (the default)
    assert out is not None and d.runs() == [out]
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
    tracked = read_tracked_run(out)  # logged by the deployed server, in its default store
    assert tracked.uri == f"sqlite:///{d.tmp / 'server-state' / 'runs' / 'mlflow.db'}"
    assert tracked.status == "FINISHED" and tracked.params["num-rounds"] == "2"
    # eval/loss: the macro AUROC of so few held-out patients may be unreadable under the
    # hospitals' held-out noise (no label clears twice the noise on its total)
    assert [s for s, _ in tracked.history["eval/loss"]] == [0, 1, 2]
    assert "model/global_model.safetensors" in tracked.artifacts
    for name in names:
        hospital_log = (d.tmp / f"{name}.log").read_text()
        assert "warm ClientApp starts ready" in hospital_log  # forked, not cold-started
        assert "warm start unavailable" not in hospital_log
        ledger = json.loads((d.tmp / f"{name}-state" / "privacy_ledger.json").read_text())
        assert [(e["mechanism"], e["round"]) for e in ledger["history"]] == [
            ("held-out-stats", 0),  # each evaluation of a model, noised and charged
            ("record-count", 1),
            ("dp-sgd", 1),
            ("held-out-stats", 1),
            ("dp-sgd", 2),
            ("held-out-stats", 2),
        ]
        assert 0 < ledger["held_out_epsilon"] <= 6.0  # its own cap: max-epsilon
        reported = [h["epsilon"] for h in rounds[2]["hospitals"] if h["hospital"] == name]
        assert 0 < ledger["epsilon"] <= 6.0  # the hospital's own cap, below the server's 8
        assert reported == [pytest.approx(ledger["epsilon"])]
        assert tracked.history[f"epsilon/{name}"][-1] == (2, pytest.approx(ledger["epsilon"]))
