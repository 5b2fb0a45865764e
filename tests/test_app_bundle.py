"""What `flwr run` ships to every hospital: the code, never an operator's files."""

import io
import shutil
import zipfile
from pathlib import Path

from flwr.cli.build import build_fab_from_disk

ROOT = Path(__file__).resolve().parents[1]


def test_the_app_bundle_holds_the_code_and_nothing_an_operator_wrote(tmp_path):
    """A server.toml with a tracking URI's password, a run, an MLflow store: none ships."""
    app = tmp_path / "clone"
    app.mkdir()
    shutil.copy(ROOT / "pyproject.toml", app)
    for package in ("server", "client", "shared_model"):
        shutil.copytree(ROOT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    (app / "server.toml").write_text('[server]\ntracking-uri = "postgresql://u:S3cret@db/x"\n')
    for name in ("runs/20261202-000000/metrics.json", "mlruns/1/metrics.json", "notes.md"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text('{"hospital": "Qx7-records", "num_examples": 412}')
    bundle = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app)))
    names = bundle.namelist()
    assert "server/app/server_app.py" in names and "client/app/client_app.py" in names
    assert {n for n in names if not n.endswith(".py")} <= {"pyproject.toml", ".info/CONTENT"}
    assert not any(b"S3cret" in bundle.read(n) or b"Qx7-records" in bundle.read(n) for n in names)
