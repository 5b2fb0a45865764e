"""Real radiology reports: the Indiana University chest X-ray collection (Open-i).

3,955 de-identified reports ship inside the ``torchxrayvision==1.5.7`` package. They are
licensed CC BY-NC-ND 4.0, so they are read from the installed package at run time and
never copied into this repository. Each report's FINDINGS and IMPRESSION sections become
the report text; its MeSH ``<major>`` terms map to the label set below.
"""

from __future__ import annotations

import importlib.util
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

__all__ = [
    "EMBEDDED_LABELS",
    "PUBLIC_PREVALENCE",
    "Report",
    "label_prevalence",
    "load_reports",
    "reports_archive",
]

EMBEDDED_LABELS = (
    "normal",
    "cardiomegaly",
    "opacity",
    "atelectasis",
    "effusion",
    "nodule",
    "other",
)

# Label prevalence over the whole public corpus, rounded. Stored so that a hospital with
# its own data can use this public prior without the corpus installed;
# tests/shared_model/test_datasets.py recomputes it from the corpus.
PUBLIC_PREVALENCE = {
    "normal": 0.3604,
    "cardiomegaly": 0.0972,
    "opacity": 0.1725,
    "atelectasis": 0.0860,
    "effusion": 0.0417,
    "nodule": 0.1332,
    "other": 0.5464,
}

# First component of a MeSH <major> term (before the first "/") -> label.
# Terms not listed here count as "other"; "no indexing" means the report is unlabelled.
_MESH_TO_LABEL = {
    "normal": "normal",
    "cardiomegaly": "cardiomegaly",
    "opacity": "opacity",
    "airspace disease": "opacity",
    "infiltrate": "opacity",
    "consolidation": "opacity",
    "pneumonia": "opacity",
    "density": "opacity",
    "pulmonary atelectasis": "atelectasis",
    "pleural effusion": "effusion",
    "nodule": "nodule",
    "calcified granuloma": "nodule",
    "granuloma": "nodule",
    "granulomatous disease": "nodule",
    "mass": "nodule",
}
_UNLABELLED = "no indexing"


@dataclass(frozen=True)
class Report:
    """One real report: its id, text (may be empty) and label names."""

    uid: str
    text: str
    labels: tuple[str, ...]


def reports_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision package.

    The package is located without importing it: its import pulls torchvision, which
    has no build compatible with the pinned CPU torch.
    """
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded default data needs the Indiana University reports shipped in "
            "torchxrayvision==1.5.7. Install it without its dependencies: "
            "`pip install --no-deps torchxrayvision==1.5.7` (`make simulate` does this)."
        )
    path = Path(spec.submodule_search_locations[0]) / "data" / "NLMCXR_reports.tgz"
    if not path.is_file():
        raise RuntimeError(f"torchxrayvision is installed but {path} is missing")
    return path


def map_mesh_terms(majors: list[str]) -> tuple[str, ...] | None:
    """Map a report's MeSH major terms to labels; None when the report is unlabelled."""
    heads = [m.split("/")[0].strip().lower() for m in majors if m and m.strip()]
    if not heads or heads == [_UNLABELLED]:
        return None
    labels = {_MESH_TO_LABEL.get(h, "other") for h in heads if h != _UNLABELLED}
    if "normal" in labels and len(labels) > 1:
        labels.discard("normal")  # "normal" plus a finding is a finding
    return tuple(label for label in EMBEDDED_LABELS if label in labels)


@lru_cache(maxsize=1)
def load_reports() -> tuple[Report, ...]:
    """All labelled reports, in a stable order (by numeric report id)."""
    reports: list[Report] = []
    with tarfile.open(reports_archive()) as archive:
        for member in archive:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            handle = archive.extractfile(member)
            if handle is None:
                continue
            root = ET.fromstring(handle.read())
            labels = map_mesh_terms([e.text or "" for e in root.iter("major")])
            if labels is None:
                continue  # unlabelled ("no indexing"); counted by embedded_summary()
            sections = {e.get("Label"): (e.text or "").strip() for e in root.iter("AbstractText")}
            text = " ".join(s for s in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if s)
            reports.append(Report(uid=Path(member.name).stem, text=text, labels=labels))
    reports.sort(key=lambda r: int(r.uid) if r.uid.isdigit() else r.uid)
    return tuple(reports)


def label_prevalence(reports: tuple[Report, ...] | None = None) -> dict[str, float]:
    """Share of reports carrying each label, over the whole public corpus."""
    reports = load_reports() if reports is None else reports
    return {
        label: sum(label in r.labels for r in reports) / len(reports) for label in EMBEDDED_LABELS
    }
