import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from shared_model.data import ManifestError, decode_image, load_manifest, split_train_test
from shared_model.text import ReportTokenizer

LABELS = ("normal", "cardiomegaly", "effusion")
TOK = ReportTokenizer(256, 16)


def png(path: Path, value: int = 128, size: tuple[int, int] = (40, 30)) -> str:
    arr = np.full(size, value, dtype=np.uint8)
    arr[: size[0] // 2] = 255 - value
    Image.fromarray(arr).save(path)
    return path.name


def write_csv(path: Path, rows: list[dict], columns=("image", "report", "labels", "patient_id")):
    import csv

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def load(path, strict=True):
    return load_manifest(path, LABELS, TOK, 32, strict=strict)


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


def test_non_strict_counts_and_lists_bad_rows(tmp_path):
    png(tmp_path / "ok.png")
    rows = [
        {"image": "ok.png", "report": "a", "labels": "normal"},
        {"image": "nope.png", "report": "b", "labels": "normal"},
        {"image": "ok.png", "report": "c", "labels": "bogus"},
        {"image": "ok.png", "report": "d", "labels": "effusion"},
    ]
    data, report = load(write_csv(tmp_path / "m.csv", rows), strict=False)
    assert len(data) == 2 and report.rows_total == 4 and report.rows_bad == 2
    assert [e.row for e in report.errors] == [2, 3]


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


def test_dicom_without_pixels_or_with_unsupported_syntax(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(ValueError, match="no pixel data"):
        decode_image(tmp_path / "nopix.dcm", 32)
    with pytest.raises(ValueError, match="transfer syntax"):
        decode_image(Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")), 32)


def test_split_keeps_patients_on_one_side(tmp_path):
    png(tmp_path / "a.png")
    rows = [
        {"image": "a.png", "report": f"r{i}", "labels": "normal", "patient_id": f"p{i % 7}"}
        for i in range(40)
    ]
    data, _ = load(write_csv(tmp_path / "m.csv", rows))
    train, test = split_train_test(data, 0.3, seed=1)
    assert len(train) + len(test) == 40
    assert not set(train.patient_ids) & set(test.patient_ids)
