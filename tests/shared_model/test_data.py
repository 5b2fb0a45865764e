import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from shared_model.data import load_manifest
from shared_model.images import decode_image
from shared_model.manifest import DataLimits, ManifestError
from shared_model.split import SplitSpec, split_records
from shared_model.text import ReportTokenizer
from tests.support.manifests import write_csv

LABELS = ("normal", "cardiomegaly", "effusion")
TOK = ReportTokenizer(256, 16)


def png(path: Path, value: int = 128, size: tuple[int, int] = (40, 30)) -> str:
    arr = np.full(size, value, dtype=np.uint8)
    arr[: size[0] // 2] = 255 - value
    Image.fromarray(arr).save(path)
    return path.name


def load(path, strict=True, limits=None):
    return load_manifest(path, LABELS, TOK, 32, strict=strict, limits=limits or DataLimits())


def test_csv_and_jsonl_manifests_load(tmp_path):
    png(tmp_path / "a.png")
    Image.fromarray(np.full((50, 50, 3), 90, np.uint8)).save(tmp_path / "b.jpg")
    rows = [
        {
            "image": "a.png",
            "report": "Enlarged heart.",
            "labels": "cardiomegaly",
            "patient_id": "p1",
        },
        {"image": "b.jpg", "report": "", "labels": "normal|effusion", "patient_id": "p2"},
        {"image": "", "report": "Clear lungs.", "labels": "normal", "patient_id": "p3"},
    ]
    data, report = load(write_csv(tmp_path / "m.csv", rows))
    assert len(data) == 3 and report.rows_ok == 3 and report.rows_bad == 0
    assert report.missing_image == 1 and report.missing_report == 1
    assert data.present.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert data.labels.tolist() == [[0, 1, 0], [1, 0, 1], [1, 0, 0]]
    assert data.images.shape == (3, 1, 32, 32)
    assert data.images.min() >= 0 and data.images.max() <= 1
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    data2, _ = load(jsonl)
    assert torch.equal(data2.labels, data.labels) and torch.equal(data2.images, data.images)


@pytest.mark.fault(
    (
        "A truncated PNG, a zero-byte file, a missing file, not an image, a path outside the "
        "manifest's directory, an unknown label, a row with neither image nor report"
    ),
    "Error naming the manifest, the row and the file",
    "no row skipped silently",
)
@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"image": "missing.png", "report": "x", "labels": "normal"},
            "row 1 (missing.png): file not found",
        ),
        (
            {"image": "ok.png", "report": "x", "labels": "pneumonia"},
            "row 1 (ok.png): unknown label 'pneumonia'",
        ),
        (
            {"image": "empty.png", "report": "x", "labels": "normal"},
            "row 1 (empty.png): file is empty",
        ),
        (
            {"image": "bad.png", "report": "x", "labels": "normal"},
            "row 1 (bad.png): not a readable PNG/JPEG",
        ),
        (
            {"image": "trunc.png", "report": "x", "labels": "normal"},
            "row 1 (trunc.png): not a readable PNG/JPEG",
        ),
        (
            {"image": "../outside.png", "report": "x", "labels": "normal"},
            "outside the manifest's directory",
        ),
        ({"image": "", "report": "  ", "labels": "normal"}, "neither an image nor a report"),
    ],
)
def test_bad_rows_name_the_manifest_row_and_file(tmp_path, row, message):
    root = tmp_path / "site"
    root.mkdir()
    png(root / "ok.png")
    png(tmp_path / "outside.png")
    (root / "empty.png").write_bytes(b"")
    (root / "bad.png").write_bytes(b"this is not an image at all")
    full = (root / "ok.png").read_bytes()
    (root / "trunc.png").write_bytes(full[: len(full) // 2])
    manifest = write_csv(root / "m.csv", [row])
    with pytest.raises(ManifestError) as err:
        load(manifest)
    assert str(manifest) in str(err.value) and message in str(err.value)


@pytest.mark.fault(
    "Bad rows with strict = false",
    "Counted and listed with their reasons; the good rows train",
    "no row skipped silently",
)
def test_non_strict_counts_and_lists_bad_rows(tmp_path):
    for name in ("ok.png", "ok2.png", "ok3.png"):
        png(tmp_path / name)
    rows = [
        {"image": "ok.png", "report": "a", "labels": "normal"},
        {"image": "nope.png", "report": "b", "labels": "normal"},
        {"image": "ok2.png", "report": "c", "labels": "bogus"},
        {"image": "ok3.png", "report": "d", "labels": "effusion"},
    ]
    data, report = load(write_csv(tmp_path / "m.csv", rows), strict=False)
    assert len(data) == 2 and report.rows_total == 4 and report.rows_bad == 2
    assert [e.row for e in report.errors] == [2, 3]


@pytest.mark.fault(
    "A manifest missing a column, empty, or missing",
    "Error naming the manifest and what is missing",
    "nothing read",
)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("image,report\na.png,x\n", "lacks column(s) labels"),
        ("image,report,labels\n", "has no records"),
        (None, "does not exist"),
    ],
)
def test_manifest_level_errors(tmp_path, content, message):
    path = tmp_path / "m.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError, match=re.escape(message)):
        load(path)


