"""``make bench-utility``: how well the trained models work, run to convergence.

Every configuration trains the same number of rounds (30). The frozen pretrained model's
configurations each get the same small hyperparameter search on a validation split,
then train over 5 seeds on the held-out test split; the model trained from scratch,
whose runs take 3 to 10 times longer, trains at fixed settings (no search) and its
private configurations over fewer seeds. Centralized training is the same run with one
hospital holding all the data (the same epochs). Federations run in one process
(:mod:`client.audit.inprocess`), the same calls a Flower simulation makes. Fusion is
compared with each single modality seed by seed (the same seeds, the same search), and
the fused model is also evaluated with the text or the image removed from every
held-out record.
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
from scipy import stats

from benchmarks.report import Echo, machine_facts
from client.audit.inprocess import MISSING_MODALITY, federate
from shared_model.config import PRESETS
from shared_model.progress import progress

__all__ = [
    "COMMON",
    "CONFIG_KEYS",
    "CORE",
    "DEFAULT_CONFIGS",
    "DEFAULT_MODES",
    "GRID",
    "ROUNDS",
    "SEEDS",
    "SMALL_PRIVATE_SEEDS",
    "UTILITY_CONFIGS",
    "UTILITY_MODES",
    "UtilityConfig",
    "fusion_comparisons",
    "paired_difference",
    "parse_grid",
    "quick_plan",
    "run_utility_bench",
    "search_grid",
    "summarize_utility",
    "utility_settings",
    "utility_targets",
    "wanted",
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
    fixed: dict[str, Any] | None = None  # trained at these settings, no search
    seeds: tuple[int, ...] | None = None  # its own seeds (default SEEDS)


ROUNDS = 30
SEEDS = (0, 1, 2, 3, 4)
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
# Lite0 + all-MiniLM-L6-v2 with frozen encoders (concatenated, or fused late) or LoRA on
# the text encoder.
UTILITY_MODES: dict[str, dict[str, Any]] = {
    "small": {},
    "frozen": dict(PRESETS["efficientnet-minilm-concat"]),
    "frozen-late": dict(PRESETS["efficientnet-minilm-late"]),
    "lora": {
        **PRESETS["efficientnet-minilm-concat"],
        "model.encoder-mode": "lora",
        "model.max-report-tokens": 32,
    },
}


def _dp(epsilon: float, secagg: bool) -> dict[str, Any]:
    return {"privacy.target-epsilon": epsilon, "secagg.enabled": secagg}


# What `make bench-utility` runs unless --configs names others: the centralized bar, and
# fused against each single modality under DP eps = 8 + SecAgg+. For the model trained
# from scratch, only the first two: its single-branch runs would add 40 minutes.
CORE = (CENTRAL, FUSED, IMAGE_ONLY, TEXT_ONLY)
DEFAULT_CONFIGS = {"frozen": CORE, "frozen-late": CORE, "small": (CENTRAL, FUSED), "lora": CORE}
DEFAULT_MODES = ("frozen", "small")
# The model trained from scratch has no cached features and trains every encoder under
# DP: a private 30-round run of 5 hospitals takes about 7 minutes here, 4 times a
# centralized one. It trains at fixed settings instead of a search, its private
# configurations over 2 seeds: without DP AdamW at 1e-3 (SGD with momentum fell back to
# chance for some seeds at every rate that learned within 30 rounds: docs/models.md),
# under DP the run config's defaults (a screening on the validation split found nothing
# that reaches DP_BARS["small"]: docs/models.md, "Under DP: what was screened").
SMALL_FIXED: dict[str, dict[str, Any]] = {
    "none": {"train.optimizer": "adamw", "train.learning-rate": 0.001},
    "private": {"train.learning-rate": 0.2, "privacy.max-grad-norm": 1.0},
}
SMALL_PRIVATE_SEEDS = (0, 1)
# The bar DP eps = 8 + SecAgg+ must reach, as a share of centralized non-private.
DP_BARS = {"small": 0.85, "frozen": 0.95, "frozen-late": 0.95, "lora": 0.95}


def _configs(mode: str) -> list[UtilityConfig]:
    rows = [
        (CENTRAL, 1, _NO_DP, "fused", "none", False),
        ("federated, non-private", HOSPITALS, _NO_DP, "fused", "none", False),
        ("federated, DP eps=1", HOSPITALS, _dp(1.0, False), "fused", "1", False),
        ("federated, DP eps=3", HOSPITALS, _dp(3.0, False), "fused", "3", False),
        ("federated, DP eps=8", HOSPITALS, _dp(8.0, False), "fused", "8", False),
        (FUSED, HOSPITALS, _dp(8.0, True), "fused", "8", True),
        (IMAGE_ONLY, HOSPITALS, {**_dp(8.0, True), "model.branches": "image"}, "image", "8", True),
        (TEXT_ONLY, HOSPITALS, {**_dp(8.0, True), "model.branches": "text"}, "text", "8", True),
    ]
    out = []
    for name, hospitals, overrides, branch, privacy, secagg in rows:
        fixed = seeds = None
        if mode == "small":
            private = privacy != "none"
            fixed = SMALL_FIXED["private" if private else "none"]
            seeds = SMALL_PRIVATE_SEEDS if private else None
        out.append(
            UtilityConfig(name, hospitals, overrides, mode, branch, privacy, secagg, fixed, seeds)
        )
    return out


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
    """The hyperparameter points searched for ``config`` (no clipping norm without DP).

    Empty for a configuration trained at fixed settings (``config.fixed``).
    """
    if config.fixed is not None:
        return []
    keys = [k for k in grid if config.privacy != "none" or not k.startswith("privacy.")]
    return [
        dict(zip(keys, values, strict=True))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def quick_plan() -> dict[str, Any]:
    """The smoke run's arguments to :func:`run_utility_bench` (CI: the pipeline, not numbers)."""
    return {
        "names": CORE,
        "seeds": (0,),
        "rounds": 3,
        "reports": 600,
        "grid": {k: v[:1] for k, v in GRID.items()},
    }


