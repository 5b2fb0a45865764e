"""Aggregation at the coordinator without SecAgg+: each update seen, checked, averaged.

:class:`HospitalFedAvg` is Flower's FedAvg (its sampling and messages) plus what a
hospital federation needs: replies from hospitals that declined for their privacy
budget are set aside (and logged as declines, not failures), every update is checked
before it is averaged (``server/app/validation.py``), every hospital's part in a round
is recorded, and the held-out statistics the hospitals share are summed. The averaging
itself is the round core's (``shared_model/round_core.py``), as under SecAgg+. FedProx is
the same strategy with a proximal weight sent to the hospitals, which apply it after
each DP step. The rounds are driven by ``server/app/rounds.py``.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Mapping
from logging import WARNING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum

from server.app.store import HospitalRound, RoundRecord
from server.app.validation import update_problem
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.packing import PACKED_KEY, WeightLayout
from shared_model.protocol import (
    ARRAYS,
    EVALUATION,
    EVALUATION_STATISTICS,
    HOSPITAL,
    METRICS,
    Reply,
    Request,
    Status,
)
from shared_model.round_core import (
    HospitalUpdate,
    RoundMean,
    finite_weighted_mean,
    mean_of_model,
    mean_of_updates,
)

__all__ = [
    "FederationError",
    "HospitalFedAvg",
    "ShortRoundError",
    "nan_aware_weighted_mean",
]


class FederationError(RuntimeError):
    """A round could not complete; the message says which and why."""


class ShortRoundError(FederationError):
    """A round ended with too few updates; ``record`` is what it did (not saved)."""

    def __init__(self, message: str, record: RoundRecord) -> None:
        super().__init__(message)
        self.record = record


def hospital_round(
    node: int,
    name: str,
    metrics: Mapping[str, object],
    num_examples: int,
    reason: str,
    unit: object = None,
) -> HospitalRound:
    """A hospital's train reply (either record format) as the server records it.

    ``unit``: whom its epsilon protects, as it says (patient or record; anything else is
    not recorded).
    """
    return HospitalRound(
        hospital=name,
        node_id=node,
        status="declined" if metrics.get(Reply.DECLINED, 0) else "trained",
        num_examples=num_examples,
        train_loss=as_float(metrics.get(Reply.TRAIN_LOSS)),
        epsilon=as_float(metrics.get(Reply.EPSILON)),
        max_epsilon=as_float(metrics.get(Reply.MAX_EPSILON)),
        delta=as_float(metrics.get(Reply.DELTA)),
        held_out_epsilon=as_float(metrics.get(Reply.HELD_OUT_EPSILON)),
        max_held_out_epsilon=as_float(metrics.get(Reply.MAX_HELD_OUT_EPSILON)),
        privacy_unit=unit if unit in ("patient", "record") else None,
        reason=reason,
        noise_multiplier=as_float(metrics.get(Reply.NOISE_MULTIPLIER)),
        sample_rate=as_float(metrics.get(Reply.SAMPLE_RATE)),
        steps=int(steps) if isinstance(steps := metrics.get(Reply.STEPS), int | float) else None,
    )


def nan_aware_weighted_mean(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of each metric over the replies where it is a finite number."""
    rows = []
    for record in records:
        metrics = dict(next(iter(record.metric_records.values())))
        weight = float(metrics.pop(weight_key))  # type: ignore[arg-type]
        rows.append((weight, metrics))
    out: dict[str, float | int] = {weight_key: int(sum(w for w, _ in rows))}
    out.update(finite_weighted_mean(rows))
    return MetricRecord(out)


def short_reason(reason: str) -> str:
    """The original exception's message from a Flower error reply, without tracebacks.

    In simulation the reason is a Ray error wrapping the whole remote traceback; in
    deployment it is ``<class 'ValueError'>:<'message'>``. Operators need the message.
    """
    wrapped = re.search(r"Message: (.*?)'>\s*$", reason, re.S)
    if wrapped:
        return wrapped.group(1).strip().splitlines()[0][:500]
    plain = re.match(r"<class '([\w.]+)'>:<'(.*)'>\s*$", reason, re.S)
    if plain:
        message = plain.group(2).strip().splitlines()
        return f"{plain.group(1).rsplit('.', 1)[-1]}: {message[0] if message else ''}"[:500]
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "no reason given")[:500]


