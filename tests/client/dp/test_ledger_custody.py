"""A privacy ledger never silently restarts: deleted, replaced, edited or rolled back.

Written as the careless operator or the attacker would act on a hospital's state
directory, against the hospital's own code paths (client/dp/ledger_custody.py, which the
trainer and `fedfusion hospital` use), and the `fedfusion ledger` commands.
"""

import json
import shutil
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from client.dp.ledger import LEDGER_FILENAME, LedgerEntry, LedgerError, PrivacyLedger, _checksum
from client.dp.ledger_custody import init_ledger, open_ledger, restore_ledger
from client.dp.policy import PrivacyPolicy
from shared_model.cli import build_app
from shared_model.split import SplitSpec

POLICY = PrivacyPolicy(True, 8.0, 8.0, 1e-5, 1.0, "rdp", "bk")
SPLIT = SplitSpec.drawn(0.2)
ROUND = LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=0.1, steps=40)


def hospital(tmp_path, rounds: int = 2):
    """A hospital that started its ledger and trained ``rounds`` rounds; its paths."""
    state, backup = tmp_path / "state", tmp_path / "elsewhere" / "st-mary.privacy_ledger.json"
    init_ledger(state, "st-mary", POLICY, backup, SPLIT)
    for r in range(1, rounds + 1):
        ledger = open_ledger(state, "st-mary", POLICY, (), backup, allow_new=False)
        ledger.begin_round(LedgerEntry(**{**ROUND.__dict__, "round": r}))
        ledger.complete_round(r, ROUND.steps)
    (state / "evaluation.jsonl").write_text("{}\n")  # what a hospital that took part leaves
    return state, backup


def hospital_file(tmp_path, state, backup):
    config = tmp_path / "hospital.toml"
    config.write_text(
        f'[hospital]\nhospital-id = "st-mary"\ndata-manifest = "m.csv"\n'
        f'state-dir = "{state}"\nledger-backup = "{backup.parent}"\n'
    )
    return config


def reopen(state, backup):
    return open_ledger(state, "st-mary", POLICY, (), backup, allow_new=False)


@pytest.mark.fault(
    "The privacy ledger is deleted (or a container starts without its volume)",
    "The hospital refuses to train, naming the backup to restore; `fedfusion ledger "
    "restore` puts it back",
    "epsilon spent: restored exactly",
)
def test_a_deleted_ledger_is_refused_and_restored_from_its_backup(tmp_path):
    state, backup = hospital(tmp_path)
    spent = reopen(state, backup).epsilon()
    (state / LEDGER_FILENAME).unlink()
    with pytest.raises(LedgerError, match=r"its backup .* exists: the ledger was deleted"):
        reopen(state, backup)
    config = hospital_file(tmp_path, state, backup)
    again = CliRunner().invoke(build_app(), ["ledger", "init", "--config", str(config)])
    assert again.exit_code == 2 and "ledger was deleted" in again.output
    restored = CliRunner().invoke(build_app(), ["ledger", "restore", "--config", str(config)])
    assert restored.exit_code == 0, restored.output
    assert reopen(state, backup).epsilon() == pytest.approx(spent)


def test_a_state_directory_used_before_is_not_started_anew_without_a_persons_word(tmp_path):
    state, backup = hospital(tmp_path)
    (state / LEDGER_FILENAME).unlink()
    shutil.rmtree(backup.parent)  # and the backup lost too
    with pytest.raises(LedgerError, match=r"used before \(evaluation.jsonl\)"):
        reopen(state, backup)
    with pytest.raises(LedgerError, match="--fresh-start"):
        init_ledger(state, "st-mary", POLICY, backup, SPLIT)
    fresh = init_ledger(state, "st-mary", POLICY, backup, SPLIT, fresh_start=True)
    assert fresh.epsilon() == 0.0


