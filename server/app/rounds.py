"""One round driver for plain and SecAgg+ rounds, with the short-round policy in one place.

A run is: the baseline, training rounds ``first..num-rounds``, and a finish. Each mode
supplies a :class:`RoundDriver`: the plain one (``PlainRounds`` below) evaluates each
model right after its round; the SecAgg+ one (``server/app/secagg.py``) evaluates a
model inside the next round's masked uploads and finishes with one exchange that only
evaluates. :func:`run_rounds` records every round (its checkpoint first, then its
record), applies ``server.short-round`` when a round ends with too few updates, and
stops early when every hospital declines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from server.app.grid import metered
from server.app.report import format_evaluation_line
from server.app.store import (
    HospitalRound,
    RoundRecord,
    RunStore,
    evaluation_fields,
    fitting_state,
)
from server.app.strategy import (
    FederationError,
    HospitalFedAvg,
    ShortRoundError,
    packed_record,
    wait_for_hospitals,
)
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.round_core import ServerStep, round_result
from shared_model.server_optimizer import ServerOptimizer

__all__ = [
    "AllDeclinedError",
    "PlainRounds",
    "RoundDriver",
    "RoundOutcome",
    "after_short_round",
    "run_rounds",
]

StateDict = dict[str, torch.Tensor]


class AllDeclinedError(FederationError):
    """Every sampled hospital declined the round (budgets spent): the run stops early."""

    def __init__(self, message: str, outcome: RoundOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class RoundOutcome:
    """What one round did: its record, the model after it, and models it evaluated."""

    record: RoundRecord
    state: StateDict
    # round -> the summed held-out statistics of the model after that round
    evaluations: dict[int, tuple[EvalStats, list[HospitalRound]]] = field(default_factory=dict)


class RoundDriver(Protocol):
    """How rounds run in one mode (plain or SecAgg+)."""

    def baseline(self, state: StateDict) -> RoundOutcome | None:
        """Round 0, the initial model's evaluation, when the mode does it on its own."""

    def train_round(self, server_round: int, state: StateDict, step: ServerStep) -> RoundOutcome:
        """One training round from ``state``; ShortRoundError when too few updates came.

        ``step(state, average)`` is the new global model from the round's averaged one
        (the server optimizer's step); the driver applies it before evaluating the round's
        model, and only to a round that averaged an update.
        """

    def finish(self, state: StateDict) -> dict[int, tuple[EvalStats, list[HospitalRound]]]:
        """What the mode does after the last round (evaluations that arrive there)."""


def run_rounds(
    driver: RoundDriver,
    run: RunConfig,
    store: RunStore,
    state: StateDict,
    first_round: int = 0,
    progress: Callable[[RoundRecord], None] | None = None,
    optimizer: ServerOptimizer | None = None,
) -> StateDict:
    """Run rounds ``first_round..num-rounds`` (0: with the baseline); return the model.

    A resumed run passes the round after its checkpoint as ``first_round``, that
    checkpoint as ``state`` and the server optimizer restored from it. Without one, the
    server optimizer is fresh (from server.momentum and server.learning-rate).
    """
    show = progress or (lambda _record: None)
    if optimizer is None:
        optimizer = ServerOptimizer(run.server.momentum, run.server.learning_rate)
    initial = state
    if first_round == 0 and (baseline := driver.baseline(state)) is not None:
        _save(store, baseline, show)
    retries: dict[int, int] = {}
    server_round = max(first_round, 1)
    while server_round <= run.num_rounds:
        try:
            outcome = driver.train_round(server_round, state, optimizer.step)
        except ShortRoundError as short:
            state, server_round = after_short_round(short, run, store, retries, show, initial)
            continue
        except AllDeclinedError as declined:
            _save(store, declined.outcome, show)
            log(WARNING, "[fedfusion] %s; stopping the run early", declined)
            break
        state = outcome.state
        _save(store, outcome, show, optimizer.state())
        server_round += 1
    _record_evaluations(store, run.num_rounds + 1, driver.finish(state), state, show)
    return state


def _save(
    store: RunStore,
    outcome: RoundOutcome,
    show: Callable[[RoundRecord], None],
    optimizer: StateDict | None = None,
) -> None:
    """Record the models evaluated in this round, then the round itself."""
    _record_evaluations(store, outcome.record.round, outcome.evaluations, outcome.state, show)
    store.save_round(outcome.record, outcome.state, optimizer)
    for server_round, (stats, _) in outcome.evaluations.items():
        if server_round == outcome.record.round:
            store.save_evaluation(server_round, stats)
    show(outcome.record)


def _record_evaluations(
    store: RunStore,
    current: int,
    evaluations: dict[int, tuple[EvalStats, list[HospitalRound]]],
    state: StateDict,
    show: Callable[[RoundRecord], None],
) -> None:
    """Evaluations of models from earlier rounds: amend their records (round 0: create it).

    The evaluation of the round being recorded (plain rounds) is in its own record.
    """
    for server_round, (stats, hospitals) in sorted(evaluations.items()):
        if server_round >= current:
            continue
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
            store.save_round(baseline, state)
            show(baseline)
            continue
        store.amend_evaluation(server_round, metrics)
        log(INFO, "[fedfusion] %s", format_evaluation_line(server_round, metrics, stats))