def _hospital_update(msg: Message) -> HospitalUpdate:
    """A checked train reply's packed weights, released record count and train loss."""
    metrics = msg.content.metric_records.get(METRICS, MetricRecord())
    return HospitalUpdate(
        weights=msg.content[ARRAYS][PACKED_KEY].numpy(),
        num_examples=as_float(metrics.get(Reply.NUM_EXAMPLES)) or 0.0,
        train_loss=as_float(metrics.get(Reply.TRAIN_LOSS)),
    )


def _hospital_name(msg: Message) -> str:
    if HOSPITAL in msg.content.config_records:
        return str(msg.content[HOSPITAL].get(Status.HOSPITAL_ID, msg.metadata.src_node_id))
    return f"node-{msg.metadata.src_node_id}"


def robust_aggregator(name: str, trim_fraction: float, byzantine: int) -> FedAvg | None:
    """Flower's strategy whose aggregation step ``server.aggregator`` names; None for mean."""
    fn = nan_aware_weighted_mean
    if name == "median":
        return FedMedian(train_metrics_aggr_fn=fn)
    if name == "trimmed-mean":
        return FedTrimmedAvg(beta=trim_fraction, train_metrics_aggr_fn=fn)
    if name == "krum":
        return Krum(num_malicious_nodes=byzantine, train_metrics_aggr_fn=fn)
    if name != "mean":
        raise ValueError(f"unknown aggregator {name!r}")
    return None


