"""``make bench-utility``: how well the trained models work, run to convergence.

Every configuration trains the same number of rounds (30), each after the same small
hyperparameter search on a validation split, then over 3 seeds on the held-out test
split; centralized training is the same run with one hospital holding all the data (the
same epochs). Federations run in one process (:mod:`benchmarks.inprocess`), the same calls
a Flower simulation makes.
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.inprocess import federate
from benchmarks.report import Echo, machine_facts
from shared_model.config import PRESETS
from shared_model.progress import progress

__all__ = [
    "COMMON",
    "CONFIG_KEYS",
    "GRID",
    "ROUNDS",
    "SEEDS",
    "UTILITY_CONFIGS",
    "UTILITY_MODES",
    "UtilityConfig",
    "parse_grid",
    "quick_plan",
    "run_utility_bench",
    "search_grid",
    "summarize_utility",
    "utility_settings",
    "utility_targets",
    "write_utility",
]


@dataclass(frozen=True)
class UtilityConfig:
    """One configuration of the utility benchmark."""

    name: str
    hospitals: int
    overrides: dict[str, Any]
    mode: str  # the model: small (from scratch, full) | frozen | lora (pretrained encoders)
    branch: str  # fused | image | text
    privacy: str  # none | epsilon
    secagg: bool


ROUNDS = 30
SEEDS = (0, 1, 2)
HOSPITALS = 5
# What every configuration shares: large expected batches (DP noise is added per step, so
# its share of the update falls as the batch grows), server momentum (FedAvgM: it
# averages the hospitals' noisy updates over rounds), all 3,860 records. Simulated
# hospitals draw DP noise from torch's generator instead of the OS CSPRNG: the same
# distribution, ten times faster here (a hospital's own default stays the CSPRNG).
COMMON: dict[str, Any] = {
    "train.batch-size": 256,
    "server.momentum": 0.5,
    "privacy.secure-noise": False,
    "data.max-reports": 0,
}
# The one search every configuration gets, on a validation split carved from the
# training records (data.holdout = validation), seed 0. Without DP there is no clipping,
# so only the learning rate is searched.
GRID: dict[str, tuple[float, ...]] = {
    "train.learning-rate": (0.1, 0.4),
    "privacy.max-grad-norm": (0.5, 2.0),
}
TUNING_SEED = 0

_NO_DP = {"privacy.enabled": False, "secagg.enabled": False}
CENTRAL = "centralized, non-private"
FUSED = "federated, DP eps=8, SecAgg+"
IMAGE_ONLY = "image only, DP eps=8, SecAgg+"
TEXT_ONLY = "text only, DP eps=8, SecAgg+"
# The models compared: the default small model, and the pretrained EfficientNet-
# Lite0 + all-MiniLM-L6-v2 with frozen encoders or LoRA on the text encoder.
UTILITY_MODES: dict[str, dict[str, Any]] = {
    "small": {},
    "frozen": dict(PRESETS["efficientnet-minilm-concat"]),
    "lora": {
        **PRESETS["efficientnet-minilm-concat"],
        "model.encoder-mode": "lora",
        "model.max-report-tokens": 32,
    },
}


def _dp(epsilon: float, secagg: bool) -> dict[str, Any]:
    return {"privacy.target-epsilon": epsilon, "secagg.enabled": secagg}


def _configs(mode: str) -> list[UtilityConfig]:
    return [
        UtilityConfig(CENTRAL, 1, _NO_DP, mode, "fused", "none", False),
        UtilityConfig("federated, non-private", HOSPITALS, _NO_DP, mode, "fused", "none", False),
        UtilityConfig("federated, DP eps=1", HOSPITALS, _dp(1.0, False), mode, "fused", "1", False),
        UtilityConfig("federated, DP eps=3", HOSPITALS, _dp(3.0, False), mode, "fused", "3", False),
        UtilityConfig("federated, DP eps=8", HOSPITALS, _dp(8.0, False), mode, "fused", "8", False),
        UtilityConfig(FUSED, HOSPITALS, _dp(8.0, True), mode, "fused", "8", True),
        UtilityConfig(
            IMAGE_ONLY,
            HOSPITALS,
            {**_dp(8.0, True), "model.branches": "image"},
            mode,
            "image",
            "8",
            True,
        ),
        UtilityConfig(
            TEXT_ONLY,
            HOSPITALS,
            {**_dp(8.0, True), "model.branches": "text"},
            mode,
            "text",
            "8",
            True,
        ),
    ]


# Short names for `--configs`.
CONFIG_KEYS = {
    CENTRAL: "central",
    "federated, non-private": "federated",
    "federated, DP eps=1": "dp1",
    "federated, DP eps=3": "dp3",
    "federated, DP eps=8": "dp8",
    FUSED: "dp8-secagg",
    IMAGE_ONLY: "image",
    TEXT_ONLY: "text",
}


def parse_grid(text: str) -> dict[str, tuple[float, ...]]:
    """``"train.learning-rate=0.1/0.4 privacy.max-grad-norm=1"`` -> the search grid.

    ValueError naming the part that is not ``key=v1/v2/...`` of a searched key.
    """
    grid: dict[str, tuple[float, ...]] = {}
    for part in text.split():
        key, sep, values = part.partition("=")
        if not sep or key not in GRID:
            raise ValueError(f"{part!r}: expected KEY=V1/V2 with KEY one of {', '.join(GRID)}")
        try:
            grid[key] = tuple(float(v) for v in values.split("/"))
        except ValueError as err:
            raise ValueError(f"{part!r}: the values are not numbers ({err})") from err
    return {**GRID, **grid}


# Every configuration for each model; `--models` picks which run (the default, the frozen
# pretrained model, fits the 30-minute budget with its features cached: see
# docs/benchmarks.md for what the small model's grid would take).
UTILITY_CONFIGS = tuple(c for mode in UTILITY_MODES for c in _configs(mode))


def search_grid(config: UtilityConfig, grid: dict[str, Sequence[float]]) -> list[dict[str, Any]]:
    """The hyperparameter points searched for ``config`` (no clipping norm without DP)."""
    keys = [k for k in grid if config.privacy != "none" or not k.startswith("privacy.")]
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def quick_plan() -> dict[str, Any]:
    """The smoke run's arguments to :func:`run_utility_bench` (CI: the pipeline, not numbers)."""
    return {
        "names": (CENTRAL, FUSED, IMAGE_ONLY, TEXT_ONLY),
        "seeds": (0,),
        "rounds": 3,
        "reports": 600,
        "grid": {k: v[:1] for k, v in GRID.items()},
    }