def after_short_round(
    short: ShortRoundError,
    run: RunConfig,
    store: RunStore,
    retries: dict[int, int],
    progress: Callable[[RoundRecord], None],
    initial: StateDict,
) -> tuple[StateDict, int]:
    """Where the run goes on after a round with too few updates (server.short-round).

    ``retry`` runs the round again from the last checkpoint, up to server.round-retries
    times; ``skip`` records the round as skipped with the model unchanged; ``fail``, or
    retries used up, re-raises.
    """
    k = short.record.round
    policy = run.server.short_round
    latest = store.latest_checkpoint()  # None: no round saved yet
    state = initial if latest is None else fitting_state(latest[1], initial, store.root)
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
        short.record.skipped = True
        store.save_round(short.record, state)
        progress(short.record)
        return state, k + 1
    if policy == "retry":
        raise FederationError(
            f"{short} (round {k} was tried {retries.get(k, 0) + 1} times, "
            f"server.round-retries {run.server.round_retries})"
        ) from short
    raise short


class PlainRounds:
    """Rounds without SecAgg+: each update seen, checked and averaged by the strategy."""

    def __init__(self, grid: Grid, run: RunConfig, strategy: HospitalFedAvg) -> None:
        self.grid = metered(grid)
        self.run = run
        self.strategy = strategy
        assert strategy.layout is not None
        self.layout = strategy.layout
        wait_for_hospitals(
            self.grid, run.server.min_hospitals, run.server.wait_for_hospitals_timeout
        )

    def baseline(self, state: StateDict) -> RoundOutcome | None:
        """Round 0: every hospital evaluates the initial model (if evaluation is on)."""
        if self.run.server.fraction_evaluate <= 0:
            return None
        started = self._begin()
        evals = self._evaluate(0, packed_record(state, self.layout))
        return self._outcome(0, None, evals, started, state)

    def train_round(self, server_round: int, state: StateDict, step: ServerStep) -> RoundOutcome:
        """Send the model, check and average the updates (the round core), evaluate."""
        run, strategy = self.run, self.strategy
        started = self._begin()
        log(INFO, "[fedfusion] round %d/%d", server_round, run.num_rounds)
        wait_for_hospitals(
            self.grid, run.server.min_hospitals, run.server.wait_for_hospitals_timeout
        )
        arrays = packed_record(state, self.layout)
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), self.grid))
        replies = list(self.grid.send_and_receive(messages, timeout=run.server.round_timeout))
        mean = strategy.aggregate_update(server_round, replies)
        sampled = {m.metadata.dst_node_id for m in messages}
        strategy.record_silent(
            sampled - {r.metadata.src_node_id for r in replies}, run.server.round_timeout
        )
        lost = strategy.failures + strategy.rejected
        if sampled and lost > len(sampled) * (1.0 - run.server.min_update_fraction) + 1e-9:
            problem = (
                f"round {server_round}: {lost} of {len(sampled)} sampled hospitals failed, "
                f"did not answer or were refused, more than server.min-update-fraction "
                f"{run.server.min_update_fraction:g} allows: "
                + "; ".join(strategy.failure_reasons())
            )
            if run.server.short_round == "fail":
                raise FederationError(problem)
            strategy.skipped = True
            record = self._outcome(server_round, None, {}, started, state).record
            raise ShortRoundError(problem, record)
        if mean is None:
            if strategy.declined and not (strategy.failures or strategy.rejected):
                raise AllDeclinedError(
                    f"round {server_round}: every sampled hospital declined (privacy budgets "
                    "spent)",
                    self._outcome(server_round, None, {}, started, state),
                )
            raise FederationError(
                f"round {server_round}: no hospital returned an update "
                f"({strategy.failures} failed, {strategy.declined} declined, "
                f"{strategy.rejected} refused): " + "; ".join(strategy.failure_reasons())
            )
        result = round_result(state, mean, self.layout, step)
        evaluate = run.server.fraction_evaluate > 0
        evals = (
            self._evaluate(server_round, packed_record(result.state, self.layout))
            if evaluate
            else {}
        )
        return self._outcome(server_round, result.train_loss, evals, started, result.state)

    def finish(self, state: StateDict) -> dict[int, tuple[EvalStats, list[HospitalRound]]]:
        """Nothing: each model was evaluated in its own round."""
        return {}

    def _begin(self) -> float:
        self.strategy.begin_round()
        self.grid.reset()
        return time.monotonic()

    def _evaluate(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        strategy = self.strategy
        metrics = strategy.aggregate_evaluate(
            server_round,
            self.grid.send_and_receive(
                strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid),
                timeout=self.run.server.round_timeout,
            ),
        )
        return {k: float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)}

    def _outcome(
        self,
        server_round: int,
        train_loss: float | None,
        evals: dict[str, float],
        started: float,
        state: StateDict,
    ) -> RoundOutcome:
        strategy = self.strategy
        self.grid.charge(strategy.round_hospitals.values())
        record = RoundRecord(
            round=server_round,
            train_loss=train_loss,
            **evaluation_fields(evals),
            hospitals=sorted(strategy.round_hospitals.values(), key=lambda h: h.hospital),
            seconds=time.monotonic() - started,
            failures=strategy.failures,
            declined=strategy.declined,
            eval_failures=strategy.eval_failures,
            rejected=strategy.rejected,
            skipped=strategy.skipped,
        )
        evaluated = {}
        if strategy.evaluation is not None:
            evaluated[server_round] = (strategy.evaluation, [])
        return RoundOutcome(record, state, evaluated)
