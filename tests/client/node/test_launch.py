"""`fedfusion hospital`: the hospital file is checked before anything starts."""

import dataclasses
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from client.node.launch import (
    explain_exit,
    joined_before,
    plan_supernode,
    run_until_joined,
    supernode_environment,
)
from shared_model.cli import build_app
from shared_model.config import ConfigError, HospitalConfig
from shared_model.secagg_signatures import create_signing_key, public_line, write_members
from tests.support.hospitals import hospital_file

ROOT = Path(__file__).resolve().parents[3]


def test_a_good_file_gives_the_supernode_command(tmp_path):
    launch = plan_supernode(hospital_file(tmp_path))
    cmd = launch.command
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9092"
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "certs/ca.crt")
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(tmp_path / "certs/h.key")
    assert "--insecure" not in cmd and not launch.warning
    # the ClientApp reads the same file: its policy is the hospital's
    node_config = dict(p.split("=", 1) for p in shlex.split(cmd[cmd.index("--node-config") + 1]))
    hospital = HospitalConfig.from_node_config(node_config)
    assert hospital.max_epsilon == 3.0 and hospital.state_dir == str(tmp_path / "state")
    # it signs its SecAgg+ keys with the key the server registers
    assert hospital.secagg_signing_key == str(tmp_path / "certs/h.key")


@pytest.mark.parametrize("members", ["missing", "another key", "not listed"])
def test_a_hospital_its_members_file_does_not_list_is_refused_at_start(tmp_path, members):
    path = hospital_file(tmp_path)
    listed = tmp_path / "certs/members.toml"
    if members == "missing":
        listed.unlink()
    else:
        other = create_signing_key(tmp_path / "other.key")
        write_members(listed, {"h" if members == "another key" else "g": public_line(other)})
    with pytest.raises(ConfigError, match="members file"):
        plan_supernode(path)


