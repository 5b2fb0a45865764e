"""Atomic writes: the old file or the new one, never half, and no temporary file left."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from shared_model import files
from shared_model.files import (
    write_atomic,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.fault(
    injected="An atomic write fails half-way through the new content",
    outcome="The error reaches the caller; no temporary file is left",
    kept="the old file, byte for byte",
)
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    # Prepare
    target = tmp_path / "ledger.json"
    write_text_atomic(target, "old")

    def half_then_fail(tmp: Path) -> None:
        with tmp.open("w") as handle:
            handle.write("new, but only ha")
        raise OSError("disk full")

    # Execute
    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)

    # Assert
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


@pytest.mark.fault(
    injected="An atomic JSON write of a value JSON cannot hold",
    outcome="TypeError before any file is touched",
    kept="the old file",
)
def test_data_that_is_not_json_leaves_no_trace(tmp_path):
    target = tmp_path / "run.json"
    write_json_atomic(target, {"round": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"round": object()})
    assert json.loads(target.read_text()) == {"round": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_each_form_writes_its_content_and_replaces_the_old(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "b.txt", "é", encoding="latin-1")
    write_json_atomic(tmp_path / "deeper" / "c.json", [1, 2])  # parent folders made
    write_atomic(tmp_path / "d.txt", lambda tmp: tmp.write_text("first"))
    write_atomic(tmp_path / "d.txt", lambda tmp: tmp.write_text("second"))

    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "é".encode("latin-1")
    assert json.loads((tmp_path / "deeper" / "c.json").read_text()) == [1, 2]
    assert (tmp_path / "d.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "d.txt", "deeper"]


def test_modes_private_by_default_exact_when_given_else_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "private", "x")
        write_text_atomic(tmp_path / "given", "x", mode=0o640)
        write_text_atomic(tmp_path / "plain", "x", mode=None)
        os.umask(0o077)
        write_text_atomic(tmp_path / "under-077", "x", mode=0o644)  # exact, whatever the umask
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o600
    assert _mode(tmp_path / "given") == 0o640
    assert _mode(tmp_path / "plain") == 0o644  # as open() would make it under umask 022
    assert _mode(tmp_path / "under-077") == 0o644


def test_a_writer_that_replaces_the_temporary_file_still_gets_the_mode(tmp_path):
    def replace_it(tmp: Path) -> None:  # as a library writing through its own rename might
        tmp.unlink()
        tmp.write_text("x")
        tmp.chmod(0o666)

    write_atomic(tmp_path / "f", replace_it)
    assert _mode(tmp_path / "f") == 0o600


def test_missing_folder_is_an_error_when_it_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_text_atomic(tmp_path / "unmounted" / "backup.json", "x", make_parents=False)
    assert not (tmp_path / "unmounted").exists()


def test_the_content_is_synced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    # Prepare: record what each fsync flushed, and whether the target held the new text then
    target = tmp_path / "ledger.json"
    synced: list[tuple[str, str]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        what = Path(f"/proc/self/fd/{fd}").readlink()
        content = target.read_text() if target.exists() else ""
        synced.append(("folder" if what == tmp_path else what.name, content))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", recording_fsync)

    # Execute
    write_text_atomic(target, "new")

    # Assert: the temporary file (beside the target) before the rename, the folder after
    assert len(synced) == 2
    (first, before), (second, after) = synced
    assert first.startswith(".ledger.json.") and first.endswith(".tmp") and before == ""
    assert (second, after) == ("folder", "new")
