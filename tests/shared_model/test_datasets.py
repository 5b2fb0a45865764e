import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from shared_model.config import DataConfig, ModelConfig
from shared_model.datasets import dirichlet_partition, embedded_hospital
from shared_model.datasets.iu_reports import (
    EMBEDDED_LABELS,
    PUBLIC_PREVALENCE,
    clean_text,
    label_prevalence,
    load_reports,
    map_mesh_terms,
)
from shared_model.datasets.phantoms import Acquisition, hospital_acquisition, render_phantom


def test_reports_are_real_and_labelled():
    reports = load_reports()
    assert len(reports) == 3860
    assert sum(bool(r.indication) for r in reports) == 3556  # the rest: text missing
    assert sum(bool(r.findings) for r in reports) > 3800
    assert all(set(r.labels) <= set(EMBEDDED_LABELS) for r in reports)
    assert "normal" not in {lab for r in reports if len(r.labels) > 1 for lab in r.labels}


def test_stored_public_prevalence_matches_the_corpus():
    measured = label_prevalence()
    assert measured == pytest.approx(PUBLIC_PREVALENCE, abs=1e-4)


def test_mesh_mapping():
    assert map_mesh_terms(["Cardiomegaly/mild", "Pleural Effusion/right"]) == (
        "cardiomegaly",
        "effusion",
    )
    assert map_mesh_terms(["normal"]) == ("normal",)
    assert map_mesh_terms(["normal", "Nodule"]) == ("nodule",)
    assert map_mesh_terms(["Spine/degenerative"]) == ("other",)
    assert map_mesh_terms(["No Indexing"]) is None


