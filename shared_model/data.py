"""Hospital data: the in-memory tensor dataset, the manifest loader and image decoding.

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
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from shared_model.text import Tokenizer

__all__ = [
    "REQUIRED_COLUMNS",
    "DataLimits",
    "FusionTensors",
    "LoadReport",
    "ManifestError",
    "ManifestReader",
    "RowError",
    "decode_image",
    "labels_to_multi_hot",
    "load_manifest",
    "read_manifest_rows",
]

REQUIRED_COLUMNS = ("image", "report", "labels")
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


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


def labels_to_multi_hot(names: Sequence[str], label_set: Sequence[str]) -> np.ndarray:
    """Multi-hot vector of ``names`` over ``label_set``; unknown names raise ValueError."""
    index = {label: i for i, label in enumerate(label_set)}
    vec = np.zeros(len(label_set), dtype=np.float32)
    for name in names:
        if name not in index:
            raise ValueError(f"unknown label '{name}' (known: {', '.join(label_set)})")
        vec[index[name]] = 1.0
    return vec


# ------------------------------------------------------------------------ decoding


def decode_image(path: Path, size: int, max_pixels: int = DataLimits.max_pixels) -> torch.Tensor:
    """Decode a PNG, JPEG or DICOM radiograph to ``(1, size, size)`` float32 in [0, 1].

    DICOM pixel values go through the modality (rescale) and VOI LUTs, and MONOCHROME1
    images are inverted, so bright always means dense. An image whose header declares
    more than ``max_pixels`` pixels is refused before its pixels are decoded. Raises
    ValueError with the reason.
    """
    if path.is_dir():
        raise ValueError("is a folder, not an image file")
    if not path.is_file():
        raise ValueError("file not found")
    if path.stat().st_size == 0:
        raise ValueError("file is empty (0 bytes)")
    read = _read_dicom if _is_dicom(path) else _read_raster
    pixels = read(path, max_pixels)
    if pixels.ndim != 2 or min(pixels.shape) < 2:
        raise ValueError(f"expected a 2-D grayscale image, got shape {pixels.shape}")
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    scaled = np.clip((pixels - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(pixels)
    tensor = torch.from_numpy(scaled.astype(np.float32))[None, None]
    resized = torch.nn.functional.interpolate(
        tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].clamp_(0.0, 1.0)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in {".dcm", ".dicom"}:
        return True
    with path.open("rb") as handle:
        head = handle.read(132)
    return head[128:132] == b"DICM"


class _TooManyPixelsError(ValueError):
    """An image header declares more pixels than ``data.max-image-pixels`` allows."""


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise _TooManyPixelsError(
            f"image of {width} x {height} = {width * height:,} pixels exceeds the limit of "
            f"{max_pixels:,} (data.max-image-pixels); refused before decoding, as a "
            "possible decompression bomb"
        )


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    # pydicom loads with the first DICOM file: most data sets hold PNG or JPEG
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises several types for a damaged file
        raise ValueError(f"not a readable DICOM file ({err})") from err
    if "PixelData" not in ds:
        raise ValueError("DICOM file has no pixel data")
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError("DICOM file does not say its image size (Rows, Columns)") from err
    _check_pixels(columns, rows, max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as err:  # unsupported transfer syntax, truncated pixel data, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        detail = " ".join(str(err).split())  # pydicom lists each decoder on its own line
        raise ValueError(
            f"cannot decode DICOM pixel data (transfer syntax {syntax}): {detail}"
        ) from err
    if getattr(ds, "NumberOfFrames", 1) not in (None, "", 1, "1"):
        raise ValueError(f"multi-frame DICOM ({ds.NumberOfFrames} frames) is not a radiograph")
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric not in {"MONOCHROME1", "MONOCHROME2"}:
        raise ValueError(f"unsupported DICOM photometric interpretation {photometric}")
    try:
        values = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    except Exception as err:  # damaged rescale or window attributes (wrong types, lengths)
        detail = " ".join(str(err).split())
        raise ValueError(
            f"cannot apply the DICOM rescale or window settings (modality/VOI LUT): {detail}"
        ) from err
    if photometric == "MONOCHROME1":  # low values are bright: invert
        values = values.max() - values
    return values


def _read_raster(path: Path, max_pixels: int) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check warns, and refuses at twice its limit: ours decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                _check_pixels(*img.size, max_pixels)  # from the header, nothing decoded yet
                img.load()  # force a full decode: a truncated file fails here, not later
                if img.mode in {"RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"}:
                    img = img.convert("L")
                return np.asarray(img, dtype=np.float64)
    except _TooManyPixelsError:
        raise
    except Image.DecompressionBombError as err:  # above twice Pillow's own limit
        raise ValueError(
            f"refused before decoding as a possible decompression bomb: {err}"
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"not a readable PNG/JPEG image ({err})") from err


# ------------------------------------------------------------------------ manifests


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
        # on one long report: read them, and let load_manifest refuse that row by itself.
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


Decode = Callable[[Path, int, int], torch.Tensor]  # (path, size, max_pixels) -> image


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


def load_manifest(
    manifest: str | Path,
    label_set: Sequence[str],
    tokenizer: Tokenizer,
    image_size: int,
    *,
    strict: bool = True,
    decode: Decode | None = None,
    limits: DataLimits = DataLimits(),
    for_training: bool = True,
    progress: Callable[[], None] | None = None,
) -> tuple[FusionTensors, LoadReport]:
    """Read and decode every row of a manifest.

    With ``strict=True`` (the default) the first bad row raises :class:`ManifestError`
    naming the manifest, the row and the file. With ``strict=False`` bad rows are left
    out and listed in the returned :class:`LoadReport`. ``decode`` (default
    :func:`decode_image`) turns an image file into a tensor; a cache may stand in.
    The module docstring lists what makes a row bad. ``for_training=False`` (a model
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
        limits: DataLimits = DataLimits(),
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
        limits = self._limits
        try:
            fields = _row_texts(row)  # every column, not only the ones read below
            path = _row_image_path(self.manifest.parent, fields.get("image", ""))
            text = fields.get("report", "")
            if len(text) > limits.max_report_chars:
                raise ValueError(
                    f"report of {len(text):,} characters exceeds data.max-report-chars "
                    f"{limits.max_report_chars:,}"
                )
            if path is None and not text:
                raise ValueError("row has neither an image nor a report")
            labels = fields.get("labels", "") if self._for_training else ""  # predict: unread
            names = [s.strip() for s in labels.split("|") if s.strip()]
            multi_hot = labels_to_multi_hot(names, self._labels)
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
                image = self._decode(path, self._size, limits.max_pixels)
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
        self.report.missing_report += not text
        unit = fields.get("patient_id", "").strip() or _record_key(path, self.manifest.parent, text)
        return image, text, path is not None, multi_hot, unit

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


def _record_key(image: Path | None, root: Path, text: str) -> str:
    """A record's own key where it has no patient id: its image file, else its report.

    The image's path relative to the manifest's folder, however the row spells it (never
    the row number), so rows added, reordered or rewritten later do not move it in the
    hospital's split.
    """
    if image is not None:
        return f"record:image:{image.relative_to(root).as_posix()}"
    return "record:report:" + hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _row_image_path(root: Path, rel: str) -> Path | None:
    """The row's image file (None if blank); ValueError if it lies outside ``root``."""
    if not rel:
        return None
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"image path {rel!r} points outside the manifest's directory")
    return path
