"""Applying a bundle's model to records: one record, or every row of a manifest.

Records are read by the training code's own loader (:func:`shared_model.data.load_manifest`,
:func:`shared_model.images.decode_image`) and tokenizer, so a record is preprocessed
exactly as the federation's held-out records were. A row that cannot be read is never
skipped silently: it comes back with its error, naming the row and the file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared_model.data import FusionTensors, ManifestReader
from shared_model.images import decode_image
from shared_model.inference.loaded import LoadedModel
from shared_model.manifest import LoadReport

__all__ = [
    "ManifestOutputs",
    "Prediction",
    "Progress",
    "manifest_outputs",
    "predict_manifest",
    "predict_record",
]

# progress(stage, n): n more records done in stage "reading" (decoding) or "predicting"
Progress = Callable[[str, int], None]


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """One record's result: probabilities and decisions per label, or why it failed."""

    row: int  # 1-based manifest row (0 for a single record)
    image: str  # as the manifest names it ("" when missing)
    patient_id: str
    probabilities: dict[str, float] | None  # None when the row could not be read
    decisions: dict[str, bool] | None
    error: str = ""

    @property
    def findings(self) -> list[str]:
        """The labels decided positive."""
        return [k for k, v in (self.decisions or {}).items() if v]


# Records decoded and held at once: a long manifest never sits in memory whole.
CHUNK_ROWS = 1024


@dataclass(frozen=True, kw_only=True)
class ManifestOutputs:
    """The model's logits for a manifest's usable rows, their labels, and what was refused."""

    logits: np.ndarray  # (n, K), the usable rows in manifest order
    targets: np.ndarray  # (n, K) multi-hot (zeros where the manifest has no labels)
    report: LoadReport
    rows: list[dict[str, str]]  # every manifest row, as text


def manifest_outputs(
    loaded: LoadedModel,
    manifest: Path,
    *,
    with_labels: bool,
    progress: Progress | None = None,
) -> ManifestOutputs:
    """The model's outputs for every usable row of ``manifest``, read in chunks.

    Bad rows are listed in the report (never dropped silently). ``with_labels``: the
    labels column is required and a repeated row or image refused (an evaluation would
    count it twice). ManifestError when the manifest or every row is unusable.
    """
    cfg = loaded.bundle.model
    reader = ManifestReader(
        manifest,
        cfg.labels,
        loaded.tokenizer,
        cfg.image_size,
        strict=False,
        for_training=with_labels,
    )
    read = None if progress is None else lambda: progress("reading", 1)
    logits, targets = [], []
    for chunk in reader.chunks(CHUNK_ROWS, progress=read):
        logits.append(loaded.logits(chunk, _stage(progress, "predicting")))
        targets.append(chunk.labels.numpy().astype(np.float64))
    return ManifestOutputs(
        logits=np.concatenate(logits),
        targets=np.concatenate(targets),
        report=reader.report,
        rows=reader.rows,
    )


def _results(
    loaded: LoadedModel, logits: np.ndarray
) -> tuple[list[dict[str, float]], list[dict[str, bool]]]:
    labels = loaded.bundle.labels
    probs, decided = loaded.probabilities(logits), loaded.decisions(logits)
    return (
        [dict(zip(labels, map(float, p), strict=True)) for p in probs],
        [dict(zip(labels, map(bool, d), strict=True)) for d in decided],
    )


def predict_manifest(
    loaded: LoadedModel,
    manifest: Path,
    progress: Progress | None = None,
) -> tuple[list[Prediction], LoadReport]:
    """A prediction for every row of ``manifest``, in its order; bad rows carry their error."""
    out = manifest_outputs(loaded, manifest, with_labels=False, progress=progress)
    probabilities, decisions = _results(loaded, out.logits)
    errors = {e.row: e.reason for e in out.report.errors}
    results, used = [], iter(range(len(out.logits)))
    for n, row in enumerate(out.rows, start=1):
        common = {
            "row": n,
            "image": row.get("image") or "",
            "patient_id": row.get("patient_id") or "",
        }
        if n in errors:
            results.append(
                Prediction(**common, probabilities=None, decisions=None, error=errors[n])
            )
            continue
        i = next(used)
        results.append(Prediction(**common, probabilities=probabilities[i], decisions=decisions[i]))
    return results, out.report


def predict_record(loaded: LoadedModel, image: Path | None, text: str) -> Prediction:
    """The prediction for one record; ValueError names the image file and the problem."""
    cfg = loaded.bundle.model
    text = text.strip()
    if image is None and not text:
        raise ValueError(
            "no input: give an image (--image), a clinical text (--text), or both "
            "(an empty text is a missing one)"
        )
    if image is None:
        pixels = torch.zeros(1, 1, cfg.image_size, cfg.image_size)
    else:
        try:
            pixels = decode_image(Path(image).expanduser(), cfg.image_size)[None]
        except ValueError as err:
            raise ValueError(f"image {image}: {err}") from err
    report_ids, has_report = loaded.tokenizer.encode([text])
    present = torch.tensor([[float(image is not None), float(has_report[0])]])
    records = FusionTensors(pixels, report_ids, present, torch.zeros(1, len(cfg.labels)))
    probabilities, decisions = _results(loaded, loaded.logits(records))
    return Prediction(
        row=0,
        image=str(image or ""),
        patient_id="",
        probabilities=probabilities[0],
        decisions=decisions[0],
    )


def _stage(progress: Progress | None, stage: str) -> Callable[[int], None] | None:
    """``progress`` bound to one stage (None stays None)."""
    return None if progress is None else lambda n: progress(stage, n)