def test_monochrome1_dicom_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(tmp_path / "m2.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    m2 = decode_image(tmp_path / "m2.dcm", 32)
    m1 = decode_image(tmp_path / "m1.dcm", 32)
    assert torch.allclose(m1, 1 - m2, atol=0.02)


def test_real_monochrome1_chest_radiograph_decodes_the_right_way_up():
    img = decode_image(Path(get_testdata_file("RG1_UNCI.dcm")), 64)[0]
    mediastinum = img[20:44, 28:36].mean()
    lungs = (img[20:44, 8:20].mean() + img[20:44, 44:56].mean()) / 2
    assert mediastinum > lungs + 0.1  # dense is bright after MONOCHROME1 inversion


@pytest.mark.fault(
    "A DICOM with no pixel data, or an unsupported transfer syntax",
    "Error naming the reason (and, in a manifest, the row and file)",
    "no row skipped silently",
)
def test_dicom_without_pixels_or_with_unsupported_syntax(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ValueError, match="no pixel data"):
        decode_image(tmp_path / "nopix.dcm", 32)
    # 12-bit JPEG Extended: neither Pillow nor pylibjpeg decodes this file
    with pytest.raises(ValueError, match=r"transfer syntax 1\.2\.840\.10008\.1\.2\.4\.51"):
        decode_image(Path(get_testdata_file("JPEG-lossy.dcm")), 32)
    # JPEG-LS and JPEG Lossless, common in radiography archives, decode (pylibjpeg)
    for name in ("MR_small_jpeg_ls_lossless.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"):
        assert decode_image(Path(get_testdata_file(name)), 32).shape == (1, 32, 32)


def test_split_keeps_patients_on_one_side(tmp_path):
    rows = [
        {"image": png(tmp_path / f"{i}.png"), "report": f"r{i}", "labels": "normal"}
        | {"patient_id": f"p{i % 7}"}
        for i in range(40)
    ]
    data, _ = load(write_csv(tmp_path / "m.csv", rows))
    parts = split_records(data, SplitSpec.drawn(0.3, 0.2))
    assert len(parts.train) + len(parts.validation) + len(parts.test) == 40
    seen = [set(p.patient_ids or []) for p in (parts.train, parts.validation, parts.test)]
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 7


def test_a_record_without_patient_id_is_placed_by_its_own_content(tmp_path):
    """Rows inserted before it do not move it: its key is its image, or its report."""
    rows = [{"image": png(tmp_path / "a.png"), "report": "x", "labels": ""}]
    rows += [{"image": "", "report": "cough", "labels": ""}]
    data, _ = load(write_csv(tmp_path / "m.csv", rows))
    later, _ = load(
        write_csv(tmp_path / "n.csv", [{"image": "", "report": "y", "labels": ""}, *rows])
    )
    assert data.patient_ids == later.patient_ids[1:]
    assert data.patient_ids[0].startswith("record:image:")


def png_header(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels and holds none: a decompression bomb's head."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


@pytest.mark.fault(
    "Decompression bombs: huge PNG and DICOM headers",
    "Refused from the header, before decoding (data.max-image-pixels)",
    "memory",
)
def test_images_with_too_many_pixels_are_refused_before_decoding(tmp_path):
    png(tmp_path / "small.png", size=(40, 30))
    with pytest.raises(ValueError, match=r"30 x 40 = 1,200 pixels exceeds the limit of 1,000"):
        decode_image(tmp_path / "small.png", 32, max_pixels=1000)
    assert decode_image(tmp_path / "small.png", 32, max_pixels=1200).shape == (1, 32, 32)
    png_header(tmp_path / "bomb.png", 30_000, 30_000)  # 900 M pixels in 45 bytes
    with pytest.raises(ValueError, match="decompression bomb"):
        decode_image(tmp_path / "bomb.png", 32)
    png_header(tmp_path / "big.png", 12_000, 10_000)  # 120 M: our limit, not Pillow's
    with pytest.raises(ValueError, match=r"exceeds the limit of 100,000,000 \(data\.max-image"):
        decode_image(tmp_path / "big.png", 32)
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    ds.Rows, ds.Columns = 20_000, 20_000  # a header that lies: refused before decoding
    ds.save_as(tmp_path / "big.dcm")
    with pytest.raises(ValueError, match=r"20000 x 20000 = 400,000,000 pixels exceeds"):
        decode_image(tmp_path / "big.dcm", 32)


@pytest.mark.fault(
    "A 1 MB report, non-UTF-8 text, duplicate rows, a reused image file, an empty report",
    "Each refused naming its row (an empty report is a counted missing modality)",
    "no row skipped silently; no record counted twice",
)
def test_hostile_rows_are_each_refused_naming_the_row(tmp_path):
    for i in range(4):
        png(tmp_path / f"{i}.png", value=40 * i)
    rows = [
        {"image": "0.png", "report": "fine", "labels": "normal", "patient_id": "p0"},
        {"image": "1.png", "report": "x" * 1_048_576, "labels": "normal", "patient_id": "p1"},
        {"image": "2.png", "report": "\udcffbad", "labels": "normal", "patient_id": "p2"},
        {"image": "0.png", "report": "again", "labels": "normal", "patient_id": "p3"},
        {"image": "3.png", "report": "fine", "labels": "normal", "patient_id": "p4"},
        {"image": "3.png", "report": "fine", "labels": "normal", "patient_id": "p4"},
        {"image": "", "report": "", "labels": "normal", "patient_id": "p5"},
        {"image": "", "report": "text only", "labels": "normal", "patient_id": "p6\udc80"},
    ]
    path = tmp_path / "m.csv"
    with path.open("w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        import csv

        writer = csv.DictWriter(handle, fieldnames=["image", "report", "labels", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    data, report = load(path, strict=False)
    reasons = {e.row: e.reason for e in report.errors}
    assert len(data) == 2 and report.rows_ok == 2 and report.rows_total == 8
    assert reasons[2] == "report of 1,048,576 characters exceeds data.max-report-chars 100,000"
    assert reasons[3] == "the report is not UTF-8 text (byte 0xff at character 0)"
    assert reasons[4] == "uses the same image file as row 1"
    assert reasons[6].startswith("repeats row 5")
    assert reasons[7] == "row has neither an image nor a report"
    assert reasons[8] == "the patient_id is not UTF-8 text (byte 0x80 at character 2)"
    assert sorted(reasons) == [2, 3, 4, 6, 7, 8]
    with pytest.raises(ManifestError, match=r"row 2 \(1\.png\): report of 1,048,576"):
        load(path)
    limits = DataLimits(max_report_chars=2_000_000)
    _, report = load(path, strict=False, limits=limits)
    assert 2 not in {e.row for e in report.errors}
