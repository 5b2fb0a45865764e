"""A ClientApp fetches its message without Flower's 1 s backoff (client/node/flwr_compat.py)."""

from __future__ import annotations

import importlib
import threading
from types import SimpleNamespace

import pytest

from client.node.flwr_compat import fast_message_pulls


@pytest.fixture
def runtime(monkeypatch):
    """Flower's ClientApp runtime module; its pull is restored after the test."""
    module = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    monkeypatch.setattr(
        module, "pull_and_inflate_object_from_tree", module.pull_and_inflate_object_from_tree
    )
    return module


def test_an_object_still_downloading_is_retried_within_tens_of_milliseconds(monkeypatch, runtime):
    """The SuperExec starts a ClientApp before its SuperNode has the message's objects."""
    # Prepare
    import numpy as np
    from flwr.app import Array, ArrayRecord
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
    )
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    waits: list[float] = []

    class Recorded(threading.Event):  # Flower waits out each backoff on this event
        def wait(self, timeout=None):
            waits.append(timeout)
            return False

    monkeypatch.setattr(
        inflatable_utils, "threading", SimpleNamespace(Event=Recorded, Lock=threading.Lock)
    )
    record = ArrayRecord({"weights": Array(np.arange(6.0))})  # a message's content
    contents = {i: obj.deflate() for i, obj in get_all_nested_objects(record).items()}
    misses = {"left": 4}  # the SuperNode is still downloading: four misses, then there

    def pull_object(object_id: str) -> bytes:
        if misses["left"] > 0:
            misses["left"] -= 1
            raise ObjectUnavailableError(object_id)
        return contents[object_id]

    # Execute
    fast_message_pulls()
    pulled = runtime.pull_and_inflate_object_from_tree(
        get_object_tree(record), pull_object, lambda _id: None, return_type=ArrayRecord
    )
    # Assert
    assert pulled.object_id == record.object_id
    assert len(waits) == 4
    assert waits[0] <= 0.02 * 1.2  # Flower's jitter is +-20 %
    assert sum(waits) < 0.5  # Flower's own: 1 + 2 + 4 + 8 s
    fast_message_pulls()  # again: Flower's pull is wrapped once, not twice
    assert not hasattr(runtime.pull_and_inflate_object_from_tree.func, "func")


def test_an_app_bundle_is_unpacked_and_verified_once_per_exact_bytes(
    tmp_path, monkeypatch, runtime
):
    """Flower unpacked and re-verified the FAB for every message; the same bytes, once."""
    # Prepare
    from client.node.flwr_compat import install_each_fab_once

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    installs: list[bytes] = []

    def flower_install(fab_file, install_dir=None, skip_prompt=False):  # unpack, verify
        installs.append(fab_file)
        folder = tmp_path / "apps" / str(len(installs))
        folder.mkdir(parents=True)
        return folder

    monkeypatch.setattr(runtime, "install_from_fab", flower_install)
    install_each_fab_once()
    install = runtime.install_from_fab
    # Execute
    first = install(b"bundle-a", skip_prompt=True)
    again = install(b"bundle-a", skip_prompt=True)
    other = install(b"bundle-b", skip_prompt=True)
    first.rmdir()  # the installed folder is gone: installed afresh
    afresh = install(b"bundle-a", skip_prompt=True)
    install_each_fab_once()  # again: Flower's install is wrapped once, not twice
    runtime.install_from_fab(b"bundle-b", skip_prompt=True)
    # Assert
    assert installs == [b"bundle-a", b"bundle-b", b"bundle-a"]
    assert again == first and other != first and afresh.is_dir()
