"""Hospital data as tensors: the in-memory dataset, and a manifest's rows read into it.

Every row of a manifest is checked (:mod:`shared_model.manifest`) and its image decoded
(:mod:`shared_model.images`) once, up front, so a bad file is found before training
starts; the rows that pass become a :class:`FusionTensors`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from shared_model.images import decode_image
from shared_model.manifest import (
    REQUIRED_COLUMNS,
    DataLimits,
    LoadReport,
    ManifestError,
    RowError,
    check_row,
    read_manifest_rows,
)
from shared_model.text import Tokenizer

__all__ = ["FusionTensors", "ManifestReader", "load_manifest"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
Decode = Callable[[Path, int, int], torch.Tensor]  # (path, size, max_pixels) -> image
_DEFAULT_LIMITS = DataLimits()  # frozen: one shared default is safe


class FusionTensors(Dataset[Batch]):
    """Records held as tensors; an item is ``(image, report_ids, present, labels)``.

    Shapes: image ``(1, S, S)`` float32 in [0, 1]; report_ids ``(L,)`` int64;
    present ``(2,)`` float32 (image present, report present); labels ``(K,)`` float32.
    A missing image is all zeros and a missing report all padding, with ``present``
    saying so: the model never reads them.
    """

    def __init__(
        self,
        images: torch.Tensor,
        report_ids: torch.Tensor,
        present: torch.Tensor,
        labels: torch.Tensor,
        patient_ids: Sequence[str] | None = None,
    ) -> None:
        n = images.shape[0]
        if not (report_ids.shape[0] == present.shape[0] == labels.shape[0] == n):
            raise ValueError("images, report_ids, present and labels differ in length")
        self.images = images
        self.report_ids = report_ids
        self.present = present
        self.labels = labels
        self.patient_ids = list(patient_ids) if patient_ids is not None else None

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Batch:
        return self.images[index], self.report_ids[index], self.present[index], self.labels[index]

    def subset(self, indices: Sequence[int] | np.ndarray) -> FusionTensors:
        """The records at ``indices``, as a new dataset."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        pids = [self.patient_ids[i] for i in idx.tolist()] if self.patient_ids else None
        return FusionTensors(
            self.images[idx], self.report_ids[idx], self.present[idx], self.labels[idx], pids
        )


def load_manifest(
    manifest: str | Path,
    label_set: Sequence[str],
    tokenizer: Tokenizer,
    image_size: int,
    *,
    strict: bool = True,
    decode: Decode | None = None,
    limits: DataLimits = _DEFAULT_LIMITS,
    for_training: bool = True,
    progress: Callable[[], None] | None = None,
) -> tuple[FusionTensors, LoadReport]:
    """Read and decode every row of a manifest.

    With ``strict=True`` (the default) the first bad row raises :class:`ManifestError`
    naming the manifest, the row and the file. With ``strict=False`` bad rows are left
    out and listed in the returned :class:`LoadReport`. ``decode`` (default
    :func:`decode_image`) turns an image file into a tensor; a cache may stand in.
    :mod:`shared_model.manifest` lists what makes a row bad. ``for_training=False`` (a model
    applied to records): the labels column is not read, and a repeated row or image
    is allowed. ``progress`` is called once per row read.
    """
    reader = ManifestReader(
        manifest,
        label_set,
        tokenizer,
        image_size,
        strict=strict,
        decode=decode,
        limits=limits,
        for_training=for_training,
    )
    parts = list(reader.chunks(progress=progress))
    records = FusionTensors(
        torch.cat([p.images for p in parts]),
        torch.cat([p.report_ids for p in parts]),
        torch.cat([p.present for p in parts]),
        torch.cat([p.labels for p in parts]),
        [pid for p in parts for pid in p.patient_ids or []],
    )
    return records, reader.report