def test_a_new_hospital_is_told_to_start_its_ledger_and_a_simulated_one_starts_alone(tmp_path):
    with pytest.raises(LedgerError, match="started once, by a person: `fedfusion ledger init"):
        open_ledger(tmp_path / "new", "h", POLICY, (), tmp_path / "b.json", allow_new=False)
    simulated = open_ledger(tmp_path / "sim", "h", POLICY, (), tmp_path / "b.json", True)
    assert simulated.history == []


@pytest.mark.fault(
    "The privacy ledger is replaced by a fresh one, or rolled back to an older copy",
    "The hospital refuses to train: the ledger disagrees with its backup",
    "the backup, which `fedfusion ledger restore` puts back",
)
@pytest.mark.parametrize("how", ["replaced", "rolled back"])
def test_a_replaced_or_rolled_back_ledger_disagrees_with_its_backup(tmp_path, how):
    state, backup = hospital(tmp_path, rounds=1)
    older = (state / LEDGER_FILENAME).read_bytes()
    ledger = reopen(state, backup)
    ledger.begin_round(LedgerEntry(**{**ROUND.__dict__, "round": 2}))
    ledger.complete_round(2, ROUND.steps)
    if how == "replaced":
        (state / LEDGER_FILENAME).unlink()
        PrivacyLedger.open(state, "st-mary", POLICY).save()  # a new, empty, valid ledger
    else:
        (state / LEDGER_FILENAME).write_bytes(older)  # valid, one round behind
    with pytest.raises(LedgerError, match="disagrees with its backup"):
        reopen(state, backup)
    # `fedfusion ledger show` reports it too, given the hospital's file (where its backup is)
    config = hospital_file(tmp_path, state, backup)
    shown = CliRunner().invoke(build_app(), ["ledger", "show", str(state), "--config", str(config)])
    assert shown.exit_code == 2 and "disagrees with its backup" in shown.output
    unchecked = CliRunner().invoke(build_app(), ["ledger", "show", str(state)])
    assert unchecked.exit_code == 0 and "backup not checked" in unchecked.output


@pytest.mark.fault(
    "A ledger entry is edited to lower epsilon, its checksum (and chain) recomputed",
    "The hospital refuses to train: the hash chain, or the backup, shows the edit",
    "the backup's record of every release",
)
@pytest.mark.parametrize("recompute_chain", [False, True])
def test_an_edited_entry_is_caught_even_with_its_checksum_recomputed(tmp_path, recompute_chain):
    state, backup = hospital(tmp_path)
    path = state / LEDGER_FILENAME
    original = json.loads(path.read_text())
    ledger = PrivacyLedger.from_json(path.read_bytes(), path)
    ledger.history[0] = replace(ledger.history[0], steps=1)  # fewer steps: a smaller epsilon
    data = ledger.to_dict()  # epsilon, chain and checksum all recomputed, as the code does
    if not recompute_chain:  # the chain hashes left as they were
        for entry, kept in zip(data["history"], original["history"], strict=True):
            entry["chain"] = kept["chain"]
        data.pop("checksum")
        data["checksum"] = _checksum(data)
    assert data["epsilon"] < original["epsilon"]
    path.write_text(json.dumps(data))
    match = "disagrees with its backup" if recompute_chain else "hash chain is broken"
    with pytest.raises(LedgerError, match=match):
        reopen(state, backup)


def _as_previous_format(path, keep_split=False):
    """Rewrite a ledger as the previous format (/2) would have written it."""
    data = json.loads(path.read_text())
    data.pop("checksum")
    data.pop("genesis")
    for key in ("max_held_out_epsilon", "held_out_epsilon", *(() if keep_split else ("split",))):
        data.pop(key, None)
    for entry in data["history"]:
        entry.pop("chain")
    data["format"] = "fedfusion-privacy-ledger/2"
    path.write_text(json.dumps({**data, "checksum": _checksum(data)}))


