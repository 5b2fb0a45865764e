"""Manifests written as a hospital writes them, for tests."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_csv"]


def write_csv(path: Path, rows: list[dict], columns=("image", "report", "labels", "patient_id")):
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path
