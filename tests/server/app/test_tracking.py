"""Experiment tracking: what a run logs to MLflow, read back through MLflow's own API.

The runs here are written by the server's RunStore (no federation); the MLflow store is
a real SQLite store in the test's folder. The end-to-end runs (simulation killed and
resumed, the TLS deployment) check the same through real federations.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from server.app.store import HospitalRound, RoundRecord, RunStore, evaluation_fields
from server.app.tracking import (
    TRACKING_ENV,
    RunTracker,
    TrackingSettings,
    default_store,
    tracking_env,
)
from shared_model.config import RunConfig
from shared_model.processes import free_port
from shared_model.weights import initial_model, shared_state
from tests.support.runs import round_stats
from tests.support.tracking import read_tracked_run

ROOT = Path(__file__).resolve().parents[3]
NAMES = ["hospital-0", "hospital-1", "hospital-2"]


def _record(run: RunConfig, server_round: int, evaluated: bool = True) -> RoundRecord:
    stats = round_stats(run.model.labels, 0.5 + server_round, seed=server_round)
    fields = evaluation_fields(stats.metrics() if evaluated else {})
    return RoundRecord(
        round=server_round,
        train_loss=None if server_round == 0 else 1.0 / server_round,
        **fields,
        hospitals=[
            HospitalRound(
                hospital=name,
                node_id=i,
                status="trained" if server_round else "evaluated",
                epsilon=server_round + i / 10 if server_round else None,
                max_epsilon=8.0,
                # the first hospital noises its held-out statistics; the others send exact
                held_out_epsilon=server_round / 4 if server_round and i == 0 else None,
                privacy_unit="record" if i == 2 else "patient",
            )
            for i, name in enumerate(NAMES)
        ],
        seconds=2.0 + server_round,
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> tuple[Path, RunConfig, RunStore]:
    root = tmp_path / "runs" / "20261202-120000"
    run = RunConfig.from_run_config({"num-rounds": 3, "output-dir": str(root)})
    store = RunStore(root)
    store.start(run.to_run_config())
    return root, run, store


def _settings(root: Path, **env: str) -> TrackingSettings:
    settings = TrackingSettings.from_env(root, env)
    assert settings is not None
    return settings


def _finish_files(store: RunStore, run: RunConfig) -> None:
    state = shared_state(initial_model(run.model, run.seed))
    store.finish("completed", state)
    (store.root / "report.md").write_text("# report\n", "utf-8")
    (store.root / "training_curves.png").write_bytes(b"\x89PNG fake")


def test_a_finished_run_reads_back_through_mlflow(run_dir) -> None:
    root, run, store = run_dir
    settings = _settings(root)
    assert settings.uri == default_store(root) == f"sqlite:///{root.parent / 'mlflow.db'}"
    tracker = RunTracker(settings, root)
    tracker.start(run.to_run_config(), {"fedfusion.run-dir": str(root)})
    state = shared_state(initial_model(run.model, run.seed))
    for server_round in range(4):
        store.save_round(_record(run, server_round), state)
        tracker.sync(store.rounds)
    _finish_files(store, run)
    tracker.finish("completed", store.rounds)

    tracked = read_tracked_run(root)
    assert tracked.status == "FINISHED" and tracked.tags["fedfusion.status"] == "completed"
    assert tracked.name == root.name
    assert tracked.params == {k: str(v) for k, v in run.to_run_config().items()}
    rounds = json.loads((root / "metrics.json").read_text())["rounds"]
    assert tracked.history["eval/auroc"] == [(r["round"], r["eval_auroc"]) for r in rounds]
    assert tracked.history["train/loss"] == [(r, 1.0 / r) for r in (1, 2, 3)]
    for i, name in enumerate(NAMES):
        assert tracked.history[f"epsilon/{name}"] == [(r, r + i / 10) for r in (1, 2, 3)]
    assert tracked.history[f"held-out-epsilon/{NAMES[0]}"] == [(r, r / 4) for r in (1, 2, 3)]
    assert f"held-out-epsilon/{NAMES[1]}" not in tracked.history  # exact: no epsilon
    assert tracked.tags[f"fedfusion.privacy-unit.{NAMES[0]}"] == "patient"
    assert tracked.tags[f"fedfusion.privacy-unit.{NAMES[2]}"] == "record"
    label = run.model.labels[0]
    assert [s for s, _ in tracked.history[f"eval/auroc.{label}"]] == [0, 1, 2, 3]
    assert {
        "report.md",
        "metrics.json",
        "plots/training_curves.png",
        "model/global_model.safetensors",
    } <= set(tracked.artifacts)
    size = (root / "global_model.safetensors").stat().st_size
    assert tracked.artifacts["model/global_model.safetensors"] == size
    assert (root.parent / "mlartifacts").is_dir()  # beside the store, not in the cwd


def test_the_store_holds_nothing_the_run_directory_does_not(run_dir) -> None:
    """Every logged number is one of metrics.json's: the config, global metrics, epsilons."""
    root, run, store = run_dir
    tracker = RunTracker(_settings(root), root)
    tracker.start(run.to_run_config(), {})
    state = shared_state(initial_model(run.model, run.seed))
    for server_round in range(3):
        store.save_round(_record(run, server_round), state)
    tracker.sync(store.rounds)
    rounds = json.loads((root / "metrics.json").read_text())["rounds"]

    def numbers(value: Any) -> set[float]:
        if isinstance(value, dict):
            return set().union(*(numbers(v) for v in value.values())) if value else set()
        if isinstance(value, list):
            return set().union(*(numbers(v) for v in value)) if value else set()
        if isinstance(value, bool):
            return {float(value)}
        return {float(value)} if isinstance(value, int | float) else set()

    recorded = numbers(rounds) | {0.0, 1.0, 3.0}  # counts of the bookkeeping
    for name, points in read_tracked_run(root).history.items():
        for _, value in points:
            assert value in recorded, (name, value)


