"""``fedfusion evaluate``: a bundle on a hospital's own labelled records; nothing leaves.

Writes, to a new output folder (readable by its owner only): ``report.md``,
``evaluation.json`` (every figure, the rows refused and why), ``roc_curves.png`` and
``reliability.png``; with recalibration, also ``recalibrated-bundle/``
(:mod:`shared_model.inference.recalibration`), for this hospital only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared_model.inference.bundle import Bundle
from shared_model.inference.loaded import LoadedModel
from shared_model.inference.metrics import LocalEvaluation, evaluate_predictions
from shared_model.inference.plots import write_reliability_diagram, write_roc_curves
from shared_model.inference.predict import Progress, manifest_outputs
from shared_model.inference.recalibration import Recalibration
from shared_model.inference.recalibration import recalibrate as fit_and_write
from shared_model.inference.report import render_report
from shared_model.manifest import LoadReport

__all__ = ["EvaluationRun", "evaluate_bundle"]

# Below these, the intervals of a finding's figures say more than the figures.
FEW_RECORDS, FEW_POSITIVES = 30, 10


@dataclass(frozen=True, kw_only=True)
class EvaluationRun:
    """What ``evaluate_bundle`` computed and wrote."""

    evaluation: LocalEvaluation
    rows_refused: list[dict[str, Any]]
    out: Path
    cautions: list[str]
    recalibration: Recalibration | None = None

    @property
    def recalibrated(self) -> Path | None:
        """The recalibrated bundle's folder, if one was written."""
        return None if self.recalibration is None else self.recalibration.bundle

    @property
    def temperatures(self) -> np.ndarray | None:
        """The fitted temperatures, with recalibration."""
        return None if self.recalibration is None else self.recalibration.temperatures


def cautions(evaluation: LocalEvaluation, bundle: Bundle) -> list[str]:
    """What a reader of these figures should know before trusting them."""
    out = []
    few = [
        f.label for f in evaluation.per_label if min(f.positives, f.n - f.positives) < FEW_POSITIVES
    ]
    if evaluation.n < FEW_RECORDS:
        out.append(f"only {evaluation.n} records: every interval is wide and unreliable")
    elif few:
        out.append(
            f"fewer than {FEW_POSITIVES} positive (or negative) records for {', '.join(few)}: "
            "their intervals are wide"
        )
    low, high = evaluation.macro.auroc_ci95
    if not math.isnan(low) and low <= 0.5 <= high:
        out.append(
            "the macro AUROC's interval includes 0.5: on these records the model does not "
            "rank better than chance, and a low calibration error then says little"
        )
    if bundle.info["calibration"].get("fitted-on"):
        out.append(
            "this bundle was recalibrated at a hospital: on the records its calibration was "
            "fitted on, its ECE is flattered"
        )
    return out


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

    ``out`` must be new or empty (ValueError otherwise: nothing is overwritten). Rows
    that cannot be read are left out and listed (row, file, reason) in the report and
    the JSON. ManifestError when no row is usable.
    """
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not empty: choose a new folder")
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
    out.mkdir(parents=True, exist_ok=True, mode=0o700)  # figures of this hospital's records
    write_roc_curves(
        bundle.labels, logits, targets, bundle.threshold_logits, out / "roc_curves.png"
    )
    write_reliability_diagram(evaluation, out / "reliability.png")
    recal = None
    if recalibrate:
        before = [f.ece for f in evaluation.per_label]
        recal = fit_and_write(loaded, logits, targets, before, out / "recalibrated-bundle", seed)
    run = EvaluationRun(
        evaluation=evaluation,
        rows_refused=[{"row": e.row, "file": e.file, "reason": e.reason} for e in load.errors],
        out=out,
        cautions=cautions(evaluation, bundle) + (recal.cautions() if recal else []),
        recalibration=recal,
    )
    _write_report(run, load, bundle)
    return run


def _write_report(run: EvaluationRun, load: LoadReport, bundle: Bundle) -> None:
    """report.md and evaluation.json in ``run.out``."""
    refused, recal = run.rows_refused, run.recalibration
    facts = [
        ("Model", bundle.describe()),
        ("Test records", f"{load.rows_ok} of {load.rows_total} rows in {load.manifest}"),
        ("Rows refused", f"{load.rows_bad} (listed below)" if refused else "none"),
        ("Missing radiograph / text", f"{load.missing_image} / {load.missing_report}"),
        ("Decision thresholds", f"{bundle.info['decision']['rule']}, from the federation"),
        ("Evaluated", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
    ]
    if recal is not None:
        facts.append(("Recalibrated bundle", f"{recal.bundle} (for this hospital only)"))
    text = render_report(run.evaluation, title="Evaluation on this hospital's records", facts=facts)
    if run.cautions:
        text += "\n## Cautions\n\n" + "\n".join(f"- {c}" for c in run.cautions) + "\n"
    if recal is not None:
        text += recal.markdown()
    if refused:
        text += "\n## Rows refused\n\n" + "\n".join(
            f"- row {r['row']} ({r['file']}): {r['reason']}" for r in refused
        )
    result: dict[str, Any] = {
        "bundle": bundle.describe(),
        "digest": bundle.digest,
        "manifest": load.manifest,
        "rows": {"total": load.rows_total, "used": load.rows_ok, "refused": refused},
        "missing": {"image": load.missing_image, "text": load.missing_report},
        "cautions": run.cautions,
        "figures": run.evaluation.to_dict(),
    }
    if recal is not None:
        result["recalibration"] = recal.to_dict()
    (run.out / "report.md").write_text(text + "\n", encoding="utf-8")
    (run.out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n", "utf-8")
