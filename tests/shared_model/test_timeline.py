"""The per-hop timeline (shared_model/timeline.py): off by default, one file for all processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from shared_model.timeline import TIMELINE_ENV, enabled, mark, read

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_is_recorded_unless_a_timeline_file_is_set(tmp_path, monkeypatch):
    # Prepare
    monkeypatch.delenv(TIMELINE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    # Execute
    mark("server.push", stage="setup")
    # Assert
    assert not enabled()
    assert list(tmp_path.iterdir()) == []


def test_marks_of_several_processes_land_in_one_file_in_time_order(tmp_path, monkeypatch):
    # Prepare
    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv(TIMELINE_ENV, str(path))
    child = "from shared_model.timeline import mark; mark('node.pulled', node=7)"
    # Execute
    mark("server.push", stage="setup", messages=3)
    subprocess.run([sys.executable, "-c", child], cwd=ROOT, env=os.environ.copy(), check=True)
    with path.open("a") as handle:  # a process killed mid-line
        handle.write('{"t": 1')
    events = read(path)
    # Assert
    assert enabled()
    assert [e["event"] for e in events] == ["server.push", "node.pulled"]
    assert events[0]["t"] <= events[1]["t"]
    assert events[0]["pid"] == os.getpid() != events[1]["pid"]
    assert events[0]["stage"] == "setup" and events[1]["node"] == 7
    assert path.stat().st_mode & 0o077 == 0  # only its owner reads it


def test_a_timeline_that_cannot_be_written_never_breaks_the_caller(tmp_path, monkeypatch):
    monkeypatch.setenv(TIMELINE_ENV, str(tmp_path / "missing-folder" / "timeline.jsonl"))
    mark("clientapp.handle")  # no exception
    assert not (tmp_path / "missing-folder").exists()
