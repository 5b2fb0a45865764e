"""`fedfusion server`: the server file is checked before anything starts."""

import dataclasses
from pathlib import Path

import pytest

from server.commands.config import ServerDeployConfig
from server.commands.serve import superlink_command
from shared_model.config import ConfigError

ROOT = Path(__file__).resolve().parents[3]


def server_file(tmp_path, server: dict, run: str = "num-rounds = 2\n") -> Path:
    for name in ("ca.crt", "server.pem", "server.key", "h0.pub"):
        (tmp_path / name).write_text("x")
    table = {
        "address": '"127.0.0.1:9092"',
        "state-dir": '"state"',
        "root-certificates": '"ca.crt"',
        "certificate": '"server.pem"',
        "private-key": '"server.key"',
        "hospitals": '["h0.pub"]',
        **server,
    }
    body = "\n".join(f"{k} = {v}" for k, v in table.items() if v is not None)
    path = tmp_path / "server.toml"
    path.write_text(f"[server]\n{body}\n\n[run]\n{run}")
    return path


def test_a_good_file_gives_a_tls_superlink_with_authentication(tmp_path):
    cfg, run, settings = ServerDeployConfig.from_file(server_file(tmp_path, {}))
    cmd = superlink_command(cfg)
    assert "--enable-supernode-auth" in cmd and "--disable-runtime-dependency-installation" in cmd
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tmp_path / "server.pem")
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state" / "superlink.db")
    assert cfg.hospital_keys() == [str(tmp_path / "h0.pub")]
    assert run.num_rounds == 2 and settings == {"num-rounds": 2}


