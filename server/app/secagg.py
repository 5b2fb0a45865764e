"""SecAgg+ at the coordinator: Flower's SecAggPlusWorkflow with a delta-averaging strategy.

Flower's SecAgg+ exists only in its legacy API (``SecAggPlusWorkflow``, a
``LegacyContext`` and a legacy strategy), driven here one round at a time
(:class:`SecAggRounds`, a driver of ``server/app/rounds.py``). The workflow unmasks
only the sum of the hospitals' uploads and hands the strategy every hospital's
``FitRes`` with its parameters replaced by that one aggregate; no individual upload is
ever seen. Each upload (``shared_model/masked_upload.py``) holds a weighted delta, the
weight, the DP-released train loss and the held-out statistics of the model the
hospital received, so :class:`SecAggFedAvg` reads the weighted mean delta from the sum
(applied by the round core, ``shared_model/round_core.py``, as in plain rounds) and
learns the federation's evaluation of the previous model from the same sum.
What else a hospital sends in the clear is listed in ``client/app/outbound.py``.

The workflow's mask generator and secret sharing are fedfusion's
(``shared_model/secagg_primitives.py``), as at the hospitals.
"""

from __future__ import annotations

import dataclasses
import math
import time
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import Context
from flwr.common import (
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
from flwr.serverapp import Grid

from server.app.flwr_compat import LegacyRounds, SignedSecAggPlusWorkflow, install_secagg_primitives
from server.app.grid import MeteredGrid, metered
from server.app.registry import HospitalRegistry
from server.app.rounds import AllDeclinedError, RoundOutcome
from server.app.store import HospitalRound, RoundRecord
from server.app.strategy import FederationError, ShortRoundError, hospital_round, short_reason
from shared_model import secagg_primitives
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import QUANTIZATION_RANGE, UploadCodec
from shared_model.packing import WeightLayout
from shared_model.protocol import Reply, Request, Status
from shared_model.round_core import RoundMean, ServerStep, mean_of_sum, round_result

__all__ = ["SecAggFedAvg", "SecAggRounds", "TooFewHospitalsError"]

StateDict = dict[str, torch.Tensor]
Evaluations = dict[int, tuple[EvalStats, list[HospitalRound]]]

# The server's pairwise-mask keys, bound to the round's instruction (configure_fit).
MASKS = secagg_primitives.MaskBinding()
install_secagg_primitives(MASKS.shared_key)


class TooFewHospitalsError(FederationError):
    """Fewer hospitals are connected than a SecAgg+ exchange needs."""


class SecAggFedAvg(LegacyFedAvg):
    """FedAvg over SecAgg+-masked uploads; records each hospital's part in a round.

    Each upload also carries the held-out statistics of the model the hospital
    received, so round k's unmasked sum evaluates the model after round k - 1; a last
    exchange without training (``evaluate-only``) evaluates the final model.
    """

    def __init__(
        self,
        run: RunConfig,
        initial: list[np.ndarray],
        meter: MeteredGrid,
        *,
        plan: tuple[int, int, int] = (0, 0, 0),
        base_hash: str = "",
        layout_digest: str = "",
    ) -> None:
        self.meter = meter
        self.base_hash = base_hash
        self.layout_digest = layout_digest
        self.sample_size, self.shares, self.threshold = plan
        super().__init__(
            fraction_fit=run.server.fraction_train,
            fraction_evaluate=0.0,  # evaluation travels inside the masked uploads
            min_fit_clients=3,
            min_evaluate_clients=0,
            min_available_clients=max(3, run.server.min_hospitals),
            initial_parameters=ndarrays_to_parameters(initial),
            on_fit_config_fn=self._fit_config,
            accept_failures=True,
        )
        self.run = run
        self.evaluating = run.server.fraction_evaluate > 0
        self.codec = UploadCodec(
            initial[0].size, run.model.labels, run.secagg.clipping_range, run.secagg.max_weight
        )
        self.known: dict[int, str] = {}  # node id -> the hospital name it replied with
        self.begin(1)

    def begin(self, server_round: int) -> None:
        """Start round ``server_round``: forget the previous round's part of each hospital."""
        self.meter.reset()
        self.server_round = server_round
        self.hospitals: dict[int, HospitalRound] = {}
        self.sampled = 0
        self.failures = self.declined = 0
        self.mean: RoundMean | None = None  # the round's update, once the sum is read
        self.started = time.monotonic()
        self.aggregated = False  # set when the SecAgg+ round reached aggregate_fit
        self.evaluations: Evaluations = {}

    def evaluation_only(self, server_round: int) -> bool:
        """Whether ``server_round`` is the last exchange, which only evaluates."""
        return server_round > self.run.num_rounds

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        if self.evaluation_only(server_round):
            log(INFO, "[fedfusion] evaluating the final model (SecAgg+)")
        else:
            log(INFO, "[fedfusion] round %d/%d (SecAgg+)", server_round, self.run.num_rounds)
        return {
            Request.SERVER_ROUND: server_round,
            Request.PLANNED_ROUNDS: self.run.num_rounds,
            Request.PROXIMAL_MU: self.run.server.proximal_mu
            if self.run.server.strategy == "fedprox"
            else 0.0,
            Request.BASE_HASH: self.base_hash,
            Request.WEIGHTS_LAYOUT: self.layout_digest,
            Request.SECAGG_SCHEME: secagg_primitives.SCHEME,
            Request.EVALUATE: self.evaluating,
            Request.EVALUATE_ONLY: self.evaluation_only(server_round),
        }

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        """Sample hospitals as FedAvg does, remembering how many were asked.

        FedAvg sizes its sample from the hospitals registered at that moment, so first
        wait (up to server.wait-for-hospitals-timeout) for the planned number: a hospital
        registering a moment late would otherwise sit out the round (a race seen in CI).
        If one never comes, the round goes ahead with those present, as long as SecAgg+'s
        minimum is there; otherwise the run fails (FedAvg would wait a day), naming the
        hospitals missing, and `fedfusion server` resumes it after the last round saved.
        """
        timeout = self.run.server.wait_for_hospitals_timeout
        deadline = time.monotonic() + timeout
        planned = max(self.sample_size, self.min_available_clients)
        if (connected := client_manager.num_available()) < planned:
            log(
                INFO,
                "[fedfusion] waiting up to %gs for %d hospitals, %d connected "
                "(server.wait-for-hospitals-timeout)",
                timeout,
                planned,
                connected,
            )
        client_manager.wait_for(planned, int(timeout))
        # a hospital that stopped may be unregistered just after that wait returned
        while client_manager.num_available() < self.min_available_clients:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TooFewHospitalsError(self._too_few(server_round, client_manager, timeout))
            client_manager.wait_for(self.min_available_clients, max(int(left), 1))
        instructions = super().configure_fit(server_round, parameters, client_manager)
        self.sampled = len(instructions)
        # Every hospital gets the same instruction, and the masks are bound to it.
        digests = {
            secagg_primitives.round_binding(ins.config, ins.parameters.tensors)
            for _, ins in instructions
        }
        if len(digests) > 1:  # pragma: no cover - FedAvg sends one FitIns to all
            raise RuntimeError("SecAgg+ instructions differ between hospitals")
        MASKS.digest = next(iter(digests), None)
        return instructions

    def _too_few(self, server_round: int, client_manager, timeout: float) -> str:  # type: ignore[no-untyped-def]
        """Why exchange ``server_round`` cannot start: who is connected, who is missing."""
        connected = {proxy.node_id for proxy in client_manager.all().values()}
        present = {self.known.get(node, f"node-{node}") for node in connected}
        missing = sorted(set(self.known.values()) - present)
        what = (
            f"round {server_round}/{self.run.num_rounds}"
            if not self.evaluation_only(server_round)
            else "the final evaluation"
        )
        return (
            f"{what}: only {len(connected)} hospitals connected after {timeout:g}s "
            f"(server.wait-for-hospitals-timeout); SecAgg+ needs at least "
            f"{self.min_available_clients} (3, or server.min-hospitals if higher)"
            + (f"; not connected: {', '.join(missing)}" if missing else "")
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Read the unmasked sum: the sent model's evaluation and the round's mean update.

        The driver applies the update (shared_model/round_core.py); Flower is handed no
        model, as it keeps none between these one-round workflows.
        """
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
        for proxy, res in results:
            m = res.metrics
            declined = bool(m.get(Reply.DECLINED, 0))
            self.declined += declined
            name = str(m.get(Status.HOSPITAL_ID, f"node-{proxy.node_id}"))
            self.known[proxy.node_id] = name
            # the weight travels masked: the server learns only the sum
            reason = str(m.get(Status.REASON, ""))
            self.hospitals[proxy.node_id] = hospital_round(
                proxy.node_id, name, m, 0, reason, m.get(Status.PRIVACY_UNIT)
            )
            if declined:
                log(WARNING, "[fedfusion] round %d: %s %s", server_round, name, reason)
        if not results:
            raise self.short(f"round {server_round}: no hospital uploaded")
        total = self.codec.decode_sum(
            parameters_to_ndarrays(results[0][1].parameters)[0], len(results)
        )
        # How many hospitals the statistics pool is decided by the protocol's survivor set
        # (the uploads in this sum), never raised by a value a hospital wrote into it.
        pooled = total.evaluation.hospitals
        if math.isfinite(pooled) and pooled > len(results):
            log(
                WARNING,
                "[fedfusion] round %d: the uploads claim %g hospitals with held-out records; "
                "%d uploaded, so %d is recorded",
                server_round,
                pooled,
                len(results),
                len(results),
            )
            total = dataclasses.replace(
                total, evaluation=dataclasses.replace(total.evaluation, hospitals=len(results))
            )
        if self.evaluating:
            evaluated = [
                HospitalRound(hospital=h.hospital, node_id=h.node_id, status="evaluated")
                for h in self.hospitals.values()
            ]
            self.evaluations[server_round - 1] = (total.evaluation, evaluated)
        if self.evaluation_only(server_round):
            return None, {}
        if total.weight == 0 and not self.declined:
            reasons = sorted({short_reason(str(f)) for f in failures})
            raise self.short(
                f"round {server_round}: no hospital returned an update through SecAgg+ "
                f"({self.failures} failed): " + "; ".join(reasons)
            )
        self.mean = mean_of_sum(total)
        return None, {}

    def not_aggregated(self) -> ShortRoundError:
        """The error for a round Flower's workflow ended before aggregating.

        It does so when too few hospitals answer a stage in time.
        """
        return self.short(
            f"round {self.server_round}: SecAgg+ ended before aggregation: fewer than "
            f"{self.threshold} of {self.sampled} hospitals completed a stage (they "
            "failed, and Flower's log above holds their errors, or did not answer within "
            f"secagg.stage-timeout, {self.run.secagg.stage_timeout:g}s; local training "
            "runs inside a stage, so a slow model needs a longer timeout)"
        )

    def short(self, problem: str) -> ShortRoundError:
        """The error that ends a round with too few updates (server.short-round decides)."""
        record = self.round_record()
        record.skipped = True
        answered = sum(h.status in ("trained", "declined") for h in self.hospitals.values())
        record.failures = max(record.failures, self.sampled - answered)
        return ShortRoundError(problem, record)

    def _record_errors(self) -> None:
        """Hospitals whose reply in any stage of this round was an error, with its reason."""
        for node, reason in self.meter.errors.items():
            entry = self.hospitals.get(node)
            if entry is None or entry.status not in ("trained", "declined"):
                self.hospitals[node] = HospitalRound(
                    hospital=self.known.get(node, f"node-{node}"),
                    node_id=node,
                    status="failed",
                    reason=short_reason(reason),
                )

    def round_record(self) -> RoundRecord:
        """The record of the current round (its evaluation arrives with the next one)."""
        self._record_errors()
        self.meter.charge(self.hospitals.values())
        return RoundRecord(
            round=self.server_round,
            train_loss=self.mean.train_loss if self.mean is not None else None,
            eval_loss=None,
            eval_auroc=None,
            eval_metrics={},
            hospitals=sorted(self.hospitals.values(), key=lambda h: h.hospital),
            seconds=time.monotonic() - self.started,
            failures=self.failures,
            declined=self.declined,
            secagg_shares=self.shares,
            secagg_threshold=self.threshold,
        )


class SecAggRounds:
    """The SecAgg+ round driver (``server/app/rounds.py``): one workflow round at a time."""

    def __init__(
        self,
        grid: Grid,
        context: Context,
        run: RunConfig,
        layout: WeightLayout,
        base_hash: str,
        hospitals: int,
        known: dict[int, str] | None = None,
    ) -> None:
        """``hospitals`` connected; impossible share/threshold settings are refused here.

        ``known`` names hospitals by node id (from a resumed run's records).
        """
        sampled, shares, threshold = run.secagg_plan(hospitals)
        self.run, self.layout = run, layout
        self.grid = metered(grid)
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
        if shares < sampled:
            log(
                INFO,
                "[fedfusion] SecAgg+: each hospital shares its keys with %d of the %d (a "
                "random neighbour graph); a hospital with its own data takes part only if its "
                "file allows it (secagg-sparse-shares); secagg.num-shares = %d shares with all",
                shares - 1,
                sampled - 1,
                sampled,
            )
        self.strategy = SecAggFedAvg(
            run,
            [np.zeros(layout.size, layout.numpy_dtype)],
            self.grid,
            plan=(sampled, shares, threshold),
            base_hash=base_hash,
            layout_digest=layout.digest,
        )
        self.strategy.known.update(known or {})
        self.workflow_settings = {
            "num_shares": shares,
            "reconstruction_threshold": threshold,
            "clipping_range": run.secagg.clipping_range,
            "quantization_range": QUANTIZATION_RANGE,
            "max_weight": run.secagg.max_weight,
            "timeout": run.secagg.stage_timeout,
        }
        self.workflow = SignedSecAggPlusWorkflow(
            registry=HospitalRegistry.from_environment(), **self.workflow_settings
        )
        legacy = LegacyContext(
            context,
            config=ServerConfig(
                num_rounds=run.num_rounds + 1, round_timeout=run.server.round_timeout
            ),
            strategy=self.strategy,
        )
        self.rounds = LegacyRounds(self.grid, legacy)

    def baseline(self, state: StateDict) -> RoundOutcome | None:
        """Nothing: round 1's uploads evaluate the initial model."""
        return None

    def _exchange(self, server_round: int, state: StateDict) -> None:
        self.strategy.begin(server_round)
        self.rounds.run(
            self.workflow, server_round, ndarrays_to_parameters([self.layout.pack(state)])
        )

    def train_round(self, server_round: int, state: StateDict, step: ServerStep) -> RoundOutcome:
        """One SecAgg+ round: masked uploads, the sum, the mean update, the server's step.

        The new model is evaluated by the next exchange's uploads.
        """
        self._exchange(server_round, state)
        strategy = self.strategy
        if not strategy.aggregated:
            raise strategy.not_aggregated()
        record = strategy.round_record()
        result = round_result(state, strategy.mean, self.layout, step)
        outcome = RoundOutcome(record, result.state, dict(strategy.evaluations))
        trained = any(h.status == "trained" for h in record.hospitals)
        if strategy.declined and not trained and not strategy.failures:
            raise AllDeclinedError(
                f"round {server_round}: every sampled hospital declined (privacy budgets spent)",
                outcome,
            )
        return outcome

    def finish(self, state: StateDict) -> Evaluations:
        """One last exchange that evaluates the final model (evaluation on)."""
        try:
            if not self.strategy.evaluating:
                return {}
            try:
                self._exchange(self.run.num_rounds + 1, state)
            except TooFewHospitalsError as too_few:  # training is done; only this is lost
                log(WARNING, "[fedfusion] the final model could not be evaluated: %s", too_few)
                return {}
            if not self.strategy.aggregated:
                self.strategy._record_errors()
                reasons = sorted({h.reason for h in self.strategy.hospitals.values() if h.reason})
                log(
                    WARNING,
                    "[fedfusion] the final model could not be evaluated: too few hospitals "
                    "completed the SecAgg+ exchange%s",
                    (": " + "; ".join(reasons)) if reasons else "",
                )
            return dict(self.strategy.evaluations)
        finally:
            self.rounds.close()
