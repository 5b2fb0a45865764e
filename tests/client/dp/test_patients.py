"""Privacy per patient: one patient, with all of their records, moves each step as one record.

Written as an auditor would check it: patients of 1 to 20 records, trained through the
hospital's own code (its site, its trainer, Opacus's real steps), removing a patient from
real Poisson batches; epsilon per patient against an independent accountant; and the
hospital that has no patient ids, or a ledger from before, told what it gets.
"""

import csv
import itertools
import json
import logging

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from client.app.local_training import training_units
from client.app.site import open_site
from client.app.trainer import run_local_round
from client.dp.accounting import RDP_ORDERS
from client.dp.engine import make_private
from client.dp.held_out import release_held_out, sensitivity
from client.dp.ledger import (
    DP_SGD,
    LEDGER_FILENAME,
    PATIENT,
    RECORD,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    _checksum,
)
from client.dp.patients import PatientSampled, patient_weights
from client.dp.policy import PrivacyPolicy, effective_policy
from shared_model.config import ConfigError, HospitalConfig, ModelConfig, PrivacyConfig, RunConfig
from shared_model.data import FusionTensors
from shared_model.datasets.export import write_manifest
from shared_model.engine import make_loss, train_step
from shared_model.evaluation import EVAL_LOSS_CLIP, EvalStats
from shared_model.model import FusionModel
from shared_model.weights import initial_model, shared_state
from tests.support.hospitals import started_hospital

CFG = ModelConfig(max_report_tokens=8, text_vocab_buckets=64, embed_dim=16, image_size=32)


def patient_sizes(patients: int, seed: int = 0) -> list[int]:
    """Records per patient: 1 to 20, with the extremes always among them."""
    rng = np.random.default_rng(seed)
    return [1, 20, *rng.integers(1, 21, size=patients - 2).tolist()]


def tensors(sizes: list[int], seed: int = 0) -> FusionTensors:
    """Records of patients of ``sizes``; each image's first pixel holds its record index."""
    g = torch.Generator().manual_seed(seed)
    ids = [f"patient-{p}" for p, k in enumerate(sizes) for _ in range(k)]
    n = len(ids)
    images = torch.rand(n, 1, CFG.image_size, CFG.image_size, generator=g)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.float32)
    reports = torch.randint(4, CFG.text_vocab_buckets, (n, CFG.max_report_tokens), generator=g)
    labels = torch.randint(0, 2, (n, len(CFG.labels)), generator=g).float()
    return FusionTensors(images, reports, torch.ones(n, 2), labels, ids)


def policy(mode: str) -> PrivacyPolicy:
    return PrivacyPolicy(True, 8.0, 8.0, 1e-5, 0.5, "rdp", mode, secure_noise=False)


def step_update(private, batch, expected: float) -> torch.Tensor:
    """The clipped gradient sum of one real DP step (noise 0, SGD at rate 1)."""
    before = [p.detach().clone() for p in private.raw_model.parameters() if p.requires_grad]
    train_step(private.model, private.optimizer, private.loss_fn, batch, 0)
    after = [p.detach() for p in private.raw_model.parameters() if p.requires_grad]
    moved = torch.cat([(b - a).flatten() for b, a in zip(before, after, strict=True)])
    with torch.no_grad():  # back to where the step started
        for p, b in zip(
            (p for p in private.raw_model.parameters() if p.requires_grad), before, strict=True
        ):
            p.copy_(b)
    return moved * expected


@pytest.mark.parametrize("mode", ["hooks", "bk"])
def test_removing_one_patient_moves_each_real_step_by_at_most_the_clipping_norm(mode):
    sizes = patient_sizes(14)
    data = tensors(sizes)
    owner = data.patient_ids
    torch.manual_seed(0)
    model = FusionModel(CFG)
    units = PatientSampled(data, owner, np.random.default_rng(1))
    assert len(units) == len(sizes)  # Poisson sampling runs over patients
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        make_loss(None),
        units,
        6,
        policy(mode),
        noise_multiplier=0.0,
        noise_generator=torch.Generator().manual_seed(2),
    )
    expected = private.optimizer.expected_batch_size
    checked = 0
    for batch in private.loader:  # the real sampler: batches of patients, one record each
        rows = batch[0][:, 0, 0, 0].round().long().tolist()
        patients = [owner[r] for r in rows]
        assert len(set(patients)) == len(patients)  # never two records of one patient
        if not rows:
            continue
        whole = step_update(private, batch, expected)
        without = step_update(private, tuple(t[1:] for t in batch), expected)
        assert float((whole - without).norm()) <= 0.5 * (1 + 1e-4)
        checked += 1
    assert checked >= 2


def test_every_record_of_a_patient_gets_its_turn():
    sizes = [1, 3, 20]
    data = tensors(sizes)
    units = PatientSampled(data, data.patient_ids, np.random.default_rng(0))
    drawn = {int(units[2][0][0, 0, 0]) for _ in range(400)}
    assert drawn == set(range(4, 24))  # the 20 records of the third patient
    assert int(units[0][0][0, 0, 0]) == 0


