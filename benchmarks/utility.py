"""``make bench-utility``: how well the trained models work, side by side.

Held-out AUROC of centralized, federated, DP, SecAgg+ and single-branch models, over 3
seeds, on the embedded data.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.federation import simulate_run
from benchmarks.report import Echo, machine_facts
from shared_model.config import PRESETS

__all__ = [
    "UTILITY_CONFIGS",
    "UTILITY_MODES",
    "UtilityConfig",
    "run_utility_bench",
    "summarize_utility",
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


_NO_DP = {"privacy.enabled": False, "secagg.enabled": False}
_DP8 = {"privacy.target-epsilon": 8.0, "secagg.enabled": False}
_DP3 = {"privacy.target-epsilon": 3.0, "secagg.enabled": False}
CENTRAL = "centralized, non-private"
FUSED = "federated, DP eps=8, SecAgg+"
IMAGE_ONLY = "image only, DP eps=8, SecAgg+"
TEXT_ONLY = "text only, DP eps=8, SecAgg+"
# The models compared: the default small model, and the pretrained EfficientNet-
# Lite0 + all-MiniLM-L6-v2 with frozen encoders or LoRA on the text encoder. LoRA runs the
# 22.7M-parameter encoder forward and backward at every step, so it trains 1 local epoch
# per round instead of 2, on reports cut to 32 tokens instead of 64 (the rest is the same).
UTILITY_MODES: dict[str, dict[str, Any]] = {
    "small": {},
    "frozen": dict(PRESETS["efficientnet-minilm-concat"]),
    "lora": {
        **PRESETS["efficientnet-minilm-concat"],
        "model.encoder-mode": "lora",
        "train.local-epochs": 1,
        "model.max-report-tokens": 32,
    },
}


def _configs(mode: str, names: Sequence[str]) -> list[UtilityConfig]:
    every = [
        UtilityConfig(CENTRAL, 1, _NO_DP, mode, "fused", "none", False),
        UtilityConfig("federated, non-private", 5, _NO_DP, mode, "fused", "none", False),
        UtilityConfig("federated, DP eps=8", 5, _DP8, mode, "fused", "8", False),
        UtilityConfig("federated, DP eps=3", 5, _DP3, mode, "fused", "3", False),
        UtilityConfig(FUSED, 5, {}, mode, "fused", "8", True),
        UtilityConfig(IMAGE_ONLY, 5, {"model.branches": "image"}, mode, "image", "8", True),
        UtilityConfig(TEXT_ONLY, 5, {"model.branches": "text"}, mode, "text", "8", True),
    ]
    return [c for c in every if c.name in names]


# Scaled to about 30 minutes on 2 cores: every configuration for the small model; for the
# pretrained ones, what the two targets need (frozen), or the federated DP model alone
# (lora, about 2 minutes a seed).
UTILITY_CONFIGS = (
    *_configs(
        "small",
        (
            CENTRAL,
            "federated, non-private",
            "federated, DP eps=8",
            "federated, DP eps=3",
            FUSED,
            IMAGE_ONLY,
            TEXT_ONLY,
        ),
    ),
    *_configs("frozen", (CENTRAL, FUSED, IMAGE_ONLY, TEXT_ONLY)),
    *_configs("lora", (FUSED,)),
)


def summarize_utility(
    config: UtilityConfig, runs: Sequence[tuple[list[dict[str, Any]], float]]
) -> dict[str, Any]:
    """One JSON entry: macro and per-label AUROC of the final round, mean and std over seeds."""
    finals = [rounds[-1]["eval_metrics"] for rounds, _ in runs]
    macro = [float(m["auroc"]) for m in finals]
    labels = sorted(k.split(".", 1)[1] for k in finals[0] if k.startswith("auroc."))
    per_label = {
        label: {
            "mean": float(np.nanmean([m.get(f"auroc.{label}", np.nan) for m in finals])),
            "std": float(np.nanstd([m.get(f"auroc.{label}", np.nan) for m in finals])),
        }
        for label in labels
    }
    return {
        "name": f"{config.mode}: {config.name}",
        "mode": config.mode,
        "branch": config.branch,
        "privacy": config.privacy,
        "secagg": "on" if config.secagg else "off",
        "hospitals": config.hospitals,
        "seeds": len(runs),
        "macro_auroc_mean": float(np.mean(macro)),
        "macro_auroc_std": float(np.std(macro)),
        "per_label_auroc": per_label,
        "wall_time_s": float(np.mean([seconds for _, seconds in runs])),
    }


def utility_targets(entries: Sequence[dict[str, Any]]) -> list[tuple[str, float | None, bool]]:
    """(target, value, met) for the two utility targets of each model, from the entries.

    A target whose configurations were not run has value None (reported, never met).
    """
    scores = {e["name"]: e["macro_auroc_mean"] for e in entries}
    out: list[tuple[str, float | None, bool]] = []
    for mode in dict.fromkeys(e["mode"] for e in entries):
        central = scores.get(f"{mode}: {CENTRAL}")
        fused = scores.get(f"{mode}: {FUSED}")
        ratio = fused / central if fused is not None and central else None
        singles = [scores.get(f"{mode}: {IMAGE_ONLY}"), scores.get(f"{mode}: {TEXT_ONLY}")]
        margin = fused - max(singles) if fused is not None and None not in singles else None
        out += [
            (
                f"{mode}: federated DP eps=8 + SecAgg+ >= 0.95x centralized non-private",
                ratio,
                ratio is not None and ratio >= 0.95,
            ),
            (
                f"{mode}: fused beats the best single modality (DP eps=8, SecAgg+)",
                margin,
                margin is not None and margin > 0,
            ),
        ]
    return out


def run_utility_bench(
    seeds: Sequence[int] = (0, 1, 2),
    rounds: int = 3,
    reports: int = 1500,
    echo: Echo = print,
    modes: Sequence[str] = tuple(UTILITY_MODES),
) -> list[dict[str, Any]]:
    """Every utility configuration of ``modes`` over ``seeds`` on the same data.

    Frozen features are cached once for all runs (the simulated hospitals' shared cache).
    """
    entries = []
    configs = [c for c in UTILITY_CONFIGS if c.mode in modes]
    with tempfile.TemporaryDirectory(prefix="fedfusion-utility-") as tmp:
        for config in configs:
            runs = []
            for seed in seeds:
                echo(f"  {config.mode}: {config.name}, seed {seed} ...")
                out = Path(tmp) / f"{len(entries)}-{seed}"
                overrides = {
                    **UTILITY_MODES[config.mode],
                    **config.overrides,
                    "seed": seed,
                    "data.max-reports": reports,
                }
                started = time.monotonic()
                rounds_done = simulate_run(out, config.hospitals, rounds, overrides)
                runs.append((rounds_done, time.monotonic() - started))
            entries.append(summarize_utility(config, runs))
    return entries


def write_utility(entries: Sequence[dict[str, Any]], out_dir: Path) -> tuple[Path, Path, Path]:
    """benchmarks/results/utility.json, utility.md and utility.png (the latest run only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    targets = utility_targets(entries)
    json_path = out_dir / "utility.json"
    json_path.write_text(
        json.dumps(
            {
                "created": stamp,
                "machine": machine_facts(),
                "entries": list(entries),
                "targets": [{"target": t, "value": v, "met": m} for t, v, m in targets],
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    fig, ax = plt.subplots(figsize=(9, 0.9 + 0.32 * len(entries)))
    names = [e["name"] for e in entries]
    ax.barh(
        names,
        [e["macro_auroc_mean"] for e in entries],
        xerr=[e["macro_auroc_std"] for e in entries],
        color="tab:blue",
    )
    ax.axvline(0.5, color="grey", ls=":")
    ax.set(xlim=(0.4, 1.0), xlabel="held-out macro AUROC (mean, std over seeds)")
    ax.invert_yaxis()
    fig.tight_layout()
    png_path = out_dir / "utility.png"
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    labels = sorted(entries[0]["per_label_auroc"])
    rows = [
        "| configuration | branch | privacy | SecAgg+ | macro AUROC | "
        + " | ".join(labels)
        + " | wall time |",
        "|---|---|---|---|---:|" + "---:|" * len(labels) + "---:|",
    ]
    for e in entries:
        rows.append(
            f"| {e['name']} | {e['branch']} | {e['privacy']} | {e['secagg']} | "
            f"{e['macro_auroc_mean']:.3f} ± {e['macro_auroc_std']:.3f} | "
            + " | ".join(f"{e['per_label_auroc'][lab]['mean']:.2f}" for lab in labels)
            + f" | {e['wall_time_s']:.0f} s |"
        )
    rows.append("")
    rows += [
        f"- {t}: {'not measured' if v is None else f'{v:.3f}'}, {'met' if m else 'MISSED'}"
        for t, v, m in targets
    ]
    md_path = out_dir / "utility.md"
    md_path.write_text(
        f"# fedfusion utility benchmark, {stamp} UTC\n\n" + "\n".join(rows) + "\n",
        encoding="utf-8",
    )
    return json_path, md_path, png_path