@pytest.mark.parametrize(
    ("server", "run", "named"),
    [
        ({"certificate": '"missing.pem"'}, "", "server.certificate"),
        ({"private-key": None}, "", "server.private-key"),
        ({"insecure": "true"}, "", "contradicts the TLS files"),
        ({"address": '"9092"'}, "", "server.address"),
        ({"hospitals": '["nobody.pub"]'}, "", "server.hospitals"),
        ({"colour": '"blue"'}, "", "server.colour"),
        ({}, "privacy.target-epsilonn = 3.0\n", "privacy.target-epsilonn"),
    ],
)
def test_bad_or_contradictory_settings_name_the_key(tmp_path, server, run, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        ServerDeployConfig.from_file(server_file(tmp_path, server, run or "num-rounds = 2\n"))


def test_plaintext_only_when_asked(tmp_path):
    cfg, _, _ = ServerDeployConfig.from_file(
        server_file(
            tmp_path,
            {
                "insecure": "true",
                "root-certificates": None,
                "certificate": None,
                "private-key": None,
            },
        )
    )
    cmd = superlink_command(cfg)
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd


def test_the_example_file_in_deploy_parses_its_run_settings():
    import tomllib

    data = tomllib.loads((ROOT / "deploy/server.toml").read_text())
    keys = {f.name.replace("_", "-") for f in dataclasses.fields(ServerDeployConfig)}
    assert set(data["server"]) <= keys and "tracking" in data["server"]
    from shared_model.config import RunConfig, flatten_toml

    assert RunConfig.from_run_config(flatten_toml(data["run"])).num_rounds == 10


@pytest.mark.parametrize(
    ("file_says", "flags", "expected"),
    [
        ({}, [], ""),  # the default store beside the runs
        ({"tracking": "false"}, [], "off"),
        ({"tracking-uri": '"http://mlflow.internal:5000"'}, [], "http://mlflow.internal:5000"),
        ({"tracking-uri": '"http://mlflow.internal:5000"'}, ["--no-tracking"], "off"),
        (
            {"tracking": "false"},
            ["--tracking", "--tracking-uri", "sqlite:///t.db"],
            "sqlite:///t.db",
        ),
    ],
)
def test_where_a_deployed_run_is_tracked(tmp_path, monkeypatch, file_says, flags, expected):
    """server.toml's tracking keys, overridden by the flags, reach the server's processes."""
    from typer.testing import CliRunner

    from server.app.tracking import TRACKING_ENV
    from server.commands import serve
    from server.commands.superlink import RunResult
    from shared_model.cli import build_app

    seen = {}

    def fake_run_server(*args, tracking=None, **kwargs):
        seen.update(tracking or {})
        return RunResult(run_dir=tmp_path)

    monkeypatch.setattr(serve, "run_server", fake_run_server)
    path = server_file(tmp_path, file_says)
    CliRunner().invoke(build_app(), ["server", "--config", str(path), *flags])
    assert seen[TRACKING_ENV] == expected


def _superlink_db(path: Path, nodes: list[tuple[str, float | None, float | None]]) -> Path:
    """A database with Flower's node table as a SuperLink left it: (status, until, interval)."""
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as con:
        con.execute(
            "CREATE TABLE node (node_id INTEGER, status TEXT, online_until FLOAT, "
            "heartbeat_interval FLOAT)"
        )
        con.executemany(
            "INSERT INTO node VALUES (?, ?, ?, ?)",
            [(i, *node) for i, node in enumerate(nodes)],
        )
        con.commit()
    return path


def test_a_restarted_server_waits_until_the_stale_online_statuses_expire(tmp_path):
    """A SuperLink restarted on its database counts a hospital online until two of its
    heartbeat intervals after its last heartbeat: the server waits until the latest of
    those instants, no longer (Flower's default interval gave a fixed 60 s before)."""
    from server.commands.serve import stale_status_wait

    now = 1_000_000.0
    db = _superlink_db(
        tmp_path / "a.db",
        [("online", now + 12.5, 10.0), ("online", now + 3.0, 10.0), ("offline", now + 900, 30.0)],
    )
    assert stale_status_wait(db, now=now) == pytest.approx(12.5)  # the latest online one
    assert stale_status_wait(db, now=now + 20) == 0.0  # all expired already
    # never longer than two of the longest declared interval (a clock jump, a bad value)
    far = _superlink_db(tmp_path / "b.db", [("online", now + 500, 10.0)])
    assert stale_status_wait(far, now=now) == pytest.approx(20.0)
    # a hospital that declared half-hour heartbeats: no longer than the operator's limit
    slow = _superlink_db(tmp_path / "d.db", [("online", now + 3000, 1800.0)])
    assert stale_status_wait(slow, now=now, limit=120.0) == 120.0
    # nobody online when it stopped: nothing to wait for
    assert stale_status_wait(_superlink_db(tmp_path / "c.db", [("offline", now, 30.0)])) == 0.0


@pytest.mark.parametrize("content", ["not a database", "schema"])
def test_a_database_it_cannot_read_waits_flowers_default(tmp_path, content):
    from server.commands.serve import stale_status_wait

    db = tmp_path / "superlink.db"
    if content == "schema":  # a Flower that keeps its nodes elsewhere
        import contextlib
        import sqlite3

        with contextlib.closing(sqlite3.connect(db)) as con:
            con.execute("CREATE TABLE nodes (id INTEGER)")
    else:
        db.write_text(content)
    assert stale_status_wait(db) == 60.0
    bad = _superlink_db(tmp_path / "bad.db", [("online", None, 10.0)])
    assert stale_status_wait(bad) == 60.0


def test_the_wait_reads_what_flowers_own_superlink_left_after_a_kill(tmp_path):
    """Flower's own link state writes the database (a hospital with 10 s heartbeats and one
    with 30 s), then is killed with SIGKILL, leaving its write-ahead log unmerged; the
    folder's name holds a '#', which a file: URI would cut."""
    import subprocess
    import sys
    import time

    from server.commands.serve import stale_status_wait

    folder = tmp_path / "state#1"
    folder.mkdir()
    db = folder / "superlink.db"
    child = (
        "import os, signal, sys\n"
        "from flwr.superlink.config_loader import get_objectstore_linkstate_factories\n"
        "from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager\n"
        "_, f = get_objectstore_linkstate_factories(sys.argv[1], NoOpFederationManager())\n"
        "s = f.state()\n"
        "a = s.create_node('aid', 'a', b'pk-1', 10.0)\n"
        "b = s.create_node('aid', 'b', b'pk-2', 30.0)\n"
        "assert s.activate_node(a, 10.0) and s.activate_node(b, 30.0)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    started = time.time()
    killed = subprocess.run([sys.executable, "-c", child, str(db)], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    waited = stale_status_wait(db)
    # the 30 s hospital's status expires 60 s after it was activated, no later
    assert 60 - (time.time() - started) - 1 <= waited <= 60
    assert not (tmp_path / "state").exists()  # nothing created where the '#' would cut