def test_partition_is_disjoint_complete_deterministic_and_skewed():
    labels = [r.labels for r in load_reports()]
    parts = dirichlet_partition(labels, 5, alpha=0.3, seed=0)
    flat = np.concatenate(parts)
    assert len(flat) == len(labels) == len(set(flat.tolist()))
    again = dirichlet_partition(labels, 5, alpha=0.3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    share = [np.mean(["cardiomegaly" in labels[i] for i in p]) for p in parts]
    assert max(share) > 2 * min(share)  # label skew: non-IID


def test_partition_refuses_impossible_splits():
    with pytest.raises(ValueError, match="cannot split"):
        dirichlet_partition([("normal",)] * 20, 5, alpha=1.0, seed=0)


def test_phantoms_are_deterministic_and_carry_signal():
    rng = np.random.default_rng(0)
    labels = [("cardiomegaly",) if rng.random() < 0.5 else ("normal",) for _ in range(300)]
    images = np.stack(
        [render_phantom(lab, np.random.default_rng([7, i]), 32) for i, lab in enumerate(labels)]
    )
    again = render_phantom(labels[3], np.random.default_rng([7, 3]), 32)
    assert np.array_equal(images[3], again)
    assert images.dtype == np.float32 and images.min() >= 0 and images.max() <= 1
    y = np.array([lab == ("cardiomegaly",) for lab in labels])
    flat = images.reshape(len(images), -1)
    clf = LogisticRegression(max_iter=2000).fit(flat[:200], y[:200])
    auc = roc_auc_score(y[200:], clf.predict_proba(flat[200:])[:, 1])
    assert 0.75 < auc < 1.0  # the image shows the finding, imperfectly (occult findings)


def test_hospitals_differ_in_acquisition():
    a, b = hospital_acquisition(0, 0), hospital_acquisition(0, 1)
    assert a != b
    img_a = render_phantom(("normal",), np.random.default_rng(1), 32, a)
    img_b = render_phantom(("normal",), np.random.default_rng(1), 32, b)
    assert not np.allclose(img_a, img_b)
    assert Acquisition() == Acquisition()


def test_embedded_hospital_split():
    cfg = ModelConfig(max_report_tokens=32)
    data = DataConfig(max_reports=400)
    h0 = embedded_hospital(0, 2, cfg, data, seed=0)
    h1 = embedded_hospital(1, 2, cfg, data, seed=0)
    ids0 = set(h0.train.patient_ids) | set(h0.test.patient_ids)
    ids1 = set(h1.train.patient_ids) | set(h1.test.patient_ids)
    assert not ids0 & ids1 and len(ids0) + len(ids1) == 400
    assert not set(h0.train.patient_ids) & set(h0.test.patient_ids)
    assert h0.train.images.shape[1:] == (1, 64, 64)
    assert h0.train.labels.shape[1] == len(cfg.labels)
    again = embedded_hospital(0, 2, cfg, data, seed=0)
    assert torch.equal(again.train.images, h0.train.images)


def test_a_validation_holdout_never_touches_the_test_split():
    cfg = ModelConfig(max_report_tokens=32)
    test_run = embedded_hospital(0, 2, cfg, DataConfig(max_reports=400), seed=3)
    tuning = embedded_hospital(0, 2, cfg, DataConfig(max_reports=400, holdout="validation"), 3)
    test_ids = set(test_run.test.patient_ids)
    train_ids, val_ids = set(tuning.train.patient_ids), set(tuning.test.patient_ids)
    assert not test_ids & (train_ids | val_ids)  # the test records are nowhere
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(test_run.train.patient_ids)
    # a validation part the size of the test part: 0.2 of all patients, each on its own
    everyone = len(test_ids) + len(test_run.train.patient_ids)
    assert abs(len(val_ids) - 0.2 * everyone) < 4 * (everyone * 0.2 * 0.8) ** 0.5


def test_redactions_are_removed_and_an_empty_remainder_is_missing_text():
    assert clean_text("XXXX-year-old male, chest pain.") == "year-old male, chest pain."
    assert clean_text("XXXX-year-old with XXXX for one month.") == "year-old with for one month."
    assert clean_text("XXXX.") == ""  # nothing but a redaction: a record without text
    assert clean_text(",786.05 XXXX XXXX to XXXX") == ",786.05 to"
    assert "XXXX" not in " ".join(r.indication + r.findings for r in load_reports())


def _indexed_sections() -> dict[str, list[str]]:
    """Each labelled report's FINDINGS and IMPRESSION, read from the archive here.

    An independent reading of the corpus: the text the MeSH labels were indexed from,
    as the sentences of five or more words a model could re-read its labels in (shorter
    ones, such as "left and right ribs", also name the exam in an indication).
    """
    import re
    import tarfile
    import xml.etree.ElementTree as ET
    from pathlib import Path

    from shared_model.datasets.iu_reports import reports_archive

    sections = {}
    with tarfile.open(reports_archive()) as archive:
        for member in archive:
            if member.name.endswith(".xml"):
                root = ET.fromstring(archive.extractfile(member).read())
                text = " ".join(
                    (e.text or "")
                    for e in root.iter("AbstractText")
                    if e.get("Label") in {"FINDINGS", "IMPRESSION"}
                )
                sentences = [s.strip() for s in re.split(r"[.;]", text.replace("XXXX", " "))]
                sections[Path(member.name).stem] = [
                    " ".join(s.lower().split()) for s in sentences if len(s.split()) >= 5
                ]
    return sections


def _texts_reaching_the_model(monkeypatch, data: DataConfig) -> dict[str, str]:
    """Every text the embedded hospitals hand to the tokenizer, by report id."""
    import shared_model.datasets as datasets

    seen: list[str] = []
    real = datasets.tokenizer_for

    def spying(model):
        tokenizer = real(model)
        encode = tokenizer.encode

        def record(texts):
            seen.extend(texts)
            return encode(texts)

        monkeypatch.setattr(tokenizer, "encode", record)
        return tokenizer

    monkeypatch.setattr(datasets, "tokenizer_for", spying)
    reports = load_reports()
    parts = dirichlet_partition([r.labels for r in reports], 3, data.dirichlet_alpha, 0)
    uids = []  # the order each hospital encodes its records in
    for partition in range(3):
        embedded_hospital(partition, 3, ModelConfig(), data, seed=0)
        uids += [reports[i].uid for i in parts[partition]]
    assert len(seen) == len(uids) == 3860
    return dict(zip(uids, seen, strict=True))


def _leaked(texts: dict[str, str]) -> list[str]:
    indexed = _indexed_sections()
    normalized = {uid: " ".join(t.lower().split()) for uid, t in texts.items()}
    return [uid for uid, t in normalized.items() if any(s in t for s in indexed[uid])]


def test_no_text_the_labels_were_indexed_from_reaches_the_model_by_default(monkeypatch):
    texts = _texts_reaching_the_model(monkeypatch, DataConfig())
    assert sum(bool(t) for t in texts.values()) == 3556  # indications, the rest missing
    assert _leaked(texts) == []


def test_the_leak_check_catches_the_report_text(monkeypatch):
    """The same check flags nearly every record when the report is the input."""
    texts = _texts_reaching_the_model(monkeypatch, DataConfig(text_source="report"))
    assert len(_leaked(texts)) > 3500


def test_demo_data_holds_the_indication_not_the_findings(tmp_path):
    import csv

    from shared_model.datasets.export import write_manifest

    manifest = write_manifest(tmp_path, hospital=0, records=50)
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    by_id = {r.uid: r for r in load_reports()}
    assert [row["report"] for row in rows] == [by_id[row["patient_id"]].indication for row in rows]
    assert _leaked({row["patient_id"]: row["report"] for row in rows}) == []
