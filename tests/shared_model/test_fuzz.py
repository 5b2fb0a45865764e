"""Fuzzing (hypothesis) the code that reads untrusted input: images, text, manifests, config.

Each target feeds generated and mutated inputs and accepts exactly two outcomes: a
result of the documented shape, or the module's own error type with a message. Any
other exception (a library's, deep inside) or a crash fails the test. The number of
inputs each target tried is printed at the end of the run (tests/conftest.py).
"""

import io
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file

from shared_model.config import ConfigError, RunConfig, describe_run_config
from shared_model.data import load_manifest
from shared_model.images import decode_image
from shared_model.manifest import ManifestError
from shared_model.text import ReportTokenizer
from tests.support.tier import examples

FUZZ = settings(
    max_examples=examples(1000),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SIZE = 16
# Damaged files make pydicom warn as it reads on: expected here, and not what is tested.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(24 * 20, dtype=np.uint16).reshape(24, 20).astype(np.uint8)).save(
        buf, "PNG"
    )
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 20, 3), 70, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


SEEDS = {
    ".png": _png(),
    ".jpg": _jpeg(),
    ".dcm": Path(get_testdata_file("RG1_UNCI.dcm")).read_bytes()[:60_000],
    ".dcm2": Path(get_testdata_file("JPGLosslessP14SV1_1s_1f_8b.dcm")).read_bytes(),
}


@st.composite
def mutated(draw):
    """A valid file of one format, then truncated, bit-flipped, or spliced with noise."""
    suffix = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[suffix])
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif data:
            data[at : at + 16] = bytes(min(16, len(data) - at))
    return suffix[:4], bytes(data)


def _decoded_or_refused(path: Path, record: list[int]) -> None:
    record[0] += 1
    try:
        image = decode_image(path, SIZE, max_pixels=50_000_000)
    except ValueError as err:
        assert str(err)
        return
    assert image.shape == (1, SIZE, SIZE) and image.dtype == torch.float32
    assert torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


@pytest.mark.fault(
    "1,000 mutated PNG/JPEG/DICOM files (hypothesis)",
    "Our own error or a decoded image; never a crash",
    "the process",
)
def test_fuzz_image_decoding_mutated_files(tmp_path, fuzz_counts):
    record = fuzz_counts.setdefault("image decoding (mutated PNG/JPEG/DICOM)", [0])

    @FUZZ
    @given(case=mutated())
    def run(case):
        suffix, data = case
        path = tmp_path / f"f{suffix}"
        path.write_bytes(data)
        _decoded_or_refused(path, record)

    run()


@pytest.mark.fault(
    "1,000 random byte strings as images",
    "Our own error; never a crash",
    "the process",
)
def test_fuzz_image_decoding_random_bytes(tmp_path, fuzz_counts):
    record = fuzz_counts.setdefault("image decoding (random bytes)", [0])

    @FUZZ
    @given(
        suffix=st.sampled_from([".png", ".jpg", ".dcm", ".bin"]),
        head=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"\0" * 128 + b"DICM"]),
        body=st.binary(max_size=2048),
    )
    def run(suffix, head, body):
        path = tmp_path / f"r{suffix}"
        path.write_bytes(head + body)
        _decoded_or_refused(path, record)

    run()


@pytest.mark.fault(
    "1,000 random texts",
    "Tokenized within bounds; never a crash",
    "the process",
)
def test_fuzz_tokenization(fuzz_counts):
    record = fuzz_counts.setdefault("tokenization", [0])
    tok = ReportTokenizer(512, 24)

    @FUZZ
    @given(reports=st.lists(st.text(max_size=400), min_size=1, max_size=4))
    def run(reports):
        record[0] += 1
        ids, present = tok.encode(reports)
        assert ids.shape == (len(reports), 24) and ids.dtype == torch.int64
        assert ids.min() >= 0 and ids.max() < 512
        assert present.tolist() == [bool(r.strip()) for r in reports]

    run()


cells = st.text(alphabet=string.printable + "é\u00a0\u2028\x00\ufeff", max_size=30)


@pytest.mark.fault(
    "1,000 random CSV/JSONL manifests",
    "Loaded, or our own error naming the problem",
    "the process",
)
def test_fuzz_manifest_parsing(tmp_path, fuzz_counts):
    record = fuzz_counts.setdefault("manifest parsing (CSV and JSONL)", [0])
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(tmp_path / "a.png")
    tok = ReportTokenizer(256, 16)

    @FUZZ
    @given(
        header=st.lists(
            st.sampled_from(["image", "report", "labels", "patient_id", "extra", ""]),
            min_size=1,
            max_size=5,
        ),
        rows=st.lists(st.lists(cells, max_size=6), max_size=6),
        jsonl=st.booleans(),
        raw=st.binary(max_size=200),
    )
    def run(header, rows, jsonl, raw):
        record[0] += 1
        if jsonl:
            lines = [json.dumps(dict(zip(header, row, strict=False))) for row in rows]
            path = tmp_path / "m.jsonl"
            path.write_bytes("\n".join(lines).encode() + raw)
        else:
            text = ",".join(header) + "\n" + "\n".join(",".join(r) for r in rows) + "\n"
            path = tmp_path / "m.csv"
            path.write_bytes(text.encode("utf-8", "surrogatepass") + raw)
        try:
            data, report = load_manifest(
                path, ("normal", "effusion"), tok, SIZE, strict=False, decode=decode_image
            )
        except ManifestError as err:
            assert str(err)
            return
        assert len(data) == report.rows_ok == report.rows_total - report.rows_bad
        assert all(e.reason for e in report.errors)

    run()


KEYS = [key for key, _, _ in describe_run_config()]


@pytest.mark.fault(
    "1,000 random run configurations",
    "Accepted, or refused naming the key",
    "the process",
)
def test_fuzz_run_config_parsing(fuzz_counts):
    record = fuzz_counts.setdefault("run-config parsing", [0])
    values = st.one_of(
        st.booleans(),
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=20),
        st.none(),
        st.lists(st.integers(), max_size=2),
    )

    @FUZZ
    @given(
        config=st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), values, max_size=6
        )
    )
    def run(config):
        record[0] += 1
        try:
            run_config = RunConfig.from_run_config(config)
        except ConfigError as err:
            assert str(err)
            return
        assert RunConfig.from_run_config(run_config.to_run_config()) == run_config

    run()