def test_a_restarted_server_continues_its_mlflow_run_each_round_logged_once(run_dir) -> None:
    root, run, store = run_dir
    state = shared_state(initial_model(run.model, run.seed))
    first = RunTracker(_settings(root), root)
    first.start(run.to_run_config(), {})
    for server_round in range(2):
        store.save_round(_record(run, server_round), state)
        first.sync(store.rounds)
    store.save_round(_record(run, 2), state)  # saved, then the server was killed (no sync)

    again = RunTracker(_settings(root), root)
    again.start(run.to_run_config(), {})
    assert again.run_id == first.run_id
    store.save_round(_record(run, 3), state)
    again.sync(store.rounds)
    again.sync(store.rounds)  # nothing new: nothing logged twice
    _finish_files(store, run)
    again.finish("completed", store.rounds)

    tracked = read_tracked_run(root)
    assert tracked.runs_in_experiment == 1 and tracked.status == "FINISHED"
    assert [s for s, _ in tracked.history["eval/auroc"]] == [0, 1, 2, 3]
    assert [s for s, _ in tracked.history["epsilon/hospital-1"]] == [1, 2, 3]


def test_an_evaluation_that_arrives_a_round_later_is_logged_when_it_does(run_dir) -> None:
    """With SecAgg+, round k's model is evaluated in round k+1's exchange."""
    root, run, store = run_dir
    state = shared_state(initial_model(run.model, run.seed))
    tracker = RunTracker(_settings(root), root)
    tracker.start(run.to_run_config(), {})
    store.save_round(_record(run, 0), state)
    store.save_round(_record(run, 1, evaluated=False), state)
    tracker.sync(store.rounds)
    assert [s for s, _ in read_tracked_run(root).history["eval/auroc"]] == [0]
    later = round_stats(run.model.labels, 2.0, seed=9).metrics()
    store.amend_evaluation(1, later)
    tracker.sync(store.rounds)
    tracked = read_tracked_run(root)
    assert tracked.history["eval/auroc"][1] == (1, pytest.approx(later["auroc"]))
    assert [s for s, _ in tracked.history["train/loss"]] == [1]


def _tracked_history(run_dir: tuple[Path, RunConfig, RunStore], record: RoundRecord) -> dict:
    """Track a run holding ``record``; the metric histories MLflow gives back."""
    root, run, store = run_dir
    store.save_round(record, shared_state(initial_model(run.model, run.seed)))
    tracker = RunTracker(_settings(root), root)
    tracker.start(run.to_run_config(), {})
    tracker.sync(store.rounds)
    assert tracker.active
    return read_tracked_run(root).history


def test_a_hospital_cannot_choose_what_its_metric_is_called(run_dir) -> None:
    run = run_dir[1]
    record = _record(run, 1)
    record.hospitals[0].hospital = "../../experiments/0 x\n"
    names = set(_tracked_history(run_dir, record))
    assert "epsilon/______experiments_0_x_" in names
    assert not [n for n in names if ".." in n]


