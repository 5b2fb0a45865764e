"""The hospital owns its split: a server changing seed, fraction or held-out part moves nothing.

Written as the coordinator would attack it: one hospital with its own data (a manifest,
a ledger started by ``fedfusion ledger init``'s code path), opened by the hospital's own
``open_site`` under run configs the server chose; and as an operator or intruder who
edits the hospital's file or its ledger.
"""

import json
import logging
import random

import pytest
from typer.testing import CliRunner

from client.app.site import hospital_records, open_site
from client.dp.ledger import (
    LEDGER_FILENAME,
    LedgerEntry,
    LedgerError,
    PrivacyLedger,
    _checksum,
)
from client.dp.ledger_custody import check_against_backup
from shared_model.cli import build_app
from shared_model.config import HospitalConfig, RunConfig
from shared_model.datasets.export import write_manifest
from shared_model.split import SplitSpec, embedded_split_spec, split_records
from tests.support.hospitals import started_hospital


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), hospital=0, records=120)


HOLDOUTS = ["test", "validation"]


def server_run(seed: int, test_fraction: float, holdout: str) -> RunConfig:
    return RunConfig.from_run_config(
        {"seed": seed, "data.test-fraction": test_fraction, "data.holdout": holdout}
    )


def patients(data) -> set[str]:
    return set(data.patient_ids or [])


def test_a_server_changing_seed_fraction_and_holdout_never_evaluates_a_trained_patient(
    tmp_path, manifest
):
    """13 runs with server-chosen splits: one training part, disjoint from all evaluated."""
    hospital = started_hospital(tmp_path, manifest, **{"validation-fraction": 0.1})
    rng = random.Random(7)
    seeds = [rng.randrange(2**31) for _ in range(13)]
    trained: list[set[str]] = []
    evaluated: set[str] = set()
    for seed in seeds:
        run = server_run(seed, rng.choice([0.05, 0.2, 0.35, 0.5]), rng.choice(HOLDOUTS))
        site = open_site(hospital, run)
        trained.append(patients(site.data.train))
        evaluated |= patients(site.data.test)
    assert all(t == trained[0] for t in trained)  # the same training part, every run
    assert trained[0] and evaluated
    assert not trained[0] & evaluated

    # The test can fail: placed by the server's seed (as splits once were), the same
    # runs evaluate patients that an earlier run trained on.
    everyone = hospital_records(hospital, run.model, run.data, run.seed)
    ever_trained: set[str] = set()
    leaked: set[str] = set()
    for seed in seeds:
        parts = split_records(everyone, embedded_split_spec(seed, 0, 0.2, "test"))
        leaked |= patients(parts.test) & ever_trained
        ever_trained |= patients(parts.train)
    assert len(leaked) > 10


def test_the_run_s_split_settings_are_ignored_and_the_hospital_says_so(tmp_path, manifest, caplog):
    hospital = started_hospital(tmp_path, manifest)
    with caplog.at_level(logging.WARNING, logger="fedfusion.hospital"):
        site = open_site(hospital, server_run(1, 0.5, "validation"))
    said = caplog.text
    assert "the run asks data.test-fraction 0.5; this hospital keeps its own split" in said
    assert "keeps none (hospital validation-fraction = 0), so it declines to evaluate" in said
    assert len(site.data.test) == 0  # no validation part: nothing evaluated, nothing sent
    assert len(site.data.train) > 0


def test_the_split_is_fixed_in_the_ledger_and_a_changed_fraction_is_refused(tmp_path, manifest):
    hospital = started_hospital(tmp_path, manifest)
    first = open_site(hospital, server_run(1, 0.2, "test"))
    ledger = json.loads((tmp_path / "state" / LEDGER_FILENAME).read_text())
    assert ledger["split"]["test_fraction"] == 0.2 and ledger["split"]["since_release"] == 0
    changed = HospitalConfig.from_node_config({**_node(hospital), "test-fraction": 0.3})
    with pytest.raises(LedgerError, match=r"'test-fraction' 0\.3 .* differ from the split fixed"):
        open_site(changed, server_run(1, 0.2, "test"))
    again = open_site(hospital, server_run(99, 0.2, "test"))
    assert patients(again.data.test) == patients(first.data.test)


