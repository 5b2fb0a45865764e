"""One small real federation through Flower's simulation engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from client.app import client_app
from client.app.secagg import secagg_mod
from server.app import server_app

pytestmark = pytest.mark.slow


def apps_with_run_config(run_config: dict[str, Any]) -> tuple[ServerApp, ClientApp]:
    """The project's apps, with a run config (run_simulation passes an empty one)."""

    def inject(msg: Any, ctx: Context, call_next: Any) -> Any:
        # A ClientApp's run_config is read-only: hand on a context that shares its state.
        return call_next(
            msg,
            Context(
                run_id=ctx.run_id,
                node_id=ctx.node_id,
                node_config=ctx.node_config,
                state=ctx.state,
                run_config={**ctx.run_config, **run_config},
            ),
        )

    clients = ClientApp(mods=[inject, secagg_mod])
    clients.train()(client_app.train)
    clients.evaluate()(client_app.evaluate)
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, ctx: Context) -> None:
        ctx.run_config.update(run_config)
        server_app.main(grid, ctx)

    return server, clients


def test_two_hospitals_two_rounds_learn_under_dp(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_config = {
        "num-rounds": 2,
        "output-dir": str(out),
        "data.max-reports": 2400,
        "server.min-hospitals": 2,
        "secagg.enabled": False,  # the plain path; SecAgg+ needs 3 hospitals (test_secagg.py)
        # The report-labelling task, on which two DP rounds learn measurably: this checks
        # that training under DP works end to end, not how hard the default task is.
        "data.text-source": "report",
        # Two rounds are all warm-up under the default schedule (1/3 and 2/3 of the rate):
        # the full rate, so that the check is on DP training, not on the schedule.
        "train.lr-schedule": "constant",
    }
    server, clients = apps_with_run_config(run_config)
    run_simulation(
        server_app=server,
        client_app=clients,
        num_supernodes=2,
        backend_config={"client_resources": {"num_cpus": 1}},
    )

    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed", info
    baseline, *rounds = json.loads((out / "metrics.json").read_text())["rounds"]
    assert baseline["round"] == 0 and baseline["train_loss"] is None
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["failures"] == 0 and r["declined"] == 0
        assert len(r["hospitals"]) == 2
        for h in r["hospitals"]:
            assert h["status"] == "trained"
            assert h["epsilon"] is not None and 0 < h["epsilon"] <= 8.0 + 1e-6
    # epsilon is cumulative at every hospital
    eps: dict[str, list[float]] = {h["hospital"]: [] for h in rounds[0]["hospitals"]}
    for r in rounds:
        for h in r["hospitals"]:
            eps[h["hospital"]].append(h["epsilon"])
    assert all(e[1] > e[0] for e in eps.values()), eps
    # the model learned: the trained global model ranks held-out records better than the
    # initial one. (Not its held-out loss: the first large-batch rounds with server
    # momentum move the imbalance-weighted loss's calibration, so it can rise in round 1
    # before it falls, as AUROC already climbs.)
    assert rounds[-1]["eval_auroc"] > baseline["eval_auroc"] + 0.05
    assert (out / "global_model.safetensors").exists()
    assert (out / "checkpoints" / "round-0002.safetensors").exists()
    assert (out / "report.md").exists()
    # each hospital's ledger agrees with what the server was told
    for name, series in eps.items():
        ledger = json.loads((out / "hospitals" / name / "privacy_ledger.json").read_text())
        assert ledger["epsilon"] == pytest.approx(series[-1])
        assert [(e["mechanism"], e["round"]) for e in ledger["history"]] == [
            ("record-count", 1),
            ("dp-sgd", 1),
            ("dp-sgd", 2),
        ]
