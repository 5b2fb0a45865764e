"""A hospital's manifest: its columns, its limits, and what makes one of its rows bad.

A hospital's own data is described by a manifest (CSV or JSONL) with the columns

- ``image``: path of a PNG, JPEG or DICOM file, relative to the manifest (may be blank:
  the radiograph is missing for that record);
- ``report``: the report text (may be blank: the report is missing);
- ``labels``: finding names separated by ``|`` (blank: none of the labels);
- ``patient_id`` (optional): keeps one patient's records together in one part of the
  hospital's split (without it, each record is placed by its image file or report).

Every row is decoded once, up front, so a bad file is found before training starts.
A bad row raises :class:`ManifestError` naming the manifest, the row and the file; with
``strict=False`` bad rows are left out, counted and listed in the :class:`LoadReport`,
never dropped silently. A row is bad when its image cannot be decoded (missing, empty,
truncated, not an image, a DICOM without pixels or in a transfer syntax no installed
decoder reads), lies outside the manifest's folder, or has more pixels than
:attr:`DataLimits.max_pixels` (checked from the header, before decoding: decompression
bombs); when its report is longer than :attr:`DataLimits.max_report_chars` or its text
is not UTF-8; when a label is unknown; when it repeats an earlier row, or uses an earlier
row's image file (a record counted twice would get half its privacy guarantee); or
when it has neither an image nor a report. A blank image or report alone is a missing
modality, which the model is trained to handle: counted in the report, not an error.

This module reads the rows as text and checks each by itself; decoding is
:mod:`shared_model.images`, and the checks across rows with the tensors they make are
:mod:`shared_model.data`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "RECORD_KEY",
    "REQUIRED_COLUMNS",
    "DataLimits",
    "LoadReport",
    "ManifestError",
    "ManifestRow",
    "RowError",
    "check_row",
    "labels_to_multi_hot",
    "read_manifest_rows",
]

REQUIRED_COLUMNS = ("image", "report", "labels")


# The prefix of a record's own key, where its row has no patient id (_record_key)
RECORD_KEY = "record:"


class ManifestError(ValueError):
    """A manifest or one of its rows cannot be used. The message names file and row.

    ``report`` holds what a non-strict load found when no row at all was usable.
    """

    def __init__(self, message: str, report: LoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class DataLimits:
    """What a hospital's data may be (``data.max-image-pixels``, ``data.max-report-chars``)."""

    max_pixels: int = 100_000_000
    max_report_chars: int = 100_000


@dataclass(frozen=True)
class RowError:
    """Why one manifest row was refused."""

    row: int  # 1-based data row (the CSV header is row 0)
    file: str
    reason: str

    def __str__(self) -> str:
        return f"row {self.row} ({self.file}): {self.reason}"


@dataclass
class LoadReport:
    """What a manifest load found: rows used, rows refused and why, missing modalities."""

    manifest: str
    rows_total: int = 0
    rows_ok: int = 0
    missing_image: int = 0
    missing_report: int = 0
    errors: list[RowError] = field(default_factory=list)

    @property
    def rows_bad(self) -> int:
        """Rows that were refused."""
        return len(self.errors)


def labels_to_multi_hot(names: Sequence[str], label_set: Sequence[str]) -> np.ndarray:
    """Multi-hot vector of ``names`` over ``label_set``; unknown names raise ValueError."""
    index = {label: i for i, label in enumerate(label_set)}
    vec = np.zeros(len(label_set), dtype=np.float32)
    for name in names:
        if name not in index:
            raise ValueError(f"unknown label '{name}' (known: {', '.join(label_set)})")
        vec[index[name]] = 1.0
    return vec


