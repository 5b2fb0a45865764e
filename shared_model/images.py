"""Radiograph decoding: PNG, JPEG and DICOM files to one normalised grayscale tensor.

An image is refused, with the reason, when it is missing, empty, truncated, not an
image, a DICOM without pixels or in a transfer syntax no installed decoder reads, or
when its header declares more pixels than :attr:`DataLimits.max_pixels` (checked
before decoding: decompression bombs).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from shared_model.manifest import DataLimits

__all__ = ["decode_image"]


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