class ManifestReader:
    """Reads a manifest's rows in chunks (:func:`load_manifest` reads them all at once).

    A model applied to a long manifest holds one chunk of decoded images at a time.
    Repeated rows and images are found across chunks. :attr:`report` grows as the rows
    are read; the arguments are those of :func:`load_manifest`.
    """

    def __init__(
        self,
        manifest: str | Path,
        label_set: Sequence[str],
        tokenizer: Tokenizer,
        image_size: int,
        *,
        strict: bool = True,
        decode: Decode | None = None,
        limits: DataLimits = _DEFAULT_LIMITS,
        for_training: bool = True,
    ) -> None:
        self.manifest = Path(manifest).expanduser().resolve()
        required = REQUIRED_COLUMNS if for_training else ("image", "report")
        self.rows = read_manifest_rows(self.manifest, required)
        self.report = LoadReport(manifest=str(self.manifest), rows_total=len(self.rows))
        self._labels, self._tokenizer, self._size = tuple(label_set), tokenizer, image_size
        self._strict, self._decode, self._limits = strict, decode or decode_image, limits
        self._for_training = for_training
        self._seen_rows: dict[tuple[tuple[str, str], ...], int] = {}
        self._seen_images: dict[Path, int] = {}

    def chunks(
        self, chunk_rows: int | None = None, progress: Callable[[], None] | None = None
    ) -> Iterator[FusionTensors]:
        """The usable records, ``chunk_rows`` at a time (None: all in one).

        ManifestError (with the report) at the end when no row at all was usable.
        """
        batch: list[tuple[torch.Tensor, str, bool, np.ndarray, str]] = []
        for n, row in enumerate(self.rows, start=1):
            try:
                record = self._read(n, row)
            finally:
                if progress is not None:
                    progress()
            if record is None:
                continue
            batch.append(record)
            if chunk_rows is not None and len(batch) >= chunk_rows:
                yield self._tensors(batch)
                batch = []
        if batch:
            yield self._tensors(batch)
        elif not self.report.rows_ok:
            raise ManifestError(
                f"manifest {self.manifest}: no usable records ({self.report.rows_bad} bad)",
                self.report,
            )

    def _read(
        self, n: int, row: dict[str, str]
    ) -> tuple[torch.Tensor, str, bool, np.ndarray, str] | None:
        """Row ``n`` as (image, text, has image, multi-hot, patient), or None if refused."""
        try:
            checked = check_row(
                row,
                self.manifest.parent,
                self._labels,
                self._limits,
                for_training=self._for_training,
            )
            path = checked.image
            same = tuple(sorted((k or "", v or "") for k, v in row.items() if k is not None))
            if same in self._seen_rows and self._for_training:
                raise ValueError(
                    f"repeats row {self._seen_rows[same]} (counted twice, a record "
                    "would get half its privacy guarantee)"
                )
            if path is not None and path in self._seen_images and self._for_training:
                raise ValueError(f"uses the same image file as row {self._seen_images[path]}")
            if path is None:
                image = torch.zeros(1, self._size, self._size)
            else:
                image = self._decode(path, self._size, self._limits.max_pixels)
            self._seen_rows[same] = n
            if path is not None:
                self._seen_images[path] = n
        except ValueError as err:
            shown = (row.get("image") or "-").encode("utf-8", "backslashreplace").decode()
            error = RowError(row=n, file=shown, reason=str(err))
            if self._strict:
                raise ManifestError(f"manifest {self.manifest}, {error}") from err
            self.report.errors.append(error)
            return None
        self.report.rows_ok += 1
        self.report.missing_image += path is None
        self.report.missing_report += not checked.report
        return image, checked.report, path is not None, checked.labels, checked.unit

    def _tensors(
        self, batch: list[tuple[torch.Tensor, str, bool, np.ndarray, str]]
    ) -> FusionTensors:
        images, texts, has_image, labels, patients = zip(*batch, strict=True)
        report_ids, has_report = self._tokenizer.encode(list(texts))
        present = torch.stack([torch.tensor(has_image, dtype=torch.float32), has_report.float()], 1)
        return FusionTensors(
            torch.stack(images),
            report_ids,
            present,
            torch.from_numpy(np.stack(labels)),
            list(patients),
        )
