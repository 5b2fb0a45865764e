"""The coordinator's Flower ServerApp: the run's record, the right round driver, the report.

The rounds themselves are ``server/app/rounds.py``'s, with the plain driver there or the
SecAgg+ one (``server/app/secagg.py``); this module opens the run directory (resuming a
killed or failed run after its last complete round), picks the driver, and writes the
report when the run ends.
"""

from __future__ import annotations

from importlib.metadata import version
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.app.report import format_round_line, write_report
from server.app.rounds import PlainRounds, RoundDriver, run_rounds
from server.app.secagg import SecAggRounds
from server.app.store import RoundRecord, RunStore, fitting_state, restore_optimizer
from server.app.strategy import build_strategy, wait_for_hospitals
from server.app.tracking import RunTracker, TrackingSettings, redact
from shared_model.config import RunConfig
from shared_model.packing import WeightLayout
from shared_model.server_optimizer import ServerOptimizer
from shared_model.weights import base_fingerprint, initial_model, shared_state

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run config; write checkpoints and a report."""
    run = RunConfig.from_run_config(context.run_config)
    store = RunStore(Path(run.output_dir).expanduser().resolve())
    flat = run.to_run_config()
    model = initial_model(run.model, run.seed)
    # Only trainable parameters travel; hospitals check their frozen rest by this hash.
    base_hash = base_fingerprint(model)
    state = shared_state(model)
    layout = WeightLayout.of(state)  # the weights travel as one array: shared_model/packing.py
    resume = store.begin(flat, base_hash)  # a killed or failed run resumes where it stopped
    first_round = 0
    optimizer = ServerOptimizer(run.server.momentum, run.server.learning_rate)
    if resume is not None:
        state = fitting_state(resume.state, state, store.root)
        restore_optimizer(optimizer, resume.optimizer, state)
        first_round = resume.round + 1
        log(
            WARNING,
            "[fedfusion] resuming the run in %s (attempt %d) after round %d from its checkpoint; "
            "hospitals count any round they already began in full",
            store.root,
            resume.attempt,
            resume.round,
        )

    tracker = _tracker(store.root, flat)

    def progress(record: RoundRecord) -> None:
        log(INFO, "[fedfusion] %s", format_round_line(record.to_dict(), run.num_rounds))
        if tracker is not None:
            tracker.sync(store.rounds)

    try:
        driver = _driver(grid, context, run, layout, base_hash, store.rounds)
        final = run_rounds(driver, run, store, state, first_round, progress, optimizer)
    except Exception as err:
        log(ERROR, "[fedfusion] run failed: %s", err)
        store.finish("failed", error=f"{type(err).__name__}: {err}")
        if tracker is not None:
            tracker.finish("failed", store.rounds)
        raise
    trained_rounds = sum(r["round"] > 0 for r in store.rounds)
    status = "completed" if trained_rounds == run.num_rounds else "stopped-early"
    store.finish(status, final)
    report = write_report(store.root, flat)
    log(INFO, "[fedfusion] report: %s", report)
    if tracker is not None:
        tracker.finish(status, store.rounds)
        if tracker.active:
            uri, run_id = redact(tracker.settings.uri), tracker.run_id
            log(INFO, "[fedfusion] tracked in %s (MLflow run %s)", uri, run_id)


def _tracker(root: Path, flat: dict[str, object]) -> RunTracker | None:
    """The run's MLflow logger as the coordinator's environment sets it (None: off)."""
    settings = TrackingSettings.from_env(root)
    if settings is None:
        return None
    tracker = RunTracker(settings, root)
    tracker.start(
        flat,
        {
            "fedfusion.version": version("fedfusion"),
            "flwr.version": version("flwr"),
            "fedfusion.run-dir": str(root),
        },
    )
    return tracker


def _driver(
    grid: Grid,
    context: Context,
    run: RunConfig,
    layout: WeightLayout,
    base_hash: str,
    rounds: list[dict[str, Any]],
) -> RoundDriver:
    """Plain rounds, or SecAgg+ rounds sized to the hospitals connected.

    ``rounds``, the records so far (a resumed run's), name the hospitals by node id.
    """
    if not run.secagg.enabled:
        return PlainRounds(grid, run, build_strategy(run, base_hash, layout))
    hospitals = wait_for_hospitals(
        grid, run.server.min_hospitals, run.server.wait_for_hospitals_timeout
    )
    known = {
        h["node_id"]: h["hospital"] for r in rounds for h in r["hospitals"] if h.get("node_id")
    }
    return SecAggRounds(grid, context, run, layout, base_hash, hospitals, known)
