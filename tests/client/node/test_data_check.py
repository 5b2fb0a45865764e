"""`fedfusion data check MANIFEST`: every row read as training reads it, bad ones named."""

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from shared_model.cli import build_app
from tests.support.manifests import write_csv

# Real DICOM files of the kinds hospitals archive: uncompressed and JPEG 2000 computed
# radiographs in MONOCHROME1, JPEG Lossless (process 14, SV1) and JPEG-LS.
REAL_DICOM = (
    "RG1_UNCI.dcm",
    "RG1_J2KR.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
)


def good_site(root: Path) -> list[dict]:
    """One row per real file format: PNG, JPEG, and the DICOM kinds above."""
    root.mkdir(exist_ok=True)
    Image.fromarray(np.arange(64 * 48, dtype=np.uint32).reshape(64, 48).astype(np.uint8)).save(
        root / "a.png"
    )
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(root / "b.jpg")
    names = ["a.png", "b.jpg"]
    for name in REAL_DICOM:
        shutil.copy(get_testdata_file(name), root / name)
        names.append(name)
    return [
        {"image": n, "report": f"Report {i}.", "labels": "normal", "patient_id": f"p{i}"}
        for i, n in enumerate(names)
    ]


def check(*args: str):
    """``fedfusion data check ARGS``: ``.output`` holds stdout and stderr (progress lines,
    every few seconds on a slow machine), ``.stdout`` the report alone (``--json``)."""
    return CliRunner().invoke(build_app(), ["data", "check", *args])


def test_real_png_jpeg_and_dicom_files_pass(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", good_site(tmp_path))
    result = check(str(manifest))
    assert result.exit_code == 0, result.output
    assert f"{len(REAL_DICOM) + 2} rows" in result.output and "bad: 0" in result.output


def test_patients_and_records_per_patient_are_counted(tmp_path):
    rows = good_site(tmp_path)
    for row, owner in zip(rows, ["p0", "p0", "p0", "p1", "p2", "p2"], strict=True):
        row["patient_id"] = owner
    result = check(str(write_csv(tmp_path / "m.csv", rows)))
    assert "patients: 3 (records per patient: median 2, max 3); epsilon will be per patient" in (
        result.output
    )
    summary = json.loads(check(str(tmp_path / "m.csv"), "--json").stdout)
    assert summary["patients"] == 3 and summary["records_per_patient"] == {"median": 2, "max": 3}
    rows[1]["patient_id"] = ""  # one blank: it would count as a patient of its own
    result = check(str(write_csv(tmp_path / "b.csv", rows)))
    assert "patient_id is blank on 1 records" in result.output and result.exit_code == 1
    for row in rows:
        del row["patient_id"]
    result = check(str(write_csv(tmp_path / "n.csv", rows)))
    assert "no patient_id column" in result.output and "epsilon will be per record" in result.output


@pytest.mark.fault(
    "`fedfusion data check` on a manifest with bad rows",
    "Every bad row listed with its reason; exit code 1",
    "no row skipped silently",
)
def test_every_bad_row_is_named_with_its_reason_and_the_exit_code_says_so(tmp_path):
    rows = good_site(tmp_path)
    full = (tmp_path / "a.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(full[: len(full) // 3])
    (tmp_path / "zero.png").write_bytes(b"")
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    bad = [
        {"image": "trunc.png", "report": "x", "labels": "normal", "patient_id": "q1"},
        {"image": "zero.png", "report": "x", "labels": "normal", "patient_id": "q2"},
        {"image": "nopixels.dcm", "report": "x", "labels": "normal", "patient_id": "q3"},
        {"image": "../../etc/passwd", "report": "x", "labels": "normal", "patient_id": "q4"},
        {"image": "", "report": "x", "labels": "pneumothorax", "patient_id": "q5"},
        {"image": "", "report": "", "labels": "normal", "patient_id": "q6"},
    ]
    manifest = write_csv(tmp_path / "m.csv", rows + bad)
    result = check(str(manifest))
    assert result.exit_code == 1
    first = len(rows) + 1
    expected = [
        f"row {first} (trunc.png): not a readable PNG/JPEG image",
        f"row {first + 1} (zero.png): file is empty (0 bytes)",
        f"row {first + 2} (nopixels.dcm): DICOM file has no pixel data",
        f"row {first + 3} (../../etc/passwd): image path '../../etc/passwd' points outside",
        f"row {first + 4} (-): unknown label 'pneumothorax'",
        f"row {first + 5} (-): row has neither an image nor a report",
    ]
    for line in expected:
        assert line in result.output, line
    assert f"ok:  {len(rows)}" in result.output and "bad: 6" in result.output
    summary = json.loads(check(str(manifest), "--json").stdout)
    assert summary["ok"] == len(rows) and [e["row"] for e in summary["errors"]] == list(
        range(first, first + 6)
    )


def test_a_manifest_with_no_good_row_still_lists_every_row(tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            {"image": "nope.png", "report": "x", "labels": "normal", "patient_id": str(i)}
            for i in (1, 2)
        ],
    )
    result = check(str(manifest))
    assert result.exit_code == 1
    assert "row 1 (nope.png): file not found" in result.output
    assert "row 2 (nope.png): file not found" in result.output


def test_settings_change_what_is_accepted_and_bad_settings_exit_2(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", good_site(tmp_path))
    result = check(str(manifest), "--run-config", "data.max-image-pixels=100")
    assert result.exit_code == 1 and "exceeds the limit of 100 (data.max-image-pixels)" in (
        result.output
    )
    result = check(str(manifest), "--run-config", "model.fusion=sum")
    assert result.exit_code == 2 and "model.fusion" in result.output
    (tmp_path / "cols.csv").write_text("image,report\na.png,x\n")
    result = check(str(tmp_path / "cols.csv"))
    assert result.exit_code == 2 and "lacks column(s) labels" in result.output
