"""The hospital's train and evaluate handlers: request -> site -> local round -> reply.

Each step is built once: :func:`read_request` checks what the server sent,
:func:`open_site` brings the hospital's data, policy and ledger, ``trainer`` runs the
round with no Flower in sight, and ``reply`` builds what goes back (through the outbound
guard). ``client/app/client_app.py`` imports this module, and with it torch and Opacus,
only when a message trains or evaluates.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import replace

from flwr.app import ConfigRecord, Context, Message

from client.app.reply import evaluate_reply, train_reply
from client.app.request import MalformedRequestError, read_request
from client.app.site import open_site
from client.app.trainer import (
    LocalRound,
    evaluated_only,
    release_evaluation,
    run_local_evaluation,
    run_local_round,
)
from client.dp import accounting
from client.dp.ledger import LedgerEntry, dump_history, load_history
from shared_model.config import HospitalConfig, RunConfig
from shared_model.evaluation import EvalStats

__all__ = ["evaluate", "train"]

log = logging.getLogger("fedfusion.hospital")
# Kept in Flower's per-node state between this node's messages (each its own process):
_LEDGER_COPY = "privacy-ledger"  # the ledger history, so a ledger rolled back is refused
_RDP_CACHE = "privacy-rdp"  # the per-step RDP computed so far

# Opacus's hooks on the first layer fire although the radiograph needs no gradient.
warnings.filterwarnings("ignore", message="Full backward hook is firing")


def train(msg: Message, context: Context) -> Message:
    """Train the global model locally under DP and reply (under SecAgg+: the upload)."""
    run = RunConfig.from_run_config(context.run_config)
    hospital = HospitalConfig.from_node_config(context.node_config)
    request = read_request(msg, context, run, hospital)
    planned = request.planned_rounds(run)
    seen = _recall(context)  # before the ledger opens
    site = open_site(hospital, run)
    evaluation = EvalStats.zeros(run.model.labels)
    if request.evaluate_first:  # the model received, before this round changes it
        bound = int(run.secagg.max_weight)  # what one upload can hold
        local = run_local_evaluation(request.weights, site, run, request.server_round, bound)
        evaluation, history = release_evaluation(
            local.stats,
            site,
            seen,
            model_round=request.server_round - 1,  # the model before this round
            planned_rounds=planned,
        )
        seen = list(history)
    if request.evaluate_only:
        result = evaluated_only(request.weights, site, seen)
    else:
        result = run_local_round(
            request.weights,
            site,
            run,
            server_round=request.server_round,
            planned_rounds=planned,
            secure_aggregation=request.secure,
            proximal_mu=request.proximal_mu,
            ledger_seen=seen,
        )
    _remember(context, result)
    if result.declined:
        log.warning("%s %s", site.name, result.reason)
    return train_reply(msg, request, result, evaluation, site, run)


def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this hospital's held-out split (SecAgg+ off)."""
    run = RunConfig.from_run_config(context.run_config)
    hospital = HospitalConfig.from_node_config(context.node_config)
    request = read_request(msg, context, run, hospital)
    if request.secure:  # never reached: SecAgg+ evaluates inside its uploads
        raise MalformedRequestError("an evaluation request in SecAgg+'s records is refused")
    site = open_site(hospital, run)
    evaluation = run_local_evaluation(request.weights, site, run, request.server_round)
    history: Sequence[LedgerEntry] = ()
    if site.policy.share_evaluation and site.policy.held_out_noise:  # only what leaves
        stats, history = release_evaluation(
            evaluation.stats,
            site,
            _recall(context),
            model_round=request.server_round,
            planned_rounds=request.planned_rounds(run, evaluation=True),
        )
        _keep_history(context, history)
        evaluation = replace(evaluation, stats=stats)
    return evaluate_reply(msg, evaluation, site, history)


def _recall(context: Context) -> list[LedgerEntry]:
    """What this node's earlier messages left: its per-step RDP, and its ledger history."""
    accounting.RDP.absorb(context.state.config_records.get(_RDP_CACHE, {}))
    seen = context.state.config_records.get(_LEDGER_COPY)
    return load_history(str(seen["history"])) if seen else []


def _keep_history(context: Context, history: Sequence[LedgerEntry]) -> None:
    """Keep the ledger history for this node's next message (a rollback is then refused)."""
    if history:
        context.state[_LEDGER_COPY] = ConfigRecord({"history": dump_history(history)})


def _remember(context: Context, result: LocalRound) -> None:
    """Keep the ledger history and per-step RDP for this node's next message."""
    _keep_history(context, result.ledger_history)
    used = ((e.noise_multiplier, e.sample_rate) for e in result.ledger_history)
    context.state[_RDP_CACHE] = ConfigRecord(accounting.RDP.export(used))