def test_a_ledger_of_the_previous_format_is_continued_chained_once_a_person_backs_it_up(
    tmp_path,
):
    state, backup = hospital(tmp_path)
    path = state / LEDGER_FILENAME
    _as_previous_format(path)
    shutil.rmtree(backup.parent)
    with pytest.raises(LedgerError, match="has no backup"):  # no exemption for /2
        reopen(state, backup)
    config = hospital_file(tmp_path, state, backup)
    written = CliRunner().invoke(build_app(), ["ledger", "backup", "--config", str(config)])
    assert written.exit_code == 0, written.output
    ledger = reopen(state, backup)
    before = ledger.epsilon()
    ledger.save()  # now the current format, its entries chained, and backed up
    assert json.loads(path.read_text())["format"] == "fedfusion-privacy-ledger/3"
    assert reopen(state, backup).epsilon() == pytest.approx(before)


def test_a_ledger_rewritten_as_the_previous_format_is_refused(tmp_path):
    """An intruder downgrades the ledger to drop its chain, its split or its releases."""
    state, backup = hospital(tmp_path)
    path = state / LEDGER_FILENAME
    original = path.read_text()
    _as_previous_format(path, keep_split=True)
    with pytest.raises(LedgerError, match="a split or unit in a ledger of the old format"):
        reopen(state, backup)
    path.write_text(original)
    _as_previous_format(path)
    with pytest.raises(LedgerError, match="disagrees with its backup"):  # another genesis
        reopen(state, backup)
    shutil.rmtree(backup.parent)  # and the backup's storage not mounted
    with pytest.raises(LedgerError, match="has no backup"):
        reopen(state, backup)


def test_a_ledger_whose_backup_is_gone_is_refused_until_a_person_writes_a_new_one(tmp_path):
    state, backup = hospital(tmp_path)
    shutil.rmtree(backup.parent)  # deleted, or its storage not mounted
    with pytest.raises(LedgerError, match="has no backup"):
        reopen(state, backup)
    config = hospital_file(tmp_path, state, backup)
    written = CliRunner().invoke(build_app(), ["ledger", "backup", "--config", str(config)])
    assert written.exit_code == 0, written.output
    assert reopen(state, backup).epsilon() > 0


@pytest.mark.parametrize(
    "forged",
    [
        {"steps": -2},
        {"steps": 0},
        {"steps": 2.5},
        {"sample_rate": 2.0},
        {"noise_multiplier": -1.0},
        {"mechanism": "free"},
    ],
)
def test_an_entry_no_release_could_have_made_is_refused_even_if_appended(tmp_path, forged):
    """A release appended after the backup's, with everything recomputed: a negative step
    count would lower epsilon. Values fedfusion never writes are refused by name."""
    state, backup = hospital(tmp_path)
    path = state / LEDGER_FILENAME
    data = json.loads(path.read_text())
    data["history"].append({**data["history"][-1], "round": 3, **forged, "chain": ""})
    data.pop("checksum")
    path.write_text(json.dumps({**data, "checksum": _checksum(data)}))
    with pytest.raises(LedgerError, match="not one fedfusion could have made"):
        reopen(state, backup)


def test_a_backup_that_is_the_ledger_itself_or_inside_state_dir_is_refused(tmp_path):
    state, _ = hospital(tmp_path)
    with pytest.raises(LedgerError, match="is the ledger itself"):
        reopen(state, state / LEDGER_FILENAME)
    config = tmp_path / "inside.toml"
    config.write_text(
        f'[hospital]\nhospital-id = "st-mary"\ndata-manifest = "m.csv"\n'
        f'state-dir = "{state}"\nledger-backup = "{state / "copy"}"\n'
    )
    shown = CliRunner().invoke(build_app(), ["ledger", "show", str(state), "--config", str(config)])
    assert shown.exit_code == 2 and "lies in state-dir" in shown.output


def test_a_backup_of_another_hospital_is_not_restored(tmp_path):
    state, backup = hospital(tmp_path)
    (state / LEDGER_FILENAME).unlink()
    with pytest.raises(LedgerError, match="is the ledger of st-mary, not county"):
        restore_ledger(state, "county", backup)