def test_a_ledger_that_released_before_it_kept_a_split_waits_for_a_person(tmp_path, manifest):
    """Its earlier runs' held-out records were the server's choice: no split is drawn alone."""
    hospital = started_hospital(tmp_path, manifest)
    path = tmp_path / "state" / LEDGER_FILENAME
    ledger = PrivacyLedger.from_json(path.read_bytes(), path)
    ledger.backup = hospital.ledger_backup_file(tmp_path / "state")
    ledger.split = None  # a ledger written before splits were kept, with one round
    ledger.begin_round(LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10))
    with pytest.raises(LedgerError, match=r"holds 1 release\(s\) made before .* ledger split"):
        open_site(hospital, server_run(1, 0.2, "test"))
    config = tmp_path / "hospital.toml"
    config.write_text(
        f'[hospital]\nhospital-id = "st-mary"\ndata-manifest = "{manifest}"\n'
        f'state-dir = "{tmp_path / "state"}"\nledger-backup = "{tmp_path / "backup"}"\n'
    )
    cli = CliRunner()
    unconfirmed = cli.invoke(build_app(), ["ledger", "split", "--config", str(config)])
    assert unconfirmed.exit_code == 2 and "--after-releases" in unconfirmed.output
    fixed = cli.invoke(
        build_app(), ["ledger", "split", "--config", str(config), "--after-releases"]
    )
    assert fixed.exit_code == 0, fixed.output
    open_site(hospital, server_run(1, 0.2, "test"))
    kept = PrivacyLedger.from_json(path.read_bytes(), path)
    assert kept.split_summary()["since_release"] == 1
    shown = cli.invoke(build_app(), ["ledger", "show", str(tmp_path / "state")])
    assert "fixed after 1 release(s)" in shown.output


def test_a_backup_without_the_split_accepts_only_the_split_fixed_on_its_history(tmp_path, manifest):
    """A crash between the ledger's write and its backup's: the split may be missing there."""
    hospital = started_hospital(tmp_path, manifest)
    backup = hospital.ledger_backup_file(tmp_path / "state")
    kept = PrivacyLedger.from_json(backup.read_bytes(), backup)
    kept.path, kept.backup, kept.split = backup, None, None
    kept.save()  # the backup as it was before the split was fixed
    path = tmp_path / "state" / LEDGER_FILENAME
    ledger = PrivacyLedger.from_json(path.read_bytes(), path)
    ledger.backup = backup
    check_against_backup(ledger)  # fixed on the backup's (empty) history: accepted
    ledger.backup = None  # and one round recorded before the backup's write
    ledger.begin_round(LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=10))
    data = json.loads(path.read_text())
    data.pop("checksum")
    data["split"]["since_release"] = 1  # claims an earlier release the backup never had
    path.write_text(json.dumps({**data, "checksum": _checksum(data)}))
    with pytest.raises(LedgerError, match="split is not the backup's"):
        open_site(hospital, server_run(1, 0.2, "test"))


def test_a_split_edited_in_the_ledger_is_caught_against_its_backup(tmp_path, manifest):
    """An intruder swaps in a split key of their own and recomputes the checksum."""
    hospital = started_hospital(tmp_path, manifest)
    path = tmp_path / "state" / LEDGER_FILENAME
    data = json.loads(path.read_text())
    data.pop("checksum")
    data["split"]["key"] = SplitSpec.drawn(0.2).key.hex()
    path.write_text(json.dumps({**data, "checksum": _checksum(data)}))
    ledger = PrivacyLedger.from_json(path.read_bytes(), path)  # self-consistent
    ledger.backup = hospital.ledger_backup_file(tmp_path / "state")
    with pytest.raises(LedgerError, match="its train/held-out split is not the backup's"):
        check_against_backup(ledger)
    with pytest.raises(LedgerError, match="split is not the backup's"):
        open_site(hospital, server_run(1, 0.2, "test"))


def test_a_patient_s_part_depends_on_nothing_but_the_key_and_its_id():
    spec = SplitSpec.drawn(0.2, 0.1)
    ids = [f"p{i}" for i in range(2000)]
    parts = {i: spec.part(i) for i in ids}
    assert {spec.part(i) for i in reversed(ids)} == set(parts.values())
    assert all(spec.part(i) == parts[i] for i in random.Random(1).sample(ids, 200))
    shares = {p: list(parts.values()).count(p) / len(ids) for p in ("test", "validation")}
    assert abs(shares["test"] - 0.2) < 0.04 and abs(shares["validation"] - 0.1) < 0.03
    other = SplitSpec.drawn(0.2, 0.1)  # another hospital's key places them otherwise
    assert sum(other.part(i) != parts[i] for i in ids) > 300


def _node(hospital: HospitalConfig) -> dict[str, str]:
    return {
        "data-manifest": hospital.data_manifest,
        "hospital-id": hospital.hospital_id,
        "state-dir": hospital.state_dir,
        "ledger-backup": hospital.ledger_backup,
    }