def utility_settings(plan: dict[str, Any]) -> dict[str, Any]:
    """What every configuration shared, for the results file."""
    return {
        "rounds": plan.get("rounds", ROUNDS),
        "seeds": list(plan.get("seeds", SEEDS)),
        "hospitals": HOSPITALS,
        "reports": plan.get("reports", 0) or "all",
        "common": COMMON,
        "grid": {k: list(v) for k, v in plan.get("grid", GRID).items()},
        "tuning": f"validation split (data.holdout = validation), seed {TUNING_SEED}",
    }


def _final(history: list[dict[str, Any]]) -> dict[str, float]:
    return history[-1]["eval_metrics"]


def summarize_utility(
    config: UtilityConfig,
    runs: Sequence[tuple[list[dict[str, Any]], float]],
    tuned: dict[str, Any] | None = None,
    tuning: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """One JSON entry: macro and per-label AUROC of the last round, mean and std over seeds.

    Also the round-by-round macro AUROC (mean over seeds), the hyperparameters chosen and
    the validation AUROC of every point searched.
    """
    finals = [_final(history) for history, _ in runs]
    macro = [float(m["auroc"]) for m in finals]
    labels = sorted(k.split(".", 1)[1] for k in finals[0] if k.startswith("auroc."))
    per_label = {
        label: {
            "mean": float(np.nanmean([m.get(f"auroc.{label}", np.nan) for m in finals])),
            "std": float(np.nanstd([m.get(f"auroc.{label}", np.nan) for m in finals])),
        }
        for label in labels
    }
    curve = np.nanmean(
        [[float(r["eval_metrics"].get("auroc", np.nan)) for r in h] for h, _ in runs], axis=0
    )
    return {
        "name": f"{config.mode}: {config.name}",
        "model": config.mode,
        "branch": config.branch,
        "privacy": config.privacy,
        "secagg": "on" if config.secagg else "off",
        "hospitals": config.hospitals,
        "rounds": len(runs[0][0]) - 1,
        "seeds": len(runs),
        "macro_auroc_mean": float(np.mean(macro)),
        "macro_auroc_std": float(np.std(macro)),
        "per_label_auroc": per_label,
        "auroc_by_round": [round(float(v), 4) for v in curve],
        "tuned": dict(tuned or {}),
        "tuning": list(tuning),
        "wall_time_s": float(np.mean([seconds for _, seconds in runs])),
    }


def utility_targets(entries: Sequence[dict[str, Any]]) -> list[tuple[str, float | None, bool]]:
    """(target, value, met) for the two utility targets of each model, from the entries.

    Fused must beat the best single modality by at least 0.02, and by more than the two
    seed spreads (fused mean - std above the single's mean + std). A target whose
    configurations were not run has value None (reported, never met).
    """
    by_name = {e["name"]: e for e in entries}
    out: list[tuple[str, float | None, bool]] = []
    for mode in dict.fromkeys(e["model"] for e in entries):
        central, fused = by_name.get(f"{mode}: {CENTRAL}"), by_name.get(f"{mode}: {FUSED}")
        ratio = (
            fused["macro_auroc_mean"] / central["macro_auroc_mean"] if fused and central else None
        )
        singles = [by_name.get(f"{mode}: {IMAGE_ONLY}"), by_name.get(f"{mode}: {TEXT_ONLY}")]
        margin, apart = None, False
        if fused and all(singles):
            best = max(singles, key=lambda e: e["macro_auroc_mean"])  # type: ignore[index]
            margin = fused["macro_auroc_mean"] - best["macro_auroc_mean"]
            apart = (fused["macro_auroc_mean"] - fused["macro_auroc_std"]) > (
                best["macro_auroc_mean"] + best["macro_auroc_std"]
            )
        out += [
            (
                f"{mode}: federated DP eps=8 + SecAgg+ >= 0.95x centralized non-private",
                ratio,
                ratio is not None and ratio >= 0.95,
            ),
            (
                f"{mode}: fused beats the best single modality by >= 0.02, outside the seed "
                "spread (DP eps=8, SecAgg+)",
                margin,
                margin is not None and margin >= 0.02 and apart,
            ),
        ]
    return out


def _train(
    config: UtilityConfig,
    point: dict[str, Any],
    seed: int,
    holdout: str,
    rounds: int,
    reports: int,
    work: Path,
) -> tuple[list[dict[str, Any]], float]:
    """One federation of ``config`` with the hyperparameters ``point``; its rounds, seconds."""
    overrides = {
        **COMMON,
        **UTILITY_MODES[config.mode],
        **config.overrides,
        **point,
        "seed": seed,
        "data.holdout": holdout,
        "data.max-reports": reports,
    }
    out = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    started = time.monotonic()
    history = federate(overrides, config.hospitals, rounds, out, feature_cache=work / "features")
    return history, time.monotonic() - started


def _score(history: list[dict[str, Any]]) -> float | None:
    """The last round's macro AUROC; None where it is undefined (a failed run)."""
    value = float(_final(history).get("auroc", math.nan))
    return value if math.isfinite(value) else None


def run_utility_bench(
    *,
    modes: Sequence[str] = ("frozen",),
    names: Sequence[str] | None = None,
    seeds: Sequence[int] = SEEDS,
    rounds: int = ROUNDS,
    reports: int = 0,
    grid: dict[str, Sequence[float]] = GRID,
    echo: Echo = print,
) -> list[dict[str, Any]]:
    """Search, then train over ``seeds``, every configuration of ``modes`` (and ``names``).

    ``reports``: use only the first this many reports (0: all). Frozen features are
    cached once for all runs.
    """
    configs = [c for c in UTILITY_CONFIGS if c.mode in modes and (names is None or c.name in names)]
    entries = []
    trainings = sum(len(search_grid(c, grid)) + len(seeds) for c in configs)
    with (
        tempfile.TemporaryDirectory(prefix="fedfusion-utility-") as tmp,
        progress(trainings, "trainings") as advance,
    ):
        work = Path(tmp)
        for n, config in enumerate(configs, start=1):
            label = f"[{n}/{len(configs)}] {config.mode}: {config.name}"
            tuning = []
            for point in search_grid(config, grid):
                echo(f"{label}: searching {point} on the validation split ...")
                history, _ = _train(config, point, TUNING_SEED, "validation", rounds, reports, work)
                tuning.append({"point": point, "validation_auroc": _score(history)})
                advance("configurations and seeds", 1)
            scored = [t for t in tuning if t["validation_auroc"] is not None] or tuning
            best = max(scored, key=lambda t: t["validation_auroc"] or 0.0)["point"]
            runs = []
            for seed in seeds:
                echo(f"{label}: seed {seed} with {best} ...")
                runs.append(_train(config, best, seed, "test", rounds, reports, work))
                auroc = _score(runs[-1][0])
                shown = "undefined" if auroc is None else f"{auroc:.3f}"
                echo(f"{label}: seed {seed}: test macro AUROC {shown}")
                advance("configurations and seeds", 1)
            entries.append(summarize_utility(config, runs, best, tuning))
    return entries


def _plot(entries: Sequence[dict[str, Any]], path: Path) -> None:
    """Privacy-utility (macro AUROC against epsilon) and convergence, one row per model."""
    # matplotlib loads when the figure is drawn: every suite imports this module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    models = list(dict.fromkeys(e["model"] for e in entries))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 4 * len(models)), squeeze=False)
    for row, model in zip(axes, models, strict=True):
        mine = [e for e in entries if e["model"] == model]
        privacy_ax, curve_ax = row
        fused = sorted(
            (
                (float(e["privacy"]), e)
                for e in mine
                if e["branch"] == "fused" and e["privacy"] != "none" and e["secagg"] == "off"
            ),
            key=lambda pair: pair[0],
        )
        non_private = [e for e in mine if e["privacy"] == "none" and e["hospitals"] > 1]
        xs = [eps for eps, _ in fused] + ([16.0] if non_private else [])
        ys = [e for _, e in fused] + non_private
        if ys:
            privacy_ax.errorbar(
                xs,
                [e["macro_auroc_mean"] for e in ys],
                yerr=[e["macro_auroc_std"] for e in ys],
                marker="o",
                capsize=3,
                label="fused, federated (no SecAgg+)",
            )
        markers = {"fused": "s", "image": "^", "text": "v"}
        for e in mine:
            if e["secagg"] == "on":
                privacy_ax.errorbar(
                    [float(e["privacy"])],
                    [e["macro_auroc_mean"]],
                    yerr=[e["macro_auroc_std"]],
                    marker=markers[e["branch"]],
                    ls="none",
                    capsize=3,
                    label=f"{e['branch']}, eps=8 + SecAgg+",
                )
            if e["privacy"] == "none" and e["hospitals"] == 1:
                privacy_ax.axhline(
                    e["macro_auroc_mean"], color="grey", ls="--", label="centralized, non-private"
                )
        privacy_ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        privacy_ax.set_xscale("log")
        privacy_ax.set_xticks([1, 3, 8, 16], ["1", "3", "8", "none"])
        privacy_ax.set(
            xlabel="epsilon per hospital (delta = 1e-5)",
            ylabel="held-out macro AUROC",
            title=f"{model}: privacy and utility (mean, std over seeds)",
        )
        privacy_ax.legend(fontsize=7)
        for e in mine:
            curve_ax.plot(e["auroc_by_round"], label=e["name"].split(": ", 1)[1], lw=1.2)
        curve_ax.set(
            xlabel="round",
            ylabel="held-out macro AUROC (mean over seeds)",
            title=f"{model}: convergence",
        )
        curve_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(point: dict[str, Any]) -> str:
    short = {"train.learning-rate": "lr", "privacy.max-grad-norm": "clip"}
    return ", ".join(f"{short.get(k, k)} {v:g}" for k, v in point.items())


def write_utility(
    entries: Sequence[dict[str, Any]],
    out_dir: Path,
    settings: dict[str, Any] | None = None,
) -> tuple[Path, Path, Path]:
    """utility-<models>.json, .md and .png in ``out_dir`` (the latest run of those models).

    ``<models>``: the models the entries cover, e.g. ``frozen`` or ``small-frozen``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "utility-" + "-".join(dict.fromkeys(e["model"] for e in entries))
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    targets = utility_targets(entries)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(
        json.dumps(
            {
                "created": stamp,
                "machine": machine_facts(),
                "settings": settings or {},
                "entries": list(entries),
                "targets": [{"target": t, "value": v, "met": m} for t, v, m in targets],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    png_path = out_dir / f"{stem}.png"
    _plot(entries, png_path)
    labels = sorted(entries[0]["per_label_auroc"])
    rows = [
        "| configuration | branch | privacy | SecAgg+ | rounds | chosen | macro AUROC | "
        + " | ".join(labels)
        + " | wall time |",
        "|---|---|---|---|---:|---|---:|" + "---:|" * len(labels) + "---:|",
    ]
    for e in entries:
        rows.append(
            f"| {e['name']} | {e['branch']} | {e['privacy']} | {e['secagg']} | {e['rounds']} | "
            f"{_fmt(e['tuned'])} | {e['macro_auroc_mean']:.3f} ± {e['macro_auroc_std']:.3f} | "
            + " | ".join(f"{e['per_label_auroc'][lab]['mean']:.2f}" for lab in labels)
            + f" | {e['wall_time_s']:.0f} s |"
        )
    rows += ["", "Validation macro AUROC of every point searched (seed 0):", ""]
    for e in entries:
        searched = "; ".join(
            f"{_fmt(t['point'])}: "
            + ("failed" if t["validation_auroc"] is None else f"{t['validation_auroc']:.3f}")
            for t in e["tuning"]
        )
        rows.append(f"- {e['name']}: {searched}")
    rows.append("")
    rows += [
        f"- {t}: {'not measured' if v is None else f'{v:.3f}'}, {'met' if m else 'MISSED'}"
        for t, v, m in targets
    ]
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(
        f"# fedfusion utility benchmark, {stamp} UTC\n\n" + "\n".join(rows) + "\n",
        encoding="utf-8",
    )
    return json_path, md_path, png_path