def test_released_held_out_statistics_move_by_one_patient_as_by_one_record(tmp_path):
    """Weights 1/k: removing a patient of 1 to 20 records moves the released vector (noise
    off) by at most its sensitivity; counted per record instead, a 20-record patient moves
    it far more, so the test can fail."""
    sizes = patient_sizes(10, seed=3)
    ids = [f"p{p}" for p, k in enumerate(sizes) for _ in range(k)]
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, (len(ids), 3))
    targets = (rng.random((len(ids), 3)) < 0.4).astype(float)
    losses = rng.uniform(0, 30, len(ids))
    labels = ("normal", "cardiomegaly", "effusion")
    held_policy = PrivacyPolicy(True, 8.0, 8.0, 1e-5, 1.0, "rdp", "bk")
    folders = itertools.count()

    def released(keep, weighted=True):
        w = patient_weights([ids[i] for i in keep]) if weighted else None
        stats = EvalStats.from_predictions(labels, logits[keep], targets[keep], losses[keep], w)
        ledger = PrivacyLedger.empty(tmp_path / str(next(folders)) / LEDGER_FILENAME, "h",
                                     held_policy)  # fmt: skip
        out = release_held_out(stats, ledger, held_policy, model_round=1, planned_rounds=1,
                               normal=lambda shape: np.zeros(shape)).stats  # fmt: skip
        vector = out.to_vector()
        vector[1] /= EVAL_LOSS_CLIP
        return vector

    everyone = list(range(len(ids)))
    bound = sensitivity(len(labels))
    for patient in range(len(sizes)):
        keep = [i for i in everyone if ids[i] != f"p{patient}"]
        assert np.linalg.norm(released(everyone) - released(keep)) <= bound + 1e-9
    big = [i for i in everyone if ids[i] != "p1"]  # the patient with 20 records
    assert np.linalg.norm(released(everyone, False) - released(big, False)) > 3 * bound


# ------------------------------------------------------------------ the hospital's own code
def manifest_with_patients(folder, sizes):
    """The embedded export, its patient_id column rewritten into patients of ``sizes``."""
    source = write_manifest(folder, hospital=0, records=sum(sizes), image_size=32)
    rows = list(csv.DictReader(source.open(encoding="utf-8")))
    owners = [f"patient-{p}" for p, k in enumerate(sizes) for _ in range(k)]
    for row, owner in zip(rows, owners, strict=True):
        row["patient_id"] = owner
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return source


A_RELEASE = LedgerEntry(
    round=1, noise_multiplier=2.0, sample_rate=0.1, steps=3, status="completed", mechanism=DP_SGD
)
RUN = {
    "num-rounds": 2,
    "model.image-size": 32,
    "model.embed-dim": 16,
    "model.max-report-tokens": 16,
    "train.batch-size": 8,
    "privacy.secure-noise": False,
}


def test_a_hospital_with_patient_ids_trains_and_accounts_per_patient(tmp_path):
    sizes = patient_sizes(40, seed=5)
    hospital = started_hospital(tmp_path, manifest_with_patients(tmp_path / "data", sizes))
    run = RunConfig.from_run_config({**RUN, "output-dir": str(tmp_path / "run")})
    site = open_site(hospital, run)
    assert site.unit == PATIENT
    patients = len(set(site.data.train.patient_ids))
    assert len(training_units(site)) == patients < len(site.data.train)
    weights = shared_state(initial_model(run.model, run.seed))
    result = run_local_round(
        weights, site, run, server_round=1, planned_rounds=2, secure_aggregation=True
    )
    assert result.trained
    ledger = PrivacyLedger.open(site.state_dir, hospital.name, site.policy)
    assert ledger.unit == PATIENT and ledger.export()["unit"] == PATIENT
    # the rate is per patient: the batch over the released patient count
    rate = min(1.0, run.train.batch_size / result.num_examples)
    assert result.sample_rate == pytest.approx(rate)
    # N̂ counts patients (noised): far nearer their number than the records'
    records = len(site.data.train)
    assert abs(result.num_examples - patients) < abs(result.num_examples - records)
    # epsilon per patient, from an accountant written by others
    acc = RdpAccountant(orders=RDP_ORDERS)
    for e in ledger.history:
        event = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        if e.mechanism == DP_SGD:
            event = dp_accounting.PoissonSampledDpEvent(e.sample_rate, event)
        acc.compose(event, e.steps)
    assert result.epsilon == pytest.approx(acc.get_epsilon(site.policy.delta), rel=0.03)


def test_a_manifest_without_patient_ids_gets_epsilon_per_record_and_is_told(tmp_path, caplog):
    source = write_manifest(tmp_path / "data", hospital=0, records=60, image_size=32)
    rows = list(csv.DictReader(source.open(encoding="utf-8")))
    with source.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "report", "labels"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("image", "report", "labels")} for r in rows)
    run = RunConfig.from_run_config({**RUN, "output-dir": str(tmp_path / "run")})
    with caplog.at_level(logging.WARNING, logger="fedfusion.hospital"):
        site = open_site(started_hospital(tmp_path, source), run)
    assert site.unit == RECORD and "epsilon is per record" in caplog.text
    assert PrivacyLedger.open(site.state_dir, "st-mary", site.policy).unit == RECORD
    with pytest.raises(ConfigError, match="needs a patient_id column"):
        open_site(started_hospital(tmp_path / "strict", source, **{"privacy-unit": "patient"}), run)