@pytest.mark.parametrize(
    ("connection", "named"),
    [
        ({"server": '"no-port"'}, "connection.server"),
        ({"private-key": '"certs/missing.key"'}, "connection.private-key"),
        ({"root-certificates": None}, "connection.root-certificates"),
        ({"insecure": "true"}, "contradicts connection.root-certificates"),
        ({"colour": '"blue"'}, "connection.colour"),
        ({"port": '"9094"'}, "connection.port"),
    ],
)
def test_bad_or_contradictory_settings_name_the_key(tmp_path, connection, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        plan_supernode(hospital_file(tmp_path, **connection))


def test_plaintext_only_when_asked_and_loudly(tmp_path):
    launch = plan_supernode(
        hospital_file(tmp_path, **{"root-certificates": None, "insecure": "true"})
    )
    assert "--insecure" in launch.command and "WITHOUT TLS" in launch.warning
    result = CliRunner().invoke(
        build_app(), ["hospital", "--config", str(tmp_path / "hospital.toml"), "--check"]
    )
    assert result.exit_code == 0 and "WITHOUT TLS" in result.output


REFUSED = "ERROR: [code: 2004] Failed to activate SuperNode."


def test_an_unregistered_key_is_explained(tmp_path):
    launch = plan_supernode(hospital_file(tmp_path))
    reason = explain_exit(1, REFUSED, launch)
    assert "not registered" in reason and "flwr supernode register h.pub" in reason
    assert "connection.rejoin-timeout" in reason  # or its previous connection lingers


class Attempts:
    """A SuperNode refused activation ``refusals`` times, then one that joins."""

    def __init__(self, refusals: int, final: tuple[int, str] = (0, "joined; run ended")) -> None:
        self.refusals, self.final, self.calls = refusals, final, 0

    def __call__(self, launch):
        self.calls += 1
        return (1, REFUSED) if self.calls <= self.refusals else self.final


def joined(launch, server: str = "127.0.0.1:9092") -> None:
    """What run_supernode leaves in the state-dir once Flower accepted the hospital."""
    state = Path(launch.hospital.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    (state / "supernode.json").write_text(json.dumps({"server": server, "node_id": "7"}))


@pytest.mark.fault(
    "A hospital restarted while the server still counts it online",
    "It retries joining for connection.rejoin-timeout, saying why",
    "its place in the federation",
)
def test_a_restarted_hospital_retries_joining_until_the_server_frees_it(tmp_path):
    launch = plan_supernode(hospital_file(tmp_path))
    joined(launch)
    assert joined_before(launch)
    said: list[str] = []
    attempts = Attempts(refusals=2)
    code, output = run_until_joined(launch, said.append, attempts, retry_every=0.01)
    assert (code, output, attempts.calls) == (0, "joined; run ended", 3)
    assert len(said) == 2 and "rejoin-timeout" in said[0]


def test_a_hospital_that_never_joined_is_refused_at_once(tmp_path):
    """A refusal before any join means an unregistered key: no point waiting."""
    launch = plan_supernode(hospital_file(tmp_path))
    attempts = Attempts(refusals=1000)
    assert run_until_joined(launch, lambda _: None, attempts, retry_every=0.01)[0] == 1
    assert attempts.calls == 1
    joined(launch, server="elsewhere:9092")  # it joined another server: still new here
    assert not joined_before(launch)
    assert run_until_joined(launch, lambda _: None, attempts, retry_every=0.01)[0] == 1
    assert attempts.calls == 2


def test_rejoining_gives_up_after_the_rejoin_timeout(tmp_path):
    launch = plan_supernode(hospital_file(tmp_path))
    # a timeout far below two heartbeat intervals (the file refuses it): to keep this short
    launch = dataclasses.replace(
        launch, connection=dataclasses.replace(launch.connection, rejoin_timeout=0.2)
    )
    joined(launch)
    attempts = Attempts(refusals=1000)
    started = time.monotonic()
    code, output = run_until_joined(launch, lambda _: None, attempts, retry_every=0.05)
    assert code == 1 and output == REFUSED and 2 <= attempts.calls <= 6
    assert time.monotonic() - started < 2
    other = Attempts(refusals=0, final=(1, "TLS handshake failed"))  # not retried
    assert run_until_joined(launch, lambda _: None, other, 0.01) == other.final
    assert other.calls == 1


def test_the_example_file_in_deploy_parses():
    import tomllib

    data = tomllib.loads((ROOT / "deploy/hospital.toml").read_text())
    assert HospitalConfig.from_node_config(data["hospital"]).hospital_id == "st-mary"
    assert set(data["connection"]) <= {
        "server",
        "root-certificates",
        "private-key",
        "port",
        "insecure",
    }


def test_the_supernode_finds_flowers_commands_without_the_venv_on_path(monkeypatch):
    """A service manager's PATH lacks the venv; the SuperNode starts SuperExec by name."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = supernode_environment()
    for command in ("flower-superexec", "flwr-clientapp"):
        found = shutil.which(command, path=env["PATH"])
        assert found and Path(found).parent == Path(sys.executable).parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.fault(
    "A manifest with patient_id blank on some records, or none under privacy-unit = 'patient'",
    "Refused at start (`fedfusion hospital`), naming privacy-unit, before joining",
    "the ledger (no round opened)",
)
def test_patient_ids_that_do_not_fit_the_privacy_unit_are_refused_at_start(tmp_path):
    path = hospital_file(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,report,labels,patient_id\n,x,normal,p1\n,y,normal,\n")
    with pytest.raises(ConfigError, match="patient_id is blank on some records"):
        plan_supernode(path)
    result = CliRunner().invoke(build_app(), ["hospital", "--config", str(path), "--check"])
    assert result.exit_code == 2 and "privacy-unit = 'record'" in result.output
    manifest.write_text("image,report,labels\n,x,normal\n")  # no patient ids at all
    path.write_text(path.read_text().replace("max-epsilon = 3.0", PATIENT_UNIT))
    with pytest.raises(ConfigError, match="privacy-unit = 'patient' needs a patient_id column"):
        plan_supernode(path)
    manifest.write_text("image,report,labels,patient_id\n,x,normal,p1\n,y,normal,p1\n")
    assert plan_supernode(path).command  # every record with its patient's id: fine


PATIENT_UNIT = 'max-epsilon = 3.0\nprivacy-unit = "patient"'


def _with_device(tmp_path, device):
    path = hospital_file(tmp_path)
    path.write_text(
        path.read_text().replace("max-epsilon = 3.0", f'max-epsilon = 3.0\ndevice = "{device}"')
    )
    return path


@pytest.mark.fault(
    "A hospital whose `device` asks for a GPU this machine does not have",
    "No GPU at all: a one-line warning naming hospital.device, at start and in each "
    "round, and training on the CPU; a GPU index beyond the machine's: refused at start",
    "the hospital's rounds (slower, on the CPU)",
)
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_where_there_is_none_is_warned_at_start_and_the_cpu_trains(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="fedfusion.device"):
        assert plan_supernode(_with_device(tmp_path, "cuda")).command
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "fedfusion.device"]
    assert warned.startswith("hospital.device = 'cuda': ") and "sees no CUDA GPU" in warned


def test_a_gpu_index_that_is_not_there_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"hospital.device = 'cuda:7': this machine has 2 CUDA"):
        plan_supernode(_with_device(tmp_path, "cuda:7"))


@pytest.mark.fault(
    "A hospital started with its budget spent or an untrusted ledger",
    "Refused at start, naming hospital.max-epsilon or hospital.state-dir",
    "the ledger",
)
def test_a_spent_budget_or_an_untrusted_ledger_is_refused_at_start(tmp_path):
    from client.dp.ledger import LedgerEntry, PrivacyLedger
    from client.dp.policy import PrivacyPolicy

    path = hospital_file(tmp_path)  # max-epsilon = 3.0, state-dir = "state"
    plan_supernode(path)  # a new hospital (its ledger just started) starts
    policy = PrivacyPolicy(True, 3.0, 3.0, 1e-5, 1.0, "rdp", "bk")
    ledger = PrivacyLedger.open(tmp_path / "state", "h", policy)
    ledger.begin_round(LedgerEntry(round=1, noise_multiplier=0.6, sample_rate=0.1, steps=50))
    ledger.complete_round(1, 50)
    assert ledger.epsilon() > 3.0
    with pytest.raises(ConfigError, match=r"hospital\.max-epsilon: .* already spent epsilon"):
        plan_supernode(path)
    result = CliRunner().invoke(build_app(), ["hospital", "--config", str(path), "--check"])
    assert result.exit_code == 2 and "already spent epsilon" in result.output
    (tmp_path / "state/privacy_ledger.json").write_text("{garbage")
    with pytest.raises(ConfigError, match=r"hospital\.state-dir: .*refuses to train"):
        plan_supernode(path)


def test_a_hospital_file_whose_split_fractions_changed_is_refused_at_start(tmp_path):
    path = hospital_file(tmp_path)  # `ledger init` fixed test-fraction 0.2
    plan_supernode(path)
    path.write_text(path.read_text().replace("[hospital]\n", "[hospital]\ntest-fraction = 0.3\n"))
    with pytest.raises(ConfigError, match=r"hospital\.state-dir: .*'test-fraction' 0\.3 .*differ"):
        plan_supernode(path)
    shown = CliRunner().invoke(
        build_app(), ["ledger", "show", str(tmp_path / "state"), "--config", str(path)]
    )
    assert shown.exit_code == 2 and "differ from the split fixed" in shown.output
