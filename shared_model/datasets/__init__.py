"""The embedded default data: real report text with synthetic phantoms, split into hospitals.

What is real: the clinical text and the labels (3,860 labelled Indiana University chest
X-ray reports; the text input is each report's indication, see
:mod:`shared_model.datasets.iu_reports`). What is synthetic: every image (a phantom drawn
from the report's labels, see :mod:`shared_model.datasets.phantoms`). Everything is
deterministic from the seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from shared_model.config import DataConfig, ModelConfig
from shared_model.data import FusionTensors
from shared_model.datasets.iu_reports import (
    EMBEDDED_LABELS,
    PUBLIC_PREVALENCE,
    Report,
    load_reports,
)
from shared_model.datasets.phantoms import hospital_acquisition, render_phantom
from shared_model.manifest import labels_to_multi_hot
from shared_model.split import embedded_split_spec, split_records
from shared_model.text import tokenizer_for

__all__ = [
    "EMBEDDED_LABELS",
    "HospitalSplit",
    "dirichlet_partition",
    "embedded_hospital",
    "embedded_records",
]


@dataclass(frozen=True)
class HospitalSplit:
    """What one hospital trains on, and the held-out part a run evaluates on.

    ``test`` is the part ``data.holdout`` names: the test part, or the validation part.
    """

    train: FusionTensors
    test: FusionTensors


def dirichlet_partition(
    label_sets: Sequence[Sequence[str]],
    num_partitions: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Split records across hospitals with Dirichlet label skew (Hsu et al., 2019).

    A multi-label record is assigned by its rarest label (by public prevalence), so that
    rare findings, not "normal", drive the skew. Every hospital gets at least
    ``min_size`` records; the draw is repeated (deterministically) until that holds.
    """
    n = len(label_sets)
    if num_partitions < 1 or n < num_partitions * min_size:
        raise ValueError(
            f"cannot split {n} records into {num_partitions} hospitals of at least "
            f"{min_size} records each"
        )
    primary = np.array(
        [
            min(labels, key=lambda lab: PUBLIC_PREVALENCE.get(lab, 1.0)) if labels else ""
            for labels in label_sets
        ]
    )
    rng = np.random.default_rng([seed, 1013])
    for _attempt in range(100):
        parts: list[list[int]] = [[] for _ in range(num_partitions)]
        for cls in np.unique(primary):
            idx = np.flatnonzero(primary == cls)
            rng.shuffle(idx)
            shares = rng.dirichlet(np.full(num_partitions, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts), strict=True):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {n} records gives every one of "
        f"{num_partitions} hospitals {min_size} records; raise data.dirichlet-alpha"
    )


def embedded_hospital(
    partition_id: int,
    num_partitions: int,
    model: ModelConfig,
    data: DataConfig,
    seed: int,
) -> HospitalSplit:
    """One simulated hospital's training records and the held-out part the run evaluates.

    Split as the simulated hospital splits them (:func:`embedded_split_spec`).
    """
    records = embedded_records(partition_id, num_partitions, model, data, seed)
    spec = embedded_split_spec(seed, partition_id, data.test_fraction, data.holdout)
    parts = split_records(records, spec)
    return HospitalSplit(train=parts.train, test=parts.held_out(data.holdout))


def _studies(report: Report, data: DataConfig, seed: int) -> int:
    """How many studies the patient of ``report`` has (data.min-studies to max-studies)."""
    if data.max_studies == data.min_studies:
        return data.min_studies
    rng = np.random.default_rng([seed, int(report.uid), 29])
    return int(rng.integers(data.min_studies, data.max_studies + 1))


def embedded_records(
    partition_id: int,
    num_partitions: int,
    model: ModelConfig,
    data: DataConfig,
    seed: int,
) -> FusionTensors:
    """Records of one simulated hospital: its reports, phantoms, tokens and labels."""
    unknown = [lab for lab in model.labels if lab not in EMBEDDED_LABELS]
    if unknown:
        raise ValueError(
            f"model.labels {unknown} are not in the embedded data's label set "
            f"{', '.join(EMBEDDED_LABELS)}"
        )
    reports = load_reports()
    if data.max_reports:
        reports = reports[: data.max_reports]
    parts = dirichlet_partition(
        [r.labels for r in reports], num_partitions, data.dirichlet_alpha, seed
    )
    patients = [reports[i] for i in parts[partition_id]]
    studies = [_studies(r, data, seed) for r in patients]
    mine = [r for r, k in zip(patients, studies, strict=True) for _ in range(k)]
    acquisition = hospital_acquisition(seed, partition_id)
    images = torch.from_numpy(
        np.stack(
            [
                # Seeded by the report (and study), so a phantom's anatomy does not depend
                # on which hospital it lands in; the scanner (acquisition) does.
                render_phantom(
                    r.labels,
                    np.random.default_rng([seed, int(r.uid)] + ([study] if study else [])),
                    model.image_size,
                    acquisition,
                )
                for r, k in zip(patients, studies, strict=True)
                for study in range(k)
            ]
        )[:, None]
    )
    report_ids, has_report = tokenizer_for(model).encode([r.text(data.text_source) for r in mine])
    present = torch.stack([torch.ones(len(mine)), has_report.float()], dim=1)
    labels = torch.from_numpy(
        np.stack(
            [
                labels_to_multi_hot([x for x in r.labels if x in model.labels], model.labels)
                for r in mine
            ]
        )
    )
    return FusionTensors(images, report_ids, present, labels, [r.uid for r in mine])