def test_a_ledger_never_changes_its_unit(tmp_path, caplog):
    sizes = patient_sizes(30, seed=6)
    manifest = manifest_with_patients(tmp_path / "data", sizes)
    hospital = started_hospital(tmp_path, manifest)
    run = RunConfig.from_run_config({**RUN, "output-dir": str(tmp_path / "run")})
    site = open_site(hospital, run)
    assert site.unit == PATIENT
    site.open_ledger().record_release(A_RELEASE)
    # after a release, the operator asks per record of a per-patient ledger: refused by name
    record_file = HospitalConfig.from_node_config(
        {**_node(tmp_path, manifest), "privacy-unit": "record"}
    )
    with pytest.raises(LedgerError, match="protects each patient since its first release"):
        open_site(record_file, run)
    # a ledger from before, with releases and no unit, stays per record and says so
    old = started_hospital(tmp_path / "old", manifest)
    ledger = PrivacyLedger.open(
        tmp_path / "old" / "state", "st-mary", effective_policy(PrivacyConfig(), old),
        backup=old.ledger_backup_file(tmp_path / "old" / "state"),
    )  # fmt: skip
    ledger.record_release(A_RELEASE)
    with caplog.at_level(logging.WARNING, logger="fedfusion.hospital"):
        assert open_site(old, run).unit == RECORD
    assert "stays per record" in caplog.text
    kept = PrivacyLedger.open(tmp_path / "old" / "state", "st-mary", effective_policy(
        PrivacyConfig(), old))  # fmt: skip
    assert kept.unit == RECORD and kept.export()["unit"] == RECORD  # fixed, never relabelled


def test_a_patient_id_blank_on_some_records_is_refused_unless_per_record(tmp_path):
    """Each blank row would count as a patient of its own: one patient several times."""
    manifest = manifest_with_patients(tmp_path / "data", patient_sizes(20, seed=7))
    rows = list(csv.DictReader(manifest.open(encoding="utf-8")))
    rows[1]["patient_id"] = rows[2]["patient_id"] = ""
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    run = RunConfig.from_run_config({**RUN, "output-dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="patient_id is blank on some records") as refused:
        open_site(started_hospital(tmp_path / "auto", manifest), run)
    assert not any(ch.isdigit() for ch in str(refused.value).split(":", 1)[1])  # no count
    per_record = started_hospital(tmp_path / "record", manifest, **{"privacy-unit": "record"})
    assert open_site(per_record, run).unit == RECORD


@pytest.mark.parametrize("crashed", [False, True])
def test_a_unit_edited_in_the_ledger_disagrees_with_its_backup(tmp_path, crashed):
    """An intruder relabels a per-record ledger 'patient' and recomputes its checksum;
    also in the window a crash leaves, the first release on the ledger, not the backup."""
    manifest = manifest_with_patients(tmp_path / "data", patient_sizes(20, seed=8))
    hospital = started_hospital(tmp_path, manifest, **{"privacy-unit": "record"})
    run = RunConfig.from_run_config({**RUN, "output-dir": str(tmp_path / "run")})
    site = open_site(hospital, run)
    backup = hospital.ledger_backup_file(site.state_dir)
    before = backup.read_bytes()
    ledger = site.open_ledger()
    ledger.record_release(A_RELEASE)
    if crashed:  # the ledger was written, its backup not
        backup.write_bytes(before)
    path = site.state_dir / LEDGER_FILENAME
    data = json.loads(path.read_text())
    assert data.pop("unit") == RECORD
    data.pop("checksum")
    data["unit"] = PATIENT
    path.write_text(json.dumps({**data, "checksum": _checksum(data)}))
    with pytest.raises(LedgerError, match="whom its epsilon protects"):
        open_site(HospitalConfig.from_node_config({**_node(tmp_path, manifest)}), run)


def test_the_unit_follows_the_data_until_the_first_release(tmp_path):
    """Opened once without patient ids, then with them: nothing was released, so the
    ledger turns per patient; after a release it would stay per record."""
    manifest = manifest_with_patients(tmp_path / "data", patient_sizes(20, seed=9))
    run = RunConfig.from_run_config({**RUN, "output-dir": str(tmp_path / "run")})
    hospital = started_hospital(tmp_path, manifest, **{"privacy-unit": "record"})
    assert open_site(hospital, run).unit == RECORD
    again = HospitalConfig.from_node_config(_node(tmp_path, manifest))
    assert open_site(again, run).unit == PATIENT
    assert PrivacyLedger.open(tmp_path / "state", "st-mary", open_site(again, run).policy).unit \
        == PATIENT  # fmt: skip


def _node(tmp_path, manifest):
    return {
        "data-manifest": str(manifest),
        "hospital-id": "st-mary",
        "state-dir": str(tmp_path / "state"),
        "ledger-backup": str(tmp_path / "backup"),
    }
