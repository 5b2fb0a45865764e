"""A federation in one process: the privacy audit's, and the utility benchmark's long runs.

It runs what a simulated federation runs, call for call: each hospital's
``run_local_round`` (its privacy policy, DP-SGD through Opacus, its ledger, the released
count and loss) and ``run_local_evaluation``; at the server, the round core the
ServerApp's drivers call (``shared_model/round_core.py``: the weighted mean of the updates,
then the ``ServerOptimizer``). Under SecAgg+ each hospital's upload goes through the same
codec (``shared_model/masked_upload.py``) and Flower's own quantization, and the server
decodes the sum; the pairwise masks are left out because they cancel exactly in that
sum. What it leaves out is Flower's processes and messages, about 1 s a round
here, as much as a round of the frozen model's training. A test
(tests/client/audit/test_inprocess.py) checks that it lands on the model a Flower
simulation of the same run trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from safetensors.torch import save_file

from client.app.reply import masked_upload_vector
from client.app.site import Site, open_site
from client.app.trainer import LocalRound, run_local_evaluation, run_local_round
from client.dp.ledger import LedgerEntry
from shared_model.config import HospitalConfig, RunConfig
from shared_model.config.hospital import SIM_FEATURE_CACHE_ENV
from shared_model.data import FusionTensors
from shared_model.datasets import HospitalSplit
from shared_model.evaluation import EvalStats
from shared_model.masked_upload import QUANTIZATION_RANGE
from shared_model.packing import WeightLayout
from shared_model.round_core import (
    HospitalUpdate,
    RoundMean,
    mean_of_sum,
    mean_of_updates,
    round_result,
)
from shared_model.server_optimizer import ServerOptimizer
from shared_model.weights import initial_model, shared_state

__all__ = ["MISSING_MODALITY", "federate"]

StateDict = dict[str, torch.Tensor]


def site_list(
    run: RunConfig, hospitals: int, threads: int = 0, hospital: Mapping[str, Any] | None = None
) -> list[Site]:
    """The run's simulated hospitals, opened as each would open itself.

    ``hospital``: more of each hospital's own settings (HospitalConfig fields).
    """
    threads = threads or torch.get_num_threads()
    return [
        open_site(
            HospitalConfig(
                partition_id=i, num_partitions=hospitals, threads=threads, **(hospital or {})
            ),
            run,
        )
        for i in range(hospitals)
    ]


# The modalities a fused model is also evaluated without, after its last round: the
# `present` flags kept (image, text), as a record missing that modality carries them.
MISSING_MODALITY = {"without-text": (1.0, 0.0), "without-image": (0.0, 1.0)}


def _evaluate(state: StateDict, sites: list[Site], run: RunConfig) -> dict[str, float]:
    """The global model's held-out metrics, from statistics summed over the hospitals."""
    total = EvalStats.zeros(run.model.labels)
    for site in sites:
        total = total + run_local_evaluation(state, site, run).stats
    return total.metrics()


def _without(site: Site, keep: tuple[float, float]) -> Site:
    """``site`` with every held-out record's ``present`` flags multiplied by ``keep``."""
    test = site.data.test
    present = test.present * torch.tensor(keep, dtype=test.present.dtype)
    masked = FusionTensors(test.images, test.report_ids, present, test.labels, test.patient_ids)
    return dataclasses.replace(site, data=HospitalSplit(train=site.data.train, test=masked))


def _round_mean(
    results: list[LocalRound], state: StateDict, layout: WeightLayout, run: RunConfig
) -> RoundMean | None:
    """The round's mean update as the server reads it (None: nobody trained).

    Under SecAgg+, from the sum of the quantized uploads; otherwise from each update.
    """
    if not run.secagg.enabled:
        updates = [
            HospitalUpdate(
                weights=layout.pack(r.weights), num_examples=r.num_examples, train_loss=r.train_loss
            )
            for r in results
            if r.trained
        ]
        return mean_of_updates(layout.pack(state), updates)
    c, levels = run.secagg.clipping_range, QUANTIZATION_RANGE
    no_evaluation = EvalStats.zeros(run.model.labels)  # evaluated apart, after the step
    summed = 0.0
    for r in results:
        codec, vector = masked_upload_vector(r, state, layout, no_evaluation, run)
        summed = summed + dequantize(quantize([vector], c, levels), c, levels)[0]
    return mean_of_sum(codec.decode_sum(summed / len(results), len(results)))


def federate(
    overrides: Mapping[str, Any],
    hospitals: int,
    rounds: int,
    out: Path,
    *,
    feature_cache: Path | None = None,
    threads: int = 0,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    hospital: Mapping[str, Any] | None = None,
    on_start: Callable[[RunConfig, list[Site], StateDict], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``rounds`` federated rounds of ``hospitals`` embedded hospitals in this process.

    ``overrides`` are run-config keys, as ``fedfusion simulate -c`` takes them; SecAgg+ is
    on where the run config says so. Returns one record per evaluation (round 0 is the
    initial model): round, seconds, train_loss, each hospital's epsilon and
    ``eval_metrics``, the shape `fedfusion simulate` writes to metrics.json; a fused
    model's last record also holds ``eval_metrics_without-text`` and ``-without-image``,
    its held-out metrics with that modality missing from every record. The final
    model is written to ``out/global_model.safetensors``, as a run directory holds it.
    ``hospital``: more of each hospital's own settings (e.g. its privacy-unit).
    ``on_start(run, sites, initial_state)`` runs once the hospitals are open, before round
    0 (the privacy audit picks its canaries there).
    """
    run = RunConfig.from_run_config({**overrides, "num-rounds": rounds, "output-dir": str(out)})
    # frozen encoders' features: cached beside the run, as `fedfusion simulate` caches them
    cache = str(feature_cache or out.parent / ".feature-cache")
    with mock.patch.dict(os.environ, {SIM_FEATURE_CACHE_ENV: cache}):
        sites = site_list(run, hospitals, threads, hospital)
    state = shared_state(initial_model(run.model, run.seed))
    layout = WeightLayout.of(state)
    optimizer = ServerOptimizer(run.server.momentum, run.server.learning_rate)
    if on_start is not None:
        on_start(run, sites, state)
    seen: list[tuple[LedgerEntry, ...]] = [() for _ in sites]
    history = [{"round": 0, "seconds": 0.0, "eval_metrics": _evaluate(state, sites, run)}]
    for server_round in range(1, rounds + 1):
        started = time.monotonic()
        results = []
        for i, site in enumerate(sites):
            result = run_local_round(
                state,
                site,
                run,
                server_round=server_round,
                planned_rounds=rounds,
                secure_aggregation=run.secagg.enabled,
                proximal_mu=run.server.proximal_mu,
                ledger_seen=seen[i],
            )
            seen[i] = result.ledger_history
            results.append(result)
        result = round_result(
            state, _round_mean(results, state, layout, run), layout, optimizer.step
        )
        state = result.state
        history.append(
            {
                "round": server_round,
                "seconds": time.monotonic() - started,
                # as the server records it: weighted by N̂ (under SecAgg+, read from the sum)
                "train_loss": math.nan if result.train_loss is None else result.train_loss,
                "epsilon": {s.name: r.epsilon for s, r in zip(sites, results, strict=True)},
                "eval_metrics": _evaluate(state, sites, run),
            }
        )
        if on_round is not None:
            on_round(history[-1])
    if run.model.branches == "fused":
        for name, keep in MISSING_MODALITY.items():
            masked = [_without(site, keep) for site in sites]
            history[-1][f"eval_metrics_{name}"] = _evaluate(state, masked, run)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "global_model.safetensors"))
    return history
