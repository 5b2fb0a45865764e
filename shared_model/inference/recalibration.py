"""Local recalibration: per-label temperatures fitted on one hospital's labelled records.

Temperature scaling (probability = sigmoid(logit / T)) keeps each finding's ranking and,
since the thresholds are on the logits, every decision; only the probabilities move.
The temperatures are statistics of the hospital's records, fitted without DP: the
recalibrated bundle is marked not shareable, and its card opens by saying so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared_model.inference.bundle import CARD_FILE, write_bundle
from shared_model.inference.calibration import fit_temperatures, probabilities
from shared_model.inference.loaded import LoadedModel
from shared_model.metrics import expected_calibration_error

__all__ = ["NOT_SHAREABLE", "TEMPERATURE_BOUNDS", "Recalibration", "recalibrate"]

NOT_SHAREABLE = (
    "> **For this hospital only: do not share.** This copy's calibration was fitted on "
    "this hospital's own labelled records: its temperatures are statistics of those "
    "records, not differentially private and not covered by the federation's "
    "(epsilon, delta)."
)
TEMPERATURE_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True, kw_only=True)
class Recalibration:
    """The fitted temperatures, the ECE before and after, and the bundle written."""

    labels: tuple[str, ...]
    temperatures: np.ndarray
    ece_before: list[float]
    ece_after: list[float]  # cross-fitted: each half measured with the other half's fit
    bundle: Path

    def to_dict(self) -> dict[str, object]:
        """JSON-ready figures."""
        return {
            "temperatures": dict(zip(self.labels, self.temperatures.tolist(), strict=True)),
            "ece-before": dict(zip(self.labels, self.ece_before, strict=True)),
            "ece-after-cross-fitted": dict(zip(self.labels, self.ece_after, strict=True)),
            "bundle": str(self.bundle),
        }

    def cautions(self) -> list[str]:
        """Findings where the fit hit its limit or did not lower the cross-fitted ECE."""
        out = []
        low, high = TEMPERATURE_BOUNDS
        for label, t, before, after in zip(
            self.labels, self.temperatures, self.ece_before, self.ece_after, strict=True
        ):
            if t <= low * 1.001 or t >= high * 0.999:
                out.append(
                    f"{label}: the temperature hit its limit ({t:.2f}): the model's scores "
                    "carry almost no information about it on these records"
                )
            elif after >= before:
                out.append(
                    f"{label}: recalibration did not lower its cross-fitted ECE "
                    f"({before:.3f} -> {after:.3f}); the original bundle calibrates it as well"
                )
        return out

    def markdown(self) -> str:
        """The report's recalibration section."""
        rows = [
            f"| {label} | {t:.2f} | {before:.3f} | {after:.3f} |"
            for label, t, before, after in zip(
                self.labels, self.temperatures, self.ece_before, self.ece_after, strict=True
            )
        ]
        return (
            "\n## Local recalibration\n\nPer-label temperatures fitted on these records "
            f"(written to `{self.bundle}`, for this hospital only). The ECE after "
            "recalibration is cross-fitted: each half of the records measured with "
            "temperatures fitted on the other half.\n\n"
            "| finding | temperature | ECE before | ECE after (cross-fitted) |\n"
            "|---|---:|---:|---:|\n" + "\n".join(rows) + "\n"
        )


def _cross_fitted_ece(logits: np.ndarray, targets: np.ndarray, seed: int) -> list[float]:
    """Per label, the ECE of temperatures fitted on one half of the records, on the other.

    Fitting and measuring on the same records would flatter the recalibration.
    """
    fold = np.random.default_rng([seed, 17]).permutation(len(logits)) % 2 == 0
    probs = np.zeros_like(logits)
    for part in (fold, ~fold):
        temps = fit_temperatures(logits[~part], targets[~part], bounds=TEMPERATURE_BOUNDS)
        probs[part] = probabilities(logits[part], temps)
    return [expected_calibration_error(probs[:, j], targets[:, j]) for j in range(logits.shape[1])]


def recalibrate(
    loaded: LoadedModel,
    logits: np.ndarray,
    targets: np.ndarray,
    ece_before: list[float],
    target: Path,
    seed: int = 0,
) -> Recalibration:
    """Fit the temperatures on ``logits``/``targets``; write the recalibrated bundle."""
    bundle = loaded.bundle
    temps = fit_temperatures(logits, targets, bounds=TEMPERATURE_BOUNDS)
    info = {k: v for k, v in bundle.info.items() if k not in {"format", "weights", "digest"}}
    info["calibration"] = {
        "temperatures": temps.tolist(),
        "fitted-on": f"{len(logits)} labelled records at this hospital",
        "fitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shareable": False,
    }
    card = bundle.root.joinpath(CARD_FILE).read_text(encoding="utf-8")
    title, _, rest = card.partition("\n")
    card = f"{title}\n\n{NOT_SHAREABLE}\n{rest}" + (
        "\n## Local recalibration\n\nThis copy's probabilities are recalibrated for one "
        f"hospital: per-label temperatures {', '.join(f'{t:.2f}' for t in temps)} fitted "
        f"on {len(logits)} of its labelled records. Decisions are unchanged (the thresholds "
        "are on the model's scores).\n"
    )
    write_bundle(target, info, loaded.weights, card, private=True)
    return Recalibration(
        labels=bundle.labels,
        temperatures=temps,
        ece_before=list(ece_before),
        ece_after=_cross_fitted_ece(logits, targets, seed),
        bundle=target,
    )
