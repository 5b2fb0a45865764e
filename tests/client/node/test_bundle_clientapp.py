"""A lying server's app bundle cannot choose the code a hospital runs.

Flower imports the ClientApp module that the bundle's pyproject.toml names, from the
bundle's own folder. A server that names a module of its own (here one that wraps the
real ClientApp and turns an audit switch, which would silence the DP noise) must be
refused, and a bundle that shadows the hospital's packages must not be imported.
Each runs in a fresh process, as a ClientApp does, with the hospital's patches.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]

EVIL = """
import client.app.client_app
from client.dp import audit_hooks

audit_hooks._STATE.noise_scale = 0.0  # DP noise off, the accountant none the wiser
app = client.app.client_app.app
"""


def _bundle(folder: Path, clientapp: str) -> Path:
    """A bundle folder: the project's pyproject.toml naming ``clientapp``, and server code."""
    folder.mkdir(parents=True)
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    config, n = re.subn(r'(?m)^clientapp = ".*"$', f'clientapp = "{clientapp}"', config)
    assert n == 1
    (folder / "pyproject.toml").write_text(config, encoding="utf-8")
    (folder / "evil_app.py").write_text(EVIL, encoding="utf-8")
    (folder / "client" / "app").mkdir(parents=True)
    for init in ("client/__init__.py", "client/app/__init__.py"):
        (folder / init).write_text("", encoding="utf-8")
    (folder / "client/app/client_app.py").write_text("raise SystemExit('server code ran')\n")
    return folder


PROBE = """
import json, sys
import client.node.pinned as pinned
pinned.pin()
from client.node.flwr_compat import only_the_hospitals_clientapp
only_the_hospitals_clientapp()
import flwr.clientapp.utils as utils
import flwr.supernode.runtime.run_clientapp as runtime
from flwr.clientapp.client_app import LoadClientAppError
import client.app.client_app as mine
from client.dp import audit_hooks

folder = sys.argv[1]
utils.get_project_dir = lambda fab_id, fab_version, fab_hash: folder  # the installed bundle
before = list(sys.path)
# as run_clientapp calls it for every message
load = runtime.get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
try:
    outcome = "hospital's own" if load("fedfusion/fedfusion", "0.1.0", "h") is mine.app else "?"
except LoadClientAppError as err:
    outcome = f"refused: {err}"
print(json.dumps({
    "outcome": outcome,
    "server_module_imported": "evil_app" in sys.modules,
    "bundle_on_sys_path": sys.path != before or folder in sys.path,
    "noise_scale": audit_hooks._STATE.noise_scale,
    "client_app_from": mine.__file__,
}))
"""


def _load_in_a_clientapp_process(folder: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        cwd=folder.parent,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.fault(
    "A lying server's app bundle names a ClientApp module of its own",
    "The hospital refuses to load it, naming the module and its own "
    "client.app.client_app:app; the bundle's folder never reaches the import path",
    "nothing: the message is not handled",
)
def test_a_bundle_naming_another_clientapp_is_refused_and_never_imported(tmp_path):
    got = _load_in_a_clientapp_process(_bundle(tmp_path / "bundle", "evil_app:app"))
    assert got["outcome"] == (
        "refused: the server's app bundle names the ClientApp 'evil_app:app'; this "
        "hospital runs only its own installed client.app.client_app:app"
    )
    assert got["server_module_imported"] is False and got["bundle_on_sys_path"] is False
    assert got["noise_scale"] == 1.0  # the switch the server's module would have turned


def test_a_bundle_naming_the_hospitals_clientapp_runs_the_installed_one(tmp_path):
    """Its own ``client/app/client_app.py`` (which would exit) is never imported."""
    got = _load_in_a_clientapp_process(_bundle(tmp_path / "b", "client.app.client_app:app"))
    assert got["outcome"] == "hospital's own" and got["bundle_on_sys_path"] is False
    assert got["client_app_from"] == str(ROOT / "client" / "app" / "client_app.py")


def test_both_ways_a_clientapp_starts_install_the_check() -> None:
    """The fork server before it forks, and the cold start (``python -m client.node.pinned``)."""
    for module in ("warm.py", "pinned.py"):
        source = (ROOT / "client" / "node" / module).read_text(encoding="utf-8")
        assert "only_the_hospitals_clientapp()" in source, module
