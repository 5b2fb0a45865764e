"""The coordinator's Flower ServerApp: builds the strategy from config and runs the rounds."""

from __future__ import annotations

from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from server.app.report import format_evaluation_line, format_round_line, write_report
from server.app.secagg import run_secagg_rounds
from server.app.store import (
    HospitalRound,
    RoundRecord,
    RunDirError,
    RunStore,
    evaluation_fields,
)
from server.app.strategy import (
    FederationError,
    ShortRoundError,
    build_strategy,
    packed_record,
    run_federation,
    wait_for_hospitals,
)
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.packing import WeightLayout
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
    start = shared_state(model)
    layout = WeightLayout.of(start)  # the weights travel as one array: shared_model/packing.py
    initial = start
    resume = store.begin(flat, base_hash)  # a killed or failed run resumes where it stopped
    first_round = 0
    if resume is not None:
        start = _resumed_state(resume.state, start, store.root)
        first_round = resume.round + 1
        log(
            WARNING,
            "[fedfusion] resuming the run in %s (attempt %d) after round %d from its checkpoint; "
            "hospitals count any round they already began in full",
            store.root,
            resume.attempt,
            resume.round,
        )

    def progress(record: RoundRecord) -> None:
        log(INFO, "[fedfusion] %s", format_round_line(record.to_dict(), run.num_rounds))

    def rounds(state: dict[str, torch.Tensor], first: int) -> dict[str, torch.Tensor]:
        if run.secagg.enabled:
            return _secagg_run(grid, context, run, state, layout, base_hash, store, progress, first)
        strategy = build_strategy(run, base_hash, layout)
        done = run_federation(
            grid, run, strategy, packed_record(state, layout), store, progress, first_round=first
        )
        return layout.unpack_record(done)

    retries: dict[int, int] = {}
    try:
        while True:
            try:
                final = rounds(start, first_round)
                break
            except ShortRoundError as short:
                start, first_round = _after_short_round(
                    short, run, store, retries, progress, initial
                )
    except Exception as err:
        log(ERROR, "[fedfusion] run failed: %s", err)
        store.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
    trained_rounds = sum(r["round"] > 0 for r in store.rounds)
    status = "completed" if trained_rounds == run.num_rounds else "stopped-early"
    store.finish(status, final)
    report = write_report(store.root, flat)
    log(INFO, "[fedfusion] report: %s", report)


def _secagg_run(
    grid: Grid,
    context: Context,
    run: RunConfig,
    initial: dict[str, torch.Tensor],
    layout: WeightLayout,
    base_hash: str,
    store: RunStore,
    progress: Callable[[RoundRecord], None],
    first_round: int = 0,
) -> dict[str, torch.Tensor]:
    """Rounds in SecAgg+; each model's evaluation arrives inside the next round's sum.

    Round 1's uploads evaluate the initial model (recorded as round 0), and one last
    exchange evaluates the final model.
    """
    hospitals = wait_for_hospitals(
        grid, run.server.min_hospitals, run.server.wait_for_hospitals_timeout
    )
    run.secagg_plan(hospitals)  # refuse impossible settings before any round

    def on_round(record: RoundRecord, state: dict[str, torch.Tensor]) -> None:
        store.save_round(record, state)
        progress(record)

    def on_evaluation(server_round: int, stats: EvalStats, hospitals: list[HospitalRound]) -> None:
        metrics = stats.metrics()
        store.save_evaluation(server_round, stats)
        if server_round == 0 and not any(r["round"] == 0 for r in store.rounds):
            baseline = RoundRecord(
                round=0,
                train_loss=None,
                **evaluation_fields(metrics),
                hospitals=sorted(hospitals, key=lambda h: h.hospital),
                seconds=0.0,
            )
            store.save_round(baseline, initial)
            progress(baseline)
            return
        store.amend_evaluation(server_round, metrics)
        log(INFO, "[fedfusion] %s", format_evaluation_line(server_round, metrics, stats))

    last = run.num_rounds + (1 if run.server.fraction_evaluate > 0 else 0)
    if first_round > last:  # killed after its last exchange was saved
        return initial
    return run_secagg_rounds(
        grid,
        context,
        run,
        initial,
        base_hash,
        hospitals,
        on_round,
        on_evaluation,
        max(first_round, 1),
    )


def _after_short_round(
    short: ShortRoundError,
    run: RunConfig,
    store: RunStore,
    retries: dict[int, int],
    progress: Callable[[RoundRecord], None],
    initial: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], int]:
    """Where the run goes on after a round with too few updates (server.short-round).

    ``retry`` runs the round again from the last checkpoint, up to server.round-retries
    times; ``skip`` (SecAgg+: the plain loop skips by itself) records the round as
    skipped with the model unchanged; ``fail``, or retries used up, re-raises.
    """
    k = short.record.round
    policy = run.server.short_round
    latest = store.latest_checkpoint()  # None: no round saved yet (no round-0 evaluation)
    state = initial if latest is None else _resumed_state(latest[1], initial, store.root)
    if policy == "retry" and retries.get(k, 0) < run.server.round_retries:
        retries[k] = retries.get(k, 0) + 1
        store.note_retry(k, str(short))
        log(
            WARNING,
            "[fedfusion] %s; trying round %d again (%d of server.round-retries %d)",
            short,
            k,
            retries[k],
            run.server.round_retries,
        )
        return state, 1 if latest is None else latest[0] + 1
    if policy == "skip":
        log(WARNING, "[fedfusion] %s; round skipped, the model is unchanged", short)
        store.save_round(short.record, state)
        progress(short.record)
        return state, k + 1
    if policy == "retry":
        raise FederationError(
            f"{short} (round {k} was tried {retries.get(k, 0) + 1} times, "
            f"server.round-retries {run.server.round_retries})"
        ) from short
    raise short


def _resumed_state(
    saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], root: Path
) -> dict[str, torch.Tensor]:
    """The checkpoint's weights, refused unless they fit the model this run builds."""
    mismatch = [k for k in fresh if k not in saved or saved[k].shape != fresh[k].shape] + [
        k for k in saved if k not in fresh
    ]
    if mismatch:
        raise RunDirError(
            f"the checkpoint in {root} does not fit this model ({len(mismatch)} tensors differ, "
            f"e.g. {mismatch[0]}): it was written by another fedfusion version"
        )
    return {k: saved[k].to(fresh[k].dtype) for k in fresh}
