"""Write embedded records out as a hospital would hold them: PNG files plus a manifest.

A deployment test or benchmark, or a hospital IT team trying `fedfusion hospital`
before its own data is ready, needs data in the manifest format. This writes a slice of
the embedded corpus (real Indiana University reports, phantom radiographs drawn from
each report's labels) as ``<uid>.png`` files and ``manifest.csv``, whose ``report`` column
holds the clinical indication.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from shared_model.config import RunConfig
from shared_model.datasets import embedded_hospital
from shared_model.datasets.iu_reports import TEXT_SOURCES, Report, load_reports
from shared_model.datasets.phantoms import hospital_acquisition, render_phantom

__all__ = ["write_held_out", "write_manifest"]

_COLUMNS = ["image", "report", "labels", "patient_id"]


def _write(
    folder: Path,
    reports: Sequence[Report],
    render: Callable[[Report], np.ndarray],
    text_source: str,
) -> Path:
    """``<uid>.png`` per report and ``manifest.csv`` in ``folder``; returns the CSV."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for report in reports:
        image = render(report)
        Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / f"{report.uid}.png")
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
        writer = csv.DictWriter(handle, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return manifest


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
    acquisition = hospital_acquisition(0, hospital)
    return _write(
        folder,
        reports,
        lambda r: render_phantom(
            r.labels, np.random.default_rng(int(r.uid)), image_size, acquisition
        ),
        text_source,
    )


def write_held_out(folder: Path, run: RunConfig, hospitals: int) -> list[Path]:
    """Each simulated hospital's held-out test records of a `fedfusion simulate` run.

    The same records, phantoms and text as the run's hospitals held out (never trained
    on, whatever ``data.holdout`` says), as ``folder/hospital-N/manifest.csv``: a test
    set for `fedfusion evaluate` that the run's model has not seen.
    """
    known = set(run.model.labels)  # as the simulated hospitals read them
    by_uid = {
        r.uid: dataclasses.replace(r, labels=tuple(x for x in r.labels if x in known))
        for r in load_reports()
    }
    data = dataclasses.replace(run.data, holdout="test")
    manifests = []
    for i in range(hospitals):
        held_out = embedded_hospital(i, hospitals, run.model, data, run.seed).test
        acquisition = hospital_acquisition(run.seed, i)
        manifests.append(
            _write(
                Path(folder) / f"hospital-{i}",
                # one study per patient (the first), as each patient's file is <uid>.png
                [by_uid[uid] for uid in dict.fromkeys(held_out.patient_ids or [])],
                lambda r, a=acquisition: render_phantom(
                    r.labels, np.random.default_rng([run.seed, int(r.uid)]), run.model.image_size, a
                ),
                run.data.text_source,
            )
        )
    return manifests