def test_a_tracking_uri_and_off(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert TrackingSettings.from_env(run_dir, tracking_env(enabled=False)) is None
    given = TrackingSettings.from_env(run_dir, tracking_env("http://mlflow.example:5000", "x"))
    assert given == TrackingSettings("http://mlflow.example:5000", "x", "")
    assert TrackingSettings.from_env(run_dir, {}) == TrackingSettings(
        default_store(run_dir), "fedfusion", (tmp_path / "mlartifacts").as_uri()
    )


@pytest.mark.fault(
    "The MLflow tracking store unreachable, or failing mid-run",
    "A warning naming the store and the error; the run goes on untracked",
    "the run, its directory and every ledger (tracking never fails a federation)",
)
def test_an_unreachable_store_never_stops_the_run(run_dir, caplog, monkeypatch) -> None:
    root, run, store = run_dir
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = RunTracker(_settings(root, **{TRACKING_ENV: uri}), root)
    with caplog.at_level(logging.WARNING):
        tracker.start(run.to_run_config(), {})
        store.save_round(_record(run, 0), shared_state(initial_model(run.model, run.seed)))
        tracker.sync(store.rounds)
        tracker.finish("completed", store.rounds)
    assert not tracker.active and tracker.failed.startswith("start:")
    assert "experiment tracking" in caplog.text and "the run goes on untracked" in caplog.text
    assert not (root / "tracking.json").exists()


def test_a_store_failing_mid_run_stops_tracking_not_the_run(run_dir) -> None:
    from mlflow.tracking import MlflowClient

    root, run, store = run_dir

    class Flaky(MlflowClient):
        calls = 0

        def log_batch(self, *args: Any, **kwargs: Any) -> None:
            Flaky.calls += 1
            if Flaky.calls > 1:  # the params went through; the first round's metrics fail
                raise OSError("disk full")
            super().log_batch(*args, **kwargs)

    tracker = RunTracker(_settings(root), root, client_factory=lambda uri: Flaky(uri))
    tracker.start(run.to_run_config(), {})
    store.save_round(_record(run, 0), shared_state(initial_model(run.model, run.seed)))
    tracker.sync(store.rounds)
    tracker.finish("completed", store.rounds)
    assert tracker.failed == "logging a round: OSError: disk full"


def test_tracking_is_the_coordinators_alone() -> None:
    """The run config every hospital receives names no tracking; hospital code never logs."""
    assert not [k for k in RunConfig().to_run_config() if "track" in k or "mlflow" in k]
    for folder in ("client", "shared_model"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text("utf-8"))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                for name in names:
                    assert not name.startswith(("mlflow", "server")), (path, name)


def test_hospitals_cannot_hide_or_erase_each_others_epsilon(run_dir) -> None:
    """An empty name, or two names that sanitize alike, keep every hospital's epsilon."""
    run = run_dir[1]
    record = _record(run, 1)
    record.hospitals[0].hospital = "st.marys"
    record.hospitals[1].hospital = "st_marys"
    record.hospitals[2].hospital = ""
    history = _tracked_history(run_dir, record)
    assert history["epsilon/st_marys-node-0"] == [(1, 1.0)]
    assert history["epsilon/st_marys-node-1"] == [(1, 1.1)]
    assert history["epsilon/node-2"] == [(1, pytest.approx(1.2))]


def test_credentials_in_a_tracking_uri_stay_out_of_files_and_logs(run_dir, caplog) -> None:
    from server.app.tracking import redact

    uri = "https://user:S3cret@mlflow.internal:5000/?token=abc"
    assert "S3cret" not in redact(uri) and "abc" not in redact(uri)
    assert redact("sqlite:////data/mlflow.db") == "sqlite:////data/mlflow.db"
    root, run, _ = run_dir

    class Refusing:
        def __init__(self, uri: str) -> None:
            raise TimeoutError()  # an exception without a message

    tracker = RunTracker(_settings(root, **{TRACKING_ENV: uri}), root, client_factory=Refusing)
    with caplog.at_level(logging.WARNING):
        tracker.start(run.to_run_config(), {})
    assert tracker.failed == "start: TimeoutError" and not tracker.active
    assert "S3cret" not in caplog.text and "mlflow.internal" in caplog.text


def test_a_local_store_keeps_its_artifacts_beside_it_and_private(tmp_path, run_dir) -> None:
    root, run, _ = run_dir
    db = tmp_path / "elsewhere" / "mlflow.db"
    db.parent.mkdir()
    settings = _settings(root, **{TRACKING_ENV: f"sqlite:///{db}"})
    assert settings.artifacts == (db.parent / "mlartifacts").as_uri()  # never ./mlruns
    tracker = RunTracker(settings, root)
    tracker.start(run.to_run_config(), {})
    assert tracker.active
    assert db.stat().st_mode & 0o777 == 0o600
    assert (db.parent / "mlartifacts").stat().st_mode & 0o777 == 0o700
    assert json.loads((root / "tracking.json").read_text())["uri"] == f"sqlite:///{db}"
