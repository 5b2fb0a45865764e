"""Write embedded records out as a hospital would hold them: PNG files plus a manifest.

A deployment test or benchmark, or a hospital IT team trying `fedfusion hospital`
before its own data is ready, needs data in the manifest format. This writes a slice of
the embedded corpus (real Indiana University reports, phantom radiographs drawn from
each report's labels) as ``<uid>.png`` files and ``manifest.csv``, whose ``report`` column
holds the clinical indication.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from shared_model.datasets.iu_reports import TEXT_SOURCES, load_reports
from shared_model.datasets.phantoms import hospital_acquisition, render_phantom

__all__ = ["write_manifest"]


def write_manifest(
    folder: Path,
    hospital: int,
    records: int,
    image_size: int = 64,
    text_source: str = "indication",
) -> Path:
    """Write hospital ``hospital``'s slice of ``records`` reports to ``folder``; returns the CSV.

    The manifest's ``report`` column holds each record's clinical text: its indication
    by default (blank where the report has none), or its findings (``text_source``).
    """
    if text_source not in TEXT_SOURCES:
        raise ValueError(f"text source {text_source!r} is not one of {', '.join(TEXT_SOURCES)}")
    reports = load_reports()[hospital * records : (hospital + 1) * records]
    if len(reports) < records:
        raise ValueError(f"the embedded corpus has no {records} reports for hospital {hospital}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for report in reports:
        image = render_phantom(
            report.labels,
            np.random.default_rng(int(report.uid)),
            image_size,
            hospital_acquisition(0, hospital),
        )
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{report.uid}.png")
        rows.append(
            {
                "image": f"{report.uid}.png",
                "report": report.text(text_source),
                "labels": "|".join(report.labels),
                "patient_id": report.uid,
            }
        )
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "report", "labels", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