def read_manifest_rows(
    manifest: Path, required: Sequence[str] = REQUIRED_COLUMNS
) -> list[dict[str, str]]:
    """The manifest's rows as text; ManifestError if the file or its columns are unusable."""
    if not manifest.is_file():
        raise ManifestError(f"manifest {manifest} does not exist")
    suffix = manifest.suffix.lower()
    # Bytes that are not UTF-8 are kept as lone surrogates, so that the row holding them
    # is refused by itself (see _row_texts) instead of the whole manifest.
    text = manifest.read_bytes().decode("utf-8", "surrogateescape")
    if suffix == ".csv":
        # The csv module refuses fields over 128 KiB, which would fail the whole manifest
        # on one long report: read them, and let check_row refuse that row by itself.
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        reader = csv.DictReader(text.splitlines())
        try:
            columns = reader.fieldnames or []
            rows = list(reader)
        except csv.Error as err:
            raise ManifestError(
                f"manifest {manifest} line {reader.line_num}: not valid CSV ({err})"
            ) from err
    elif suffix in {".jsonl", ".ndjson"}:
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"manifest {manifest} line {n}: invalid JSON ({err})") from err
            if not isinstance(obj, dict):
                raise ManifestError(f"manifest {manifest} line {n}: expected a JSON object")
            rows.append({k: "" if v is None else str(v) for k, v in obj.items()})
        columns = sorted({k for row in rows for k in row}) if rows else []
    else:
        raise ManifestError(f"manifest {manifest}: expected a .csv or .jsonl file")
    if not rows:
        raise ManifestError(f"manifest {manifest} has no records")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ManifestError(
            f"manifest {manifest} lacks column(s) {', '.join(missing)} "
            f"(required: {', '.join(required)})"
        )
    return rows


@dataclass(frozen=True)
class ManifestRow:
    """One row's fields, each checked; the image file is not yet decoded."""

    image: Path | None  # resolved, inside the manifest's folder; None: the image is missing
    report: str  # stripped; empty: the report is missing
    labels: np.ndarray  # multi-hot over the label set; all zeros where labels are not read
    unit: str  # the patient id, else the record's own key (see _record_key)


def check_row(
    row: dict[str, str],
    root: Path,
    label_set: Sequence[str],
    limits: DataLimits,
    *,
    for_training: bool = True,
) -> ManifestRow:
    """Row ``row`` of a manifest in folder ``root``, checked by itself.

    ValueError with the first reason the row is bad. What only other rows can show (a
    repeated row or image file) and whether the image decodes are for the caller.
    ``for_training=False``: the labels column is not read.
    """
    fields = _row_texts(row)  # every column, not only the ones read below
    path = _row_image_path(root, fields.get("image", ""))
    text = fields.get("report", "")
    if len(text) > limits.max_report_chars:
        raise ValueError(
            f"report of {len(text):,} characters exceeds data.max-report-chars "
            f"{limits.max_report_chars:,}"
        )
    if path is None and not text:
        raise ValueError("row has neither an image nor a report")
    labels = fields.get("labels", "") if for_training else ""  # predict: unread
    names = [s.strip() for s in labels.split("|") if s.strip()]
    multi_hot = labels_to_multi_hot(names, label_set)
    unit = fields.get("patient_id", "").strip() or _record_key(path, root, text)
    return ManifestRow(path, text, multi_hot, unit)


_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # bytes decoded with surrogateescape


def _row_texts(row: dict[str, str]) -> dict[str, str]:
    """Each column's text, stripped; ValueError naming the first column not in UTF-8."""
    texts = {}
    for column, value in row.items():
        if column is None:  # the csv module's list of surplus fields
            continue
        text = (value or "").strip()
        if bad := _NOT_UTF8.search(text):
            byte = ord(bad.group()) - 0xDC00
            raise ValueError(
                f"the {column} is not UTF-8 text (byte 0x{byte:02x} at character {bad.start()})"
            )
        texts[column] = text
    return texts


def _record_key(image: Path | None, root: Path, text: str) -> str:
    """A record's own key where it has no patient id: its image file, else its report.

    The image's path relative to the manifest's folder, however the row spells it (never
    the row number), so rows added, reordered or rewritten later do not move it in the
    hospital's split.
    """
    if image is not None:
        return f"{RECORD_KEY}image:{image.relative_to(root).as_posix()}"
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{RECORD_KEY}report:{digest}"


def _row_image_path(root: Path, rel: str) -> Path | None:
    """The row's image file (None if blank); ValueError if it lies outside ``root``."""
    if not rel:
        return None
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {rel!r} points outside the manifest's directory")
    return path