def utility_settings(plan: dict[str, Any]) -> dict[str, Any]:
    """What every configuration shared, for the results file."""
    return {
        "rounds": plan.get("rounds", ROUNDS),
        "seeds": list(plan["seeds"])
        if plan.get("seeds")
        else {"default": list(SEEDS), "small, private": list(SMALL_PRIVATE_SEEDS)},
        "small, fixed settings": SMALL_FIXED,
        "hospitals": HOSPITALS,
        "reports": plan.get("reports", 0) or "all",
        "common": COMMON,
        "grid": {k: list(v) for k, v in plan.get("grid", GRID).items()},
        "tuning": f"validation split (data.holdout = validation), seed {TUNING_SEED}",
    }


def _final(history: list[dict[str, Any]]) -> dict[str, float]:
    return history[-1]["eval_metrics"]


def _macro(metrics: dict[str, float]) -> float:
    return float(metrics.get("auroc", math.nan))


def _by_label(metrics: Sequence[dict[str, float]], labels: Sequence[str]) -> dict[str, Any]:
    return {
        label: {
            "mean": float(np.nanmean([m.get(f"auroc.{label}", np.nan) for m in metrics])),
            "std": float(np.nanstd([m.get(f"auroc.{label}", np.nan) for m in metrics])),
        }
        for label in labels
    }


def summarize_utility(
    config: UtilityConfig,
    runs: Sequence[tuple[list[dict[str, Any]], float]],
    tuned: dict[str, Any] | None = None,
    tuning: Sequence[dict[str, Any]] = (),
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """One JSON entry: macro and per-label AUROC of the last round, mean and std over seeds.

    Also each seed's macro AUROC (``seeds``: the runs' seeds, default 0, 1, ...), the
    round-by-round macro AUROC (mean over seeds), the hyperparameters chosen, the
    validation AUROC of every point searched and, for a fused model, the same with the
    text or the image removed from every held-out record (``missing``).
    """
    finals = [_final(history) for history, _ in runs]
    seeds = list(seeds) if seeds is not None else list(range(len(runs)))
    macro = [_macro(m) for m in finals]
    labels = sorted(k.split(".", 1)[1] for k in finals[0] if k.startswith("auroc."))
    curve = np.nanmean(
        [[float(r["eval_metrics"].get("auroc", np.nan)) for r in h] for h, _ in runs], axis=0
    )
    missing = {}
    for name in MISSING_MODALITY:
        masked = [history[-1].get(f"eval_metrics_{name}") for history, _ in runs]
        if all(masked):
            missing[name] = {
                "macro_auroc_by_seed": dict(zip(map(str, seeds), map(_macro, masked), strict=True)),
                "per_label_auroc": _by_label(masked, labels),  # type: ignore[arg-type]
            }
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
        "macro_auroc_by_seed": dict(zip(map(str, seeds), macro, strict=True)),
        "per_label_auroc": _by_label(finals, labels),
        "missing": missing,
        "auroc_by_round": [round(float(v), 4) for v in curve],
        "tuned": dict(tuned or {}),
        "tuning": list(tuning),
        "wall_time_s": float(np.mean([seconds for _, seconds in runs])),
    }


