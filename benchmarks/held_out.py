"""What noised held-out statistics cost: pooled AUROC error over many noise draws.

Trains the README's pretrained recipe in this process (frozen EfficientNet-Lite0 and
MiniLM, 5 hospitals, 30 rounds, DP), evaluates the final model at each hospital
exactly, then releases each hospital's statistics as a hospital with its own data does
(client/dp/held_out.py) ``draws`` times and reads the pooled macro AUROC as the server
does. The error is |noised - exact| per draw, for the final model's release and for an
intermediate one, at held-out epsilon 8 with 4 releases (the default) and with 1.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from benchmarks.report import Measurement
from client.app.trainer import run_local_evaluation
from client.audit.inprocess import federate, site_list
from client.dp.held_out import release_held_out
from client.dp.ledger import LEDGER_FILENAME, PrivacyLedger
from client.dp.policy import effective_policy
from shared_model.config import HospitalConfig, RunConfig
from shared_model.config.presets import PRESETS
from shared_model.evaluation import EvalStats
from shared_model.inference.operating_points import pooled_figures

__all__ = ["run_held_out_bench"]

Echo = Callable[[str], None]
RECIPE = {
    **PRESETS["efficientnet-minilm-concat"],
    "train.learning-rate": 0.1,
    "privacy.max-grad-norm": 2.0,
}
TARGETS = {"median": 0.025, "p95": 0.08}  # the pooled macro AUROC's |error|, final model


def _errors(
    exact: list[EvalStats],
    epsilon: float,
    releases: int,
    final: bool,
    draws: int,
    tmp: Path,
    intervals: list[tuple[float, float]] | None = None,
) -> list[float]:
    """Noised - exact pooled macro AUROC per draw; ``intervals`` gets each draw's 95% CI."""
    policy = effective_policy(
        RunConfig().privacy,
        HospitalConfig(hospital_id="h", data_manifest="m.csv", state_dir=str(tmp)),
    )
    policy = replace(policy, max_epsilon=epsilon, held_out_releases=releases)
    rounds = 30
    truth = sum(exact[1:], exact[0]).metrics()["auroc"]
    rng = np.random.default_rng(0)  # reproducible draws; production uses the OS CSPRNG
    out = []
    for draw in range(draws):
        released = [
            release_held_out(
                stats,
                PrivacyLedger.empty(tmp / f"{draw}-{h}" / LEDGER_FILENAME, "h", policy),
                policy,
                model_round=rounds if final else rounds // 2,
                planned_rounds=rounds,
                normal=rng.standard_normal,
            ).stats
            for h, stats in enumerate(exact)
        ]
        pooled = sum(released[1:], released[0])
        out.append(pooled.metrics()["auroc"] - truth)
        if intervals is not None:  # as the model card computes it (fewer resamples)
            _, (_, low, high) = pooled_figures(pooled, np.zeros(len(pooled.labels)), 300, draw)
            intervals.append((low, high))
    return out


def run_held_out_bench(
    hospitals: int = 5, rounds: int = 30, draws: int = 100, echo: Echo = print
) -> list[Measurement]:
    """Train the recipe, then measure the pooled AUROC's error under held-out noise."""
    with tempfile.TemporaryDirectory(prefix="fedfusion-held-out-") as folder:
        tmp = Path(folder)
        echo(f"  the README's pretrained recipe: {hospitals} hospitals, {rounds} rounds ...")
        federate(RECIPE, hospitals, rounds, tmp / "run")
        run = RunConfig.from_run_config({**RECIPE, "num-rounds": rounds})
        weights = load_file(str(tmp / "run" / "global_model.safetensors"))
        exact = [run_local_evaluation(weights, s, run).stats for s in site_list(run, hospitals)]
        truth = sum(exact[1:], exact[0]).metrics()["auroc"]
        echo(f"  exact pooled macro AUROC of the final model: {truth:.4f}")
        config = {"hospitals": hospitals, "rounds": rounds, "draws": draws, **RECIPE}
        out = [Measurement.of("held-out/exact-macro-auroc", config, [float(truth)], "AUROC")]
        for releases, final in ((4, True), (4, False), (1, True)):
            which = "final" if final else "intermediate"
            echo(f"  {draws} noise draws: held-out epsilon 8, {releases} releases, {which}")
            intervals: list[tuple[float, float]] | None = [] if final and releases == 4 else None
            signed = _errors(
                exact, 8.0, releases, final, draws, tmp / f"{releases}-{which}", intervals
            )
            errors = [abs(e) for e in signed]
            name = f"held-out/eps8-{releases}-releases-{which}"
            median = Measurement.of(f"{name}/abs-error", config, errors, "AUROC")
            high = float(np.percentile(errors, 95))
            p95 = Measurement.of(f"{name}/abs-error-p95", config, [high], "AUROC")
            echo(f"    |error|: median {median.median:.4f}, 95th percentile {high:.4f}")
            if final and releases == 4:
                median.target = f"<= {TARGETS['median']}"
                median.met = bool(median.median <= TARGETS["median"])
                p95.target, p95.met = f"<= {TARGETS['p95']}", bool(high <= TARGETS["p95"])
            out += [median, p95]
            if intervals:
                out += _interval_measurements(intervals, signed, exact, truth, config, echo)
    return out


def _interval_measurements(
    intervals: list[tuple[float, float]],
    signed: list[float],
    exact: list[EvalStats],
    truth: float,
    config: dict[str, object],
    echo: Echo,
) -> list[Measurement]:
    """How often the card's noise-aware 95% CI holds the exact AUROC, its width, the bias."""
    covered = float(np.mean([low <= truth <= high for low, high in intervals]))
    widths = [high - low for low, high in intervals]
    bias = float(np.median(signed))
    pooled = sum(exact[1:], exact[0])
    _, (_, low, high) = pooled_figures(pooled, np.zeros(len(pooled.labels)), 300)
    echo(
        f"    95% CI holds the exact AUROC in {covered:.0%} of draws; median width "
        f"{np.median(widths):.3f} (exact statistics: {high - low:.3f}); median bias of the "
        f"noised estimate {bias:+.4f}"
    )
    name = "held-out/eps8-4-releases-final/ci95"
    coverage = Measurement.of(f"{name}-coverage", config, [covered], "fraction")
    coverage.target, coverage.met = ">= 0.95", bool(covered >= 0.95)
    return [
        coverage,
        Measurement.of(f"{name}-width", config, widths, "AUROC"),
        Measurement.of(f"{name}-width-exact-statistics", config, [high - low], "AUROC"),
        Measurement.of("held-out/eps8-4-releases-final/bias", config, [bias], "AUROC"),
    ]
