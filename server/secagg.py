"""SecAgg+ at the coordinator: Flower's SecAggPlusWorkflow with a delta-averaging strategy.

Flower's SecAgg+ exists only in its legacy API (``DefaultWorkflow`` with
``SecAggPlusWorkflow``, a ``LegacyContext`` and a legacy strategy). The workflow unmasks
only the weighted sum of the hospitals' uploads and hands the strategy every hospital's
``FitRes`` with its parameters replaced by that one aggregate; no individual update is
ever seen. Hospitals upload deltas, so :class:`SecAggFedAvg` adds the aggregate (the
example-weighted mean delta) to the global model. Metrics arrive in the clear.

The workflow's mask generator and secret sharing are fedfusion's
(``shared_model/secagg_primitives.py``), as at the hospitals.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
    EvaluateRes,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from server.checkpoint import HospitalRound, RoundRecord
from server.strategy import (
    ShortRoundError,
    as_float,
    finite_weighted_mean,
    hospital_round,
    short_reason,
)
from server.wire import MeteredGrid, metered
from shared_model import secagg_primitives
from shared_model.config import RunConfig
from shared_model.packing import WeightLayout

__all__ = ["SecAggFedAvg", "run_secagg_rounds"]

StateDict = dict[str, torch.Tensor]


def install_secagg_primitives() -> None:
    """Make Flower's SecAgg+ workflow use fedfusion's mask generator and secret sharing.

    Each hospital installs the same in its mod (``client/secagg.py``); see
    ``shared_model/secagg_primitives.py`` for why.
    """
    workflow = importlib.import_module(
        "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
    )

    # X25519 key agreement with raw 32-byte keys, instead of P-384 and PEM.
    workflow.bytes_to_private_key = secagg_primitives.bytes_to_private_key  # type: ignore[attr-defined]
    workflow.bytes_to_public_key = secagg_primitives.bytes_to_public_key  # type: ignore[attr-defined]
    workflow.generate_shared_key = secagg_primitives.generate_shared_key  # type: ignore[attr-defined]
    workflow.pseudo_rand_gen = secagg_primitives.pseudo_rand_gen  # type: ignore[attr-defined]
    workflow.combine_shares = secagg_primitives.combine_shares  # type: ignore[attr-defined]


install_secagg_primitives()


class SecAggFedAvg(LegacyFedAvg):
    """FedAvg over SecAgg+-masked deltas; records each hospital's part in each round."""

    def __init__(
        self,
        run: RunConfig,
        initial: list[np.ndarray],
        on_round: Callable[[RoundRecord, list[np.ndarray]], None],
        meter: MeteredGrid,
        plan: tuple[int, int, int] = (0, 0, 0),
        base_hash: str = "",
        layout_digest: str = "",
        offset: int = 0,
    ) -> None:
        self.meter = meter
        # Flower's workflow counts rounds from 1; a resumed run continues after ``offset``.
        self.offset = offset
        self.base_hash = base_hash
        self.layout_digest = layout_digest
        self.sample_size, self.shares, self.threshold = plan
        super().__init__(
            fraction_fit=run.server.fraction_train,
            fraction_evaluate=run.server.fraction_evaluate,
            min_fit_clients=3,
            min_evaluate_clients=1 if run.server.fraction_evaluate > 0 else 0,
            min_available_clients=max(3, run.server.min_hospitals),
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=self._fit_config,
            on_evaluate_config_fn=lambda _round: {
                "base-hash": self.base_hash,
                "weights-layout": self.layout_digest,
            },
            accept_failures=True,
        )
        self.run = run
        self.current = [np.array(a, copy=True) for a in initial]
        self.on_round = on_round
        self._reset()

    def _reset(self) -> None:
        self.meter.reset()
        self.hospitals: dict[int, HospitalRound] = {}
        self.sampled = 0
        self.failures = self.declined = self.eval_failures = 0
        self.train_loss: float | None = None
        self.started = time.monotonic()
        self.aggregated = False  # set when the SecAgg+ round reached aggregate_fit

    def _round(self, workflow_round: int) -> int:
        return workflow_round + self.offset if workflow_round > 0 else 0

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        server_round = self._round(server_round)
        self._reset()
        log(INFO, "[fedfusion] round %d/%d (SecAgg+)", server_round, self.run.num_rounds)
        return {
            "server-round": server_round,
            "planned-rounds": self.run.num_rounds,
            "proximal-mu": self.run.server.proximal_mu
            if self.run.server.strategy == "fedprox"
            else 0.0,
            "base-hash": self.base_hash,
            "weights-layout": self.layout_digest,
            "secagg-scheme": secagg_primitives.SCHEME,
        }

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        """Sample hospitals as FedAvg does, remembering how many were asked.

        FedAvg sizes its sample from the hospitals registered at that moment, so first
        wait (up to server.wait-for-hospitals-timeout) for the planned number: a hospital
        registering a moment late would otherwise sit out the round (a race seen in CI).
        If one never comes, the round goes ahead with those present.
        """
        if self.sample_size:
            client_manager.wait_for(
                self.sample_size, timeout=int(self.run.server.wait_for_hospitals_timeout)
            )
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = len(instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Apply the unmasked mean delta; hospitals that declined had weight 0 in it."""
        server_round = self._round(server_round)
        self.aggregated = True
        # Flower logs a failure per protocol stage a hospital misses; count hospitals.
        self.failures = max(self.sampled - len(results), 0)
        for failure in failures:
            log(
                WARNING,
                "[fedfusion] round %d: a hospital dropped out of SecAgg+: %s",
                server_round,
                short_reason(str(failure)),
            )
        weights, losses = 0, 0.0
        for proxy, res in results:
            m = res.metrics
            declined = bool(m.get("declined", 0))
            self.declined += declined
            self.hospitals[proxy.node_id] = hospital_round(
                proxy.node_id,
                str(m.get("hospital-id", f"node-{proxy.node_id}")),
                m,
                res.num_examples,
                str(m.get("reason", "")),
            )
            if declined:
                log(
                    WARNING,
                    "[fedfusion] round %d: %s %s",
                    server_round,
                    m.get("hospital-id"),
                    m.get("reason"),
                )
            elif math.isfinite(float(m.get("train-loss", math.nan))):
                weights += res.num_examples
                losses += res.num_examples * float(m["train-loss"])
        if weights == 0:  # nobody trained: the aggregate is all zeros, keep the model
            if not self.declined:
                reasons = sorted({short_reason(str(f)) for f in failures})
                raise self._short(
                    server_round,
                    f"round {server_round}: no hospital returned an update through SecAgg+ "
                    f"({self.failures} failed): " + "; ".join(reasons),
                )
            return None, {}
        self.train_loss = losses / weights
        mean_delta = parameters_to_ndarrays(results[0][1].parameters)
        self.current = [
            c + d.astype(c.dtype) for c, d in zip(self.current, mean_delta, strict=True)
        ]
        return ndarrays_to_parameters(self.current), {"train-loss": self.train_loss}

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average held-out metrics over hospitals (where defined) and record the round."""
        server_round = self._round(server_round)
        self.eval_failures = len(failures)
        for proxy, res in results:
            entry = self.hospitals.setdefault(
                proxy.node_id,
                HospitalRound(
                    hospital=str(res.metrics.get("hospital-id", f"node-{proxy.node_id}")),
                    node_id=proxy.node_id,
                    status="evaluated",
                ),
            )
            entry.eval_loss, entry.eval_auroc = res.loss, as_float(res.metrics.get("auroc"))
        metrics = finite_weighted_mean(
            (res.num_examples, {"loss": res.loss, **res.metrics}) for _, res in results
        )
        self._record(server_round, metrics)
        return metrics.get("loss"), metrics  # type: ignore[return-value]

    def evaluate(
        self, server_round: int, parameters: Parameters
    ) -> tuple[float, dict[str, Scalar]] | None:
        """No central data; records the round when there is no federated evaluation."""
        server_round = self._round(server_round)
        if server_round > 0 and self.run.server.fraction_evaluate == 0:
            self._record(server_round, {})
        return None

    def _short(self, server_round: int, problem: str) -> ShortRoundError:
        """The error that ends a round with too few updates (server.short-round decides)."""
        record = self._round_record(server_round, {})
        record.skipped = True
        answered = sum(h.status in ("trained", "declined") for h in self.hospitals.values())
        record.failures = max(record.failures, self.sampled - answered)
        return ShortRoundError(problem, record)

    def _record(self, server_round: int, evals: dict[str, float]) -> None:
        if server_round > 0 and not self.aggregated:
            # Flower's SecAgg+ workflow ends a round early, without aggregating, when too
            # few hospitals answer a stage in time; it would then evaluate the unchanged
            # model as if the round had trained.
            raise self._short(
                server_round,
                f"round {server_round}: SecAgg+ ended before aggregation: fewer than "
                f"{self.threshold} of {self.sampled} hospitals completed a stage (they "
                "failed, and Flower's log above holds their errors, or did not answer within "
                f"secagg.stage-timeout, {self.run.secagg.stage_timeout:g}s; local training "
                "runs inside a stage, so a slow model needs a longer timeout)",
            )
        self.on_round(self._round_record(server_round, evals), self.current)

    def _round_record(self, server_round: int, evals: dict[str, float]) -> RoundRecord:
        self.meter.charge(self.hospitals.values())
        return RoundRecord(
            round=server_round,
            train_loss=self.train_loss,
            eval_loss=evals.get("loss"),
            eval_auroc=evals.get("auroc"),
            eval_metrics=evals,
            hospitals=sorted(self.hospitals.values(), key=lambda h: h.hospital),
            seconds=time.monotonic() - self.started,
            failures=self.failures,
            declined=self.declined,
            eval_failures=self.eval_failures,
            secagg_shares=self.shares,
            secagg_threshold=self.threshold,
        )


def run_secagg_rounds(
    grid: Grid,
    context: Context,
    run: RunConfig,
    initial: StateDict,
    base_hash: str,
    hospitals: int,
    on_round: Callable[[RoundRecord, StateDict], None],
    first_round: int = 1,
) -> StateDict:
    """Rounds first_round..num-rounds with every update in SecAgg+; returns the final model.

    ``hospitals`` is how many are connected; an impossible share/threshold combination
    for the sample is refused here, before any round starts. A resumed run passes the
    round after its checkpoint as ``first_round`` and that checkpoint as ``initial``.
    """
    sampled, shares, threshold = run.secagg_plan(hospitals)
    layout = WeightLayout.of(initial)  # the weights travel (and are masked) as one array
    grid = metered(grid)
    log(
        INFO,
        "[fedfusion] SecAgg+: %d hospitals per round, %d shares, threshold %d, "
        "clipping range %g, max weight %g",
        sampled,
        shares,
        threshold,
        run.secagg.clipping_range,
        run.secagg.max_weight,
    )

    def to_state(arrays: list[np.ndarray]) -> StateDict:
        (flat,) = arrays
        return layout.unpack(flat)

    strategy = SecAggFedAvg(
        run,
        [layout.pack(initial)],
        lambda record, arrays: on_round(record, to_state(arrays)),
        grid,
        (sampled, shares, threshold),
        base_hash,
        layout.digest,
        first_round - 1,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=shares,
            reconstruction_threshold=threshold,
            clipping_range=run.secagg.clipping_range,
            max_weight=run.secagg.max_weight,
            timeout=run.secagg.stage_timeout,
        )
    )
    legacy = LegacyContext(
        context,
        config=ServerConfig(
            num_rounds=run.num_rounds - (first_round - 1), round_timeout=run.server.round_timeout
        ),
        strategy=strategy,
    )
    workflow(grid, legacy)
    return to_state(strategy.current)