def paired_difference(
    a: dict[str, float], b: dict[str, float]
) -> tuple[float, float, float, int] | None:
    """Mean of a - b over the seeds both have, and its 95 % t-interval; None without 2."""
    common = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    if len(common) < 2:
        return None
    diffs = np.array([a[k] - b[k] for k in common])
    mean, sem = float(diffs.mean()), float(stats.sem(diffs))
    if sem == 0.0:
        return mean, mean, mean, len(common)
    low, high = stats.t.interval(0.95, len(common) - 1, loc=mean, scale=sem)
    return mean, float(low), float(high), len(common)


def fusion_comparisons(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, fused against each single modality seed by seed (DP eps=8, SecAgg+).

    Each: what is compared, the bar (a - b must be at least ``bar``), the mean paired
    difference with its 95 % interval, and per label the mean difference.
    """
    by_name = {e["name"]: e for e in entries}
    out = []
    for mode in dict.fromkeys(e["model"] for e in entries):
        fused = by_name.get(f"{mode}: {FUSED}")
        image = by_name.get(f"{mode}: {IMAGE_ONLY}")
        text = by_name.get(f"{mode}: {TEXT_ONLY}")
        missing = (fused or {}).get("missing", {})
        pairs = [
            ("fused", fused, "image only", image, -0.005),
            ("fused", fused, "text only", text, 0.0),
            ("fused, text removed", missing.get("without-text"), "image only", image, -0.01),
            ("fused, image removed", missing.get("without-image"), "text only", text, -0.01),
        ]
        for a_name, a, b_name, b, bar in pairs:
            diff = (
                paired_difference(a["macro_auroc_by_seed"], b["macro_auroc_by_seed"])
                if (a and b)
                else None
            )
            labels = sorted((b or {}).get("per_label_auroc", {}))
            out.append(
                {
                    "model": mode,
                    "compared": f"{a_name} - {b_name}",
                    "bar": bar,
                    "difference": None if diff is None else diff[0],
                    "ci95": None if diff is None else [diff[1], diff[2]],
                    "seeds": 0 if diff is None else diff[3],
                    "per_label": {
                        lab: a["per_label_auroc"][lab]["mean"] - b["per_label_auroc"][lab]["mean"]
                        for lab in labels
                        if a and lab in a["per_label_auroc"]
                    },
                }
            )
    return out


def utility_targets(entries: Sequence[dict[str, Any]]) -> list[tuple[str, float | None, bool]]:
    """(target, value, met) for each model's utility targets, from the entries.

    DP eps=8 + SecAgg+ reaches its bar as a share of centralized (DP_BARS); trained from
    scratch, centralized varies by at most 0.05 (max - min) over the seeds; and fusion
    never hurts: fused is at least image only - 0.005 and text only, and with the text
    (image) removed at least image (text) only - 0.01, each as the mean difference over
    paired seeds. A target whose configurations were not run has value None (reported,
    never met).
    """
    by_name = {e["name"]: e for e in entries}
    comparisons = fusion_comparisons(entries)
    out: list[tuple[str, float | None, bool]] = []
    for mode in dict.fromkeys(e["model"] for e in entries):
        central, fused = by_name.get(f"{mode}: {CENTRAL}"), by_name.get(f"{mode}: {FUSED}")
        ratio = (
            fused["macro_auroc_mean"] / central["macro_auroc_mean"] if fused and central else None
        )
        bar = DP_BARS.get(mode, 0.95)
        out.append(
            (
                f"{mode}: federated DP eps=8 + SecAgg+ >= {bar}x centralized non-private",
                ratio,
                ratio is not None and ratio >= bar,
            )
        )
        if mode == "small":  # trained from scratch: does every seed train?
            spread = None
            if central and len(central["macro_auroc_by_seed"]) > 1:
                values = list(central["macro_auroc_by_seed"].values())
                spread = max(values) - min(values)
            out.append(
                (
                    f"{mode}: centralized non-private, max - min over seeds <= 0.05",
                    spread,
                    spread is not None and spread <= 0.05,
                )
            )
        for c in comparisons:
            if c["model"] == mode:
                value = c["difference"]
                out.append(
                    (
                        f"{mode}: {c['compared']} >= {c['bar']:g} (paired seeds, DP eps=8, "
                        "SecAgg+)",
                        value,
                        value is not None and value >= c["bar"],
                    )
                )
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


def wanted(config: UtilityConfig, names: Sequence[str] | None) -> bool:
    """Whether ``names`` (None: all, empty: the model's defaults) includes ``config``."""
    if names is None:
        return True
    return config.name in (names or DEFAULT_CONFIGS[config.mode])


def run_utility_bench(
    *,
    modes: Sequence[str] = DEFAULT_MODES,
    names: Sequence[str] | None = (),
    seeds: Sequence[int] | None = None,
    rounds: int = ROUNDS,
    reports: int = 0,
    grid: dict[str, Sequence[float]] = GRID,
    echo: Echo = print,
) -> list[dict[str, Any]]:
    """Search (or take the fixed settings), then train over the seeds, each configuration.

    ``names``: the configurations (None: all; empty: each model's DEFAULT_CONFIGS).
    ``seeds``: None gives each configuration its own (SEEDS unless it says).
    ``reports``: use only the first this many reports (0: all). Frozen features are
    cached once for all runs.
    """
    configs = [c for c in UTILITY_CONFIGS if c.mode in modes and wanted(c, names)]
    plans = [(c, search_grid(c, grid), tuple(seeds or c.seeds or SEEDS)) for c in configs]
    entries = []
    with (
        tempfile.TemporaryDirectory(prefix="fedfusion-utility-") as tmp,
        progress(sum(len(p) + len(s) for _, p, s in plans), "trainings") as advance,
    ):
        work = Path(tmp)
        for n, (config, points, run_seeds) in enumerate(plans, start=1):
            label = f"[{n}/{len(configs)}] {config.mode}: {config.name}"
            tuning = []
            for point in points:
                echo(f"{label}: searching {point} on the validation split ...")
                history, _ = _train(config, point, TUNING_SEED, "validation", rounds, reports, work)
                tuning.append({"point": point, "validation_auroc": _score(history)})
                advance("configurations and seeds", 1)
            scored = [t for t in tuning if t["validation_auroc"] is not None] or tuning
            best = (
                max(scored, key=lambda t: t["validation_auroc"] or 0.0)["point"]
                if scored
                else dict(config.fixed or {})
            )
            runs = []
            for seed in run_seeds:
                echo(f"{label}: seed {seed} with {best} ...")
                runs.append(_train(config, best, seed, "test", rounds, reports, work))
                auroc = _score(runs[-1][0])
                shown = "undefined" if auroc is None else f"{auroc:.3f}"
                echo(f"{label}: seed {seed}: test macro AUROC {shown}")
                advance("configurations and seeds", 1)
            entries.append(summarize_utility(config, runs, best, tuning, run_seeds))
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
    return ", ".join(
        f"{short.get(k, k)} {v:g}" if isinstance(v, int | float) else str(v)  # adamw
        for k, v in point.items()
    )


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
                "fusion": fusion_comparisons(entries),
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
        "by seed | " + " | ".join(labels) + " | wall time |",
        "|---|---|---|---|---:|---|---:|---|" + "---:|" * len(labels) + "---:|",
    ]
    for e in entries:
        by_seed = " ".join(f"{v:.3f}" for v in e["macro_auroc_by_seed"].values())
        rows.append(
            f"| {e['name']} | {e['branch']} | {e['privacy']} | {e['secagg']} | {e['rounds']} | "
            f"{_fmt(e['tuned'])} | {e['macro_auroc_mean']:.3f} ± {e['macro_auroc_std']:.3f} | "
            f"{by_seed} | "
            + " | ".join(f"{e['per_label_auroc'][lab]['mean']:.2f}" for lab in labels)
            + f" | {e['wall_time_s']:.0f} s |"
        )
    rows += ["", "Validation macro AUROC of every point searched (seed 0):", ""]
    for e in entries:
        searched = (
            "; ".join(
                f"{_fmt(t['point'])}: "
                + ("failed" if t["validation_auroc"] is None else f"{t['validation_auroc']:.3f}")
                for t in e["tuning"]
            )
            or f"none: fixed settings {_fmt(e['tuned'])}"
        )
        rows.append(f"- {e['name']}: {searched}")
    comparisons = [c for c in fusion_comparisons(entries) if c["difference"] is not None]
    if comparisons:
        rows += [
            "",
            "Fusion against each single modality, seed by seed (DP eps=8, SecAgg+; a - b, "
            "mean over paired seeds, 95 % t-interval; per label, the mean difference):",
            "",
            "| model | a - b | bar | mean | 95 % interval | seeds | " + " | ".join(labels) + " |",
            "|---|---|---:|---:|---|---:|" + "---:|" * len(labels),
        ]
        for c in comparisons:
            low, high = c["ci95"]
            rows.append(
                f"| {c['model']} | {c['compared']} | {c['bar']:+.3f} | {c['difference']:+.3f} | "
                f"[{low:+.3f}, {high:+.3f}] | {c['seeds']} | "
                + " | ".join(f"{c['per_label'].get(lab, math.nan):+.3f}" for lab in labels)
                + " |"
            )
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
