"""deploy/ runs exactly the commands the loopback deployment test runs."""

import configparser
import shlex
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


@pytest.mark.parametrize(
    ("unit", "command"),
    [
        ("fedfusion-hospital.service", ["hospital", "--config"]),
        ("fedfusion-server.service", ["server", "--config"]),
    ],
)
def test_systemd_units_run_the_tested_commands(unit, command):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "fedfusion" and argv[1:3] == command
    assert argv[3].endswith(".toml")
    assert service["KillMode"] == "control-group"  # Flower's SuperExec leaves the session
    assert service["NoNewPrivileges"] == "true"
    assert parser["Install"]["WantedBy"] == "multi-user.target"
