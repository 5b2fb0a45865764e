"""Real radiology reports: the Indiana University chest X-ray collection (Open-i).

3,955 de-identified reports ship inside the ``torchxrayvision==1.5.7`` package. They are
licensed CC BY-NC-ND 4.0, so they are read from the installed package at run time and
never copied into this repository. Each report's MeSH ``<major>`` terms map to the label
set below.

The text input is the report's INDICATION by default: the patient's history and the
referring physician's question, written before anyone read the image (3,775 of the 3,860
labelled reports have one, 3,556 once redactions are removed; the rest are records
without text). The FINDINGS and IMPRESSION sections are what the MeSH terms were indexed
from, so a model given them re-reads its labels; they are used only when asked for
(``data.text-source = report``).

The collection's de-identification replaced ages, dates and names with ``XXXX``. Every
such token is removed, not kept as a special token: it is the same string wherever
anything was redacted, so it carries no information, and no hospital's own text has it.
An indication left with no word once it is removed ("XXXX.") counts as missing.
"""

from __future__ import annotations

import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from shared_model.config.run import TEXT_SOURCES

__all__ = [
    "EMBEDDED_LABELS",
    "PUBLIC_PREVALENCE",
    "TEXT_SOURCES",
    "Report",
    "clean_text",
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

_REDACTED = re.compile(r"X{2,}")  # the collection's de-identification token, "XXXX"


def clean_text(text: str) -> str:
    """``text`` with every de-identification token removed; "" if no word is left."""
    text = _REDACTED.sub(" ", text)
    text = re.sub(r"(^|\s)[-/]+", r"\1", text)  # "XXXX-year-old" -> "year-old"
    text = re.sub(r"\s+([.,;:])", r"\1", " ".join(text.split()))  # "male, ." -> "male,."
    return text if re.search(r"[A-Za-z]{2}", text) else ""


@dataclass(frozen=True)
class Report:
    """One real report: its id, its sections (each may be empty) and its label names."""

    uid: str
    indication: str  # history and question, written before the image was read
    findings: str  # FINDINGS and IMPRESSION: what the labels were indexed from
    labels: tuple[str, ...]

    def text(self, source: str = "indication") -> str:
        """The model's text input for ``data.text-source``."""
        if source == "indication":
            return self.indication
        if source == "report":
            return self.findings
        raise ValueError(f"text source {source!r} is not one of {', '.join(TEXT_SOURCES)}")


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
            findings = " ".join(
                s for s in (sections.get("FINDINGS"), sections.get("IMPRESSION")) if s
            )
            reports.append(
                Report(
                    uid=Path(member.name).stem,
                    indication=clean_text(sections.get("INDICATION") or ""),
                    findings=clean_text(findings),
                    labels=labels,
                )
            )
    reports.sort(key=lambda r: int(r.uid) if r.uid.isdigit() else r.uid)
    return tuple(reports)


def label_prevalence(reports: tuple[Report, ...] | None = None) -> dict[str, float]:
    """Share of reports carrying each label, over the whole public corpus."""
    reports = load_reports() if reports is None else reports
    return {
        label: sum(label in r.labels for r in reports) / len(reports) for label in EMBEDDED_LABELS
    }
