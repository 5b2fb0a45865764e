"""``fedfusion evaluate``: a bundle on a hospital's own labelled records; nothing leaves.

Writes, to the output folder: ``report.md``, ``evaluation.json`` (every figure, the
rows refused and why), ``roc_curves.png`` and ``reliability.png``; with recalibration,
also ``recalibrated-bundle/``, the same model with per-label temperatures fitted on
these records, for this hospital only.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.inference.bundle import CARD_FILE, write_bundle
from shared_model.inference.calibration import fit_temperatures
from shared_model.inference.loaded import LoadedModel
from shared_model.inference.metrics import LocalEvaluation, evaluate_predictions
from shared_model.inference.plots import write_reliability_diagram, write_roc_curves
from shared_model.inference.predict import Progress, manifest_outputs
from shared_model.inference.report import render_report

__all__ = ["NOT_SHAREABLE", "EvaluationRun", "evaluate_bundle"]

NOT_SHAREABLE = (
    "> **For this hospital only: do not share.** This copy's calibration was fitted on "
    "this hospital's own labelled records: its temperatures are statistics of those "
    "records, not differentially private and not covered by the federation's "
    "(epsilon, delta)."
)


@dataclass(frozen=True, kw_only=True)
class EvaluationRun:
    """What ``evaluate_bundle`` computed and wrote."""

    evaluation: LocalEvaluation
    rows_refused: list[dict[str, Any]]
    out: Path
    recalibrated: Path | None = None
    temperatures: np.ndarray | None = None  # fitted, with recalibration


def _cross_fitted_ece(logits: np.ndarray, targets: np.ndarray, seed: int) -> list[float]:
    """Per label, the ECE of temperatures fitted on one half of the records, on the other.

    Fitting and measuring on the same records would flatter the recalibration; two
    folds, each fitted on the other, give an honest figure.
    """
    from shared_model.inference.calibration import expected_calibration_error, probabilities

    rng = np.random.default_rng([seed, 17])
    fold = rng.permutation(len(logits)) % 2 == 0
    probs = np.zeros_like(logits)
    for part in (fold, ~fold):
        temps = fit_temperatures(logits[~part], targets[~part])
        probs[part] = probabilities(logits[part], temps)
    return [expected_calibration_error(probs[:, j], targets[:, j]) for j in range(logits.shape[1])]


def evaluate_bundle(
    loaded: LoadedModel,
    manifest: Path,
    out: Path,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    recalibrate: bool = False,
    progress: Progress | None = None,
) -> EvaluationRun:
    """Evaluate ``loaded`` on ``manifest``'s labelled records; write the results to ``out``.

    Rows that cannot be read are left out and listed (row, file, reason) in the report
    and the JSON. ManifestError when no row is usable.
    """
    bundle = loaded.bundle
    outputs = manifest_outputs(loaded, manifest, with_labels=True, progress=progress)
    logits, targets, load = outputs.logits, outputs.targets, outputs.report
    evaluation = evaluate_predictions(
        bundle.labels,
        logits,
        targets,
        bundle.threshold_logits,
        bundle.temperatures,
        bootstrap=bootstrap,
        seed=seed,
    )
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True, mode=0o700)  # figures of this hospital's records
    write_roc_curves(
        bundle.labels, logits, targets, bundle.threshold_logits, out / "roc_curves.png"
    )
    write_reliability_diagram(evaluation, out / "reliability.png")
    refused = [{"row": e.row, "file": e.file, "reason": e.reason} for e in load.errors]
    facts = [
        ("Model", bundle.describe()),
        ("Test records", f"{load.rows_ok} of {load.rows_total} rows in {load.manifest}"),
        ("Rows refused", f"{load.rows_bad} (listed below)" if refused else "none"),
        ("Missing radiograph / text", f"{load.missing_image} / {load.missing_report}"),
        ("Decision thresholds", f"{bundle.info['decision']['rule']}, from the federation"),
        ("Evaluated", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
    ]
    result: dict[str, Any] = {
        "bundle": bundle.describe(),
        "manifest": load.manifest,
        "rows": {"total": load.rows_total, "used": load.rows_ok, "refused": refused},
        "missing": {"image": load.missing_image, "text": load.missing_report},
        "figures": evaluation.to_dict(),
    }
    run = EvaluationRun(evaluation=evaluation, rows_refused=refused, out=out)
    if recalibrate:
        run = _recalibrate(loaded, logits, targets, seed, run, result, facts)
    text = render_report(evaluation, title="Evaluation on this hospital's records", facts=facts)
    if "recalibration" in result:
        text += _recalibration_section(result["recalibration"])
    if refused:
        text += "\n## Rows refused\n\n" + "\n".join(
            f"- row {r['row']} ({r['file']}): {r['reason']}" for r in refused
        )
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return run


def _recalibrate(
    loaded: LoadedModel,
    logits: np.ndarray,
    targets: np.ndarray,
    seed: int,
    run: EvaluationRun,
    result: dict[str, Any],
    facts: list[tuple[str, str]],
) -> EvaluationRun:
    """Fit per-label temperatures here; write the recalibrated bundle beside the report.

    The temperatures are computed from this hospital's records without DP: the bundle
    is marked not shareable, and its card says so first.
    """
    bundle = loaded.bundle
    temps = fit_temperatures(logits, targets)
    cross = _cross_fitted_ece(logits, targets, seed)
    before = [f.ece for f in run.evaluation.per_label]
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
    target = run.out / "recalibrated-bundle"
    write_bundle(target, info, loaded.weights, card, private=True)
    result["recalibration"] = {
        "temperatures": dict(zip(bundle.labels, temps.tolist(), strict=True)),
        "ece-before": dict(zip(bundle.labels, before, strict=True)),
        "ece-after-cross-fitted": dict(zip(bundle.labels, cross, strict=True)),
        "bundle": str(target),
    }
    facts.append(("Recalibrated bundle", f"{target} (temperatures fitted here)"))
    return EvaluationRun(
        evaluation=run.evaluation,
        rows_refused=run.rows_refused,
        out=run.out,
        recalibrated=target,
        temperatures=temps,
    )


def _recalibration_section(recal: dict[str, Any]) -> str:
    rows = [
        f"| {label} | {t:.2f} | {_num(recal['ece-before'][label])} | "
        f"{_num(recal['ece-after-cross-fitted'][label])} |"
        for label, t in recal["temperatures"].items()
    ]
    return (
        "\n## Local recalibration\n\nPer-label temperatures fitted on these records "
        f"(written to `{recal['bundle']}`). The ECE after recalibration is cross-fitted: "
        "each half of the records measured with temperatures fitted on the other half.\n\n"
        "| finding | temperature | ECE before | ECE after (cross-fitted) |\n"
        "|---|---:|---:|---:|\n" + "\n".join(rows) + "\n"
    )


def _num(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.3f}"