class HospitalFedAvg(FedAvg):
    """Weighted FedAvg over the hospitals that trained; declines are not failures."""

    def __init__(
        self,
        *,
        proximal_mu: float = 0.0,
        planned_rounds: int,
        base_hash: str = "",
        layout: WeightLayout | None = None,
        max_update_norm: float = 0.0,
        max_examples: float = 10_000.0,
        aggregator: str = "mean",
        trim_fraction: float = 0.2,
        byzantine_hospitals: int = 1,
        labels: tuple[str, ...] = (),
        **kwargs: object,
    ) -> None:
        super().__init__(
            train_metrics_aggr_fn=nan_aware_weighted_mean,
            evaluate_metrics_aggr_fn=nan_aware_weighted_mean,
            **kwargs,  # type: ignore[arg-type]
        )
        self.proximal_mu = proximal_mu
        self.labels = labels
        self.planned_rounds = planned_rounds
        self.base_hash = base_hash
        self.layout = layout
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples  # secagg.max-weight: the bound on a hospital's N̂
        self.aggregator = aggregator
        self.byzantine_hospitals = byzantine_hospitals
        self._robust = robust_aggregator(aggregator, trim_fraction, byzantine_hospitals)
        self._sent: np.ndarray | None = None  # this round's packed global weights
        self.round_hospitals: dict[int, HospitalRound] = {}
        self.known: dict[int, str] = {}  # node id -> the hospital name it replied with
        self.failures = 0
        self.declined = 0
        self.eval_failures = 0
        self.rejected = 0
        self.withheld = 0  # hospitals that kept their evaluation (share-evaluation = false)
        self.evaluation: EvalStats | None = None  # the last evaluation's summed statistics
        self.skipped = False  # the round ended with too few updates and changed nothing

    def begin_round(self) -> None:
        """Forget the previous round's per-hospital record."""
        self.round_hospitals, self.failures, self.declined, self.eval_failures = {}, 0, 0, 0
        self.rejected, self.skipped, self.withheld, self.evaluation = 0, False, 0, None

    def _record_failure(self, node: int, reason: str) -> None:
        entry = self.round_hospitals.get(node)
        if entry is None:  # named as in an earlier reply: a failure carries no name
            name = self.known.get(node, f"node-{node}")
            self.round_hospitals[node] = HospitalRound(
                hospital=name, node_id=node, status="failed", reason=reason
            )
        else:
            entry.status, entry.reason = "failed", reason

    def record_silent(self, nodes: Iterable[int], timeout: float) -> None:
        """Sampled hospitals that sent no reply at all within the round's timeout."""
        for node in sorted(nodes):
            self.failures += 1
            self._record_failure(node, f"no reply within server.round-timeout ({timeout:g}s)")
            log(WARNING, "[fedfusion] node %d sent no reply within %gs", node, timeout)

    def failure_reasons(self) -> list[str]:
        """The distinct reasons hospitals failed this round, for error messages."""
        bad = {"failed", "rejected"}
        return sorted({h.reason for h in self.round_hospitals.values() if h.status in bad})

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model's trainable part with this round's settings."""
        config[Request.PLANNED_ROUNDS] = self.planned_rounds
        config[Request.PROXIMAL_MU] = self.proximal_mu
        config[Request.BASE_HASH] = self.base_hash
        if self.layout is not None:
            config[Request.WEIGHTS_LAYOUT] = self.layout.digest
        self._sent = arrays[PACKED_KEY].numpy() if PACKED_KEY in arrays else None
        return super().configure_train(server_round, arrays, config, grid)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model's trainable part to evaluate."""
        config[Request.BASE_HASH] = self.base_hash
        if self.layout is not None:
            config[Request.WEIGHTS_LAYOUT] = self.layout.digest
        return super().configure_evaluate(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Not used: these rounds aggregate through :meth:`aggregate_update`.

        Flower's own averaging would skip the checks and the declines set aside there.
        """
        raise NotImplementedError("HospitalFedAvg aggregates through aggregate_update")

    def aggregate_update(self, server_round: int, replies: Iterable[Message]) -> RoundMean | None:
        """Record every hospital's outcome, set declines and refusals aside, average the rest.

        The averaging is the round core's (shared_model/round_core.py): each update weighed
        by its released record count, or ``server.aggregator``'s robust aggregate. None
        when no update is left.
        """
        trained: list[Message] = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                self.failures += 1
                self._record_failure(node, short_reason(msg.error.reason))
                continue
            metrics = msg.content.metric_records.get(METRICS, MetricRecord())
            status = msg.content[HOSPITAL] if HOSPITAL in msg.content.config_records else {}
            entry = hospital_round(
                node,
                _hospital_name(msg),
                metrics,
                as_count(metrics.get(Reply.NUM_EXAMPLES)),
                str(status.get(Status.REASON, "")),
                status.get(Status.PRIVACY_UNIT),
            )
            self.round_hospitals[node] = entry
            self.known[node] = entry.hospital
            if entry.status == "declined":
                self.declined += 1
                log(
                    WARNING,
                    "[fedfusion] round %d: %s %s",
                    server_round,
                    entry.hospital,
                    entry.reason,
                )
            elif problem := self._update_problem(server_round, msg, status):
                self.rejected += 1
                entry.status, entry.reason = "rejected", problem
                log(
                    WARNING,
                    "[fedfusion] round %d: refused the update of %s (node %d): %s",
                    server_round,
                    entry.hospital,
                    node,
                    problem,
                )
            else:
                trained.append(msg)
        for entry in self.round_hospitals.values():
            if entry.status == "failed":
                log(
                    WARNING,
                    "[fedfusion] round %d: node %d failed: %s",
                    server_round,
                    entry.node_id,
                    entry.reason,
                )
        if not trained:
            return None
        if self._sent is None:
            raise RuntimeError("updates to aggregate, but no packed model was sent this round")
        updates = [_hospital_update(msg) for msg in trained]
        if self._robust is None:
            return mean_of_updates(self._sent, updates)
        if self.aggregator == "krum" and len(trained) <= 2 * self.byzantine_hospitals + 2:
            raise FederationError(
                f"round {server_round}: krum tolerating {self.byzantine_hospitals} malicious "
                f"hospitals needs more than {2 * self.byzantine_hospitals + 2} updates, got "
                f"{len(trained)} (server.byzantine-hospitals, server.aggregator)"
            )
        arrays, metrics = self._robust.aggregate_train(server_round, trained)
        if arrays is None:
            return None
        loss = as_float((metrics or {}).get(Reply.TRAIN_LOSS))
        return mean_of_model(self._sent, arrays[PACKED_KEY].numpy(), updates, loss)

    def _update_problem(
        self, server_round: int, msg: Message, status: Mapping[str, object]
    ) -> str | None:
        """Why a trained reply's update is refused (server/app/validation.py), or None."""
        if self.layout is None or self._sent is None:
            return None  # no packed weights to check against (unit tests of the bookkeeping)
        return update_problem(
            msg.content.array_records.get(ARRAYS),
            self.layout,
            self._sent,
            server_round=server_round,
            reply_round=status.get(Status.ROUND),
            num_examples=msg.content.metric_records.get(METRICS, MetricRecord()).get(
                Reply.NUM_EXAMPLES
            ),
            max_examples=self.max_examples,
            max_norm=self.max_update_norm,
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Sum the held-out statistics the hospitals shared; global metrics from the sum.

        A hospital whose config keeps its evaluation (share-evaluation = false) replies
        that it withheld it; malformed statistics count as that hospital's failure.
        """
        total = EvalStats.zeros(self.labels)
        for msg in replies:
            node = msg.metadata.src_node_id
            problem = None
            if msg.has_error():
                problem = short_reason(msg.error.reason)
            else:
                status = msg.content[HOSPITAL] if HOSPITAL in msg.content.config_records else {}
                entry = self.round_hospitals.setdefault(
                    node,
                    HospitalRound(hospital=_hospital_name(msg), node_id=node, status="evaluated"),
                )
                metrics = msg.content.metric_records.get(METRICS, MetricRecord())
                if Reply.HELD_OUT_EPSILON in metrics:  # this evaluation's release included
                    entry.held_out_epsilon = as_float(metrics[Reply.HELD_OUT_EPSILON])
                    entry.max_held_out_epsilon = as_float(metrics.get(Reply.MAX_HELD_OUT_EPSILON))
                if status.get(Status.STATUS) == Status.WITHHELD:
                    self.withheld += 1
                    continue
                try:
                    stats = EvalStats.from_vector(
                        self.labels,
                        msg.content[EVALUATION][EVALUATION_STATISTICS].numpy(),
                        current=True,  # an older layout could bring a NaN into the sum
                    )
                except (KeyError, ValueError) as err:
                    problem = f"malformed evaluation statistics ({err})"
                else:
                    total = total + stats
                    own = stats.metrics()
                    entry.eval_loss, entry.eval_auroc = own.get("loss"), own.get("auroc")
                    continue
            self.eval_failures += 1
            self._record_failure(node, f"evaluation: {problem}")
            log(
                WARNING,
                "[fedfusion] round %d: node %d failed to evaluate: %s",
                server_round,
                node,
                problem,
            )
        self.evaluation = total
        metrics = total.metrics()
        return (
            MetricRecord({**metrics, Reply.NUM_EXAMPLES: int(total.examples)}) if metrics else None
        )


def as_float(value: object) -> float | None:
    """A metric value as a float, or None when it is missing or not a number."""
    return float(value) if isinstance(value, int | float) else None  # type: ignore[arg-type]


def as_count(value: object) -> int:
    """A record count as the run records it: 0 when missing, not finite or negative.

    validation.py refuses the update of such a reply, naming the value.
    """
    number = as_float(value)
    return int(number) if number is not None and 0 <= number < math.inf else 0


def wait_for_hospitals(grid: Grid, minimum: int, timeout: float) -> int:
    """Wait until ``minimum`` hospitals are connected; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {connected} of the required {minimum} hospitals connected within "
                f"{timeout:.0f}s (server.min-hospitals, server.wait-for-hospitals-timeout)"
            )
        time.sleep(1.0)
    return connected


StateDict = dict[str, torch.Tensor]


def packed_record(state: StateDict, layout: WeightLayout) -> ArrayRecord:
    """The trainable weights as they travel: one flat array (shared_model/packing.py)."""
    return ArrayRecord({PACKED_KEY: Array(layout.pack(state))})


def build_strategy(run: RunConfig, base_hash: str, layout: WeightLayout) -> HospitalFedAvg:
    """The configured strategy (FedAvg, or FedProx as FedAvg plus a proximal weight).

    ``base_hash`` (shared_model.weights.base_fingerprint) goes with every request, so each
    hospital can check its own copy of the frozen weights; so does ``layout``'s digest,
    which says how the trainable weights are packed into one array.
    """
    cfg = run.server
    return HospitalFedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        # run_federation waits (with a timeout) for min-hospitals before sampling, so
        # Flower's own wait, which has none, never blocks.
        min_train_nodes=1,
        min_evaluate_nodes=1 if cfg.fraction_evaluate > 0 else 0,
        min_available_nodes=cfg.min_hospitals,
        proximal_mu=cfg.proximal_mu if cfg.strategy == "fedprox" else 0.0,
        planned_rounds=run.num_rounds,
        base_hash=base_hash,
        layout=layout,
        max_update_norm=cfg.max_update_norm,
        max_examples=run.secagg.max_weight,
        aggregator=cfg.aggregator,
        trim_fraction=cfg.trim_fraction,
        byzantine_hospitals=cfg.byzantine_hospitals,
        labels=run.model.labels,
    )
