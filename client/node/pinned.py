"""Run each ClientApp from this hospital's own installed fedfusion, never the server's code.

Flower's SuperNode runs the ClientApp from the app bundle (FAB) the server sends: the
server would choose the code that enforces the hospital's privacy policy. A hospital
started by ``fedfusion hospital`` imports its own installed ``client`` and
``shared_model`` packages before Flower loads the ClientApp; Flower's loader then finds
them already imported and uses them (every later import inside them resolves from the
installed packages too). The server's bundle still supplies the run config defaults,
and a bundle from another fedfusion version is refused by the weights-layout,
frozen-weights and SecAgg+ scheme checks of every request.

Importing first is not enough on its own: Flower imports whatever ClientApp module the
bundle names, from the bundle's folder. ``flwr_compat.only_the_hospitals_clientapp``
refuses a bundle that names any ClientApp other than the hospital's own, and keeps the
bundle's folder off ``sys.path``.

Both ways a ClientApp starts are pinned: the warm fork server imports these packages
before it forks (``client/node/warm.py``), and a cold start runs
``python -m client.node.pinned``, which imports them and then runs Flower's
``flwr-clientapp``.
"""

from __future__ import annotations

import importlib
import shlex
import sys
import tempfile
from pathlib import Path

__all__ = ["PINNED", "cold_clientapp", "module_script", "pin"]

# The hospital's own modules that Flower would otherwise load from the server's bundle.
PINNED = ("client.app.client_app", "shared_model")


def pin() -> list[str]:
    """Import the hospital's own ClientApp and shared code; returns where they came from."""
    return [str(Path(importlib.import_module(name).__file__ or "").parent) for name in PINNED]


def module_script(directory: Path, name: str, module: str) -> Path:
    """An executable ``directory/name`` that runs ``python -m module`` with its arguments.

    Flower starts its helper processes by name from PATH; this puts ours first.
    """
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / name
    python = shlex.quote(sys.executable)
    script.write_text(f'#!/bin/sh\nexec {python} -m {module} "$@"\n', encoding="utf-8")
    script.chmod(0o700)
    return script


def cold_clientapp(directory: Path | None = None) -> Path:
    """A ``flwr-clientapp`` for the SuperExec's PATH that runs the pinned cold start."""
    directory = Path(directory or tempfile.mkdtemp(prefix="fedfusion-clientapp-"))
    return module_script(directory, "flwr-clientapp", "client.node.pinned")


def main() -> None:
    """``python -m client.node.pinned [flwr-clientapp arguments]``."""
    pin()
    from client.node.flwr_compat import (  # after pin(): pinned code first
        CLIENTAPP,
        entry,
        fast_message_pulls,
        install_each_fab_once,
        only_the_hospitals_clientapp,
    )

    fast_message_pulls()
    install_each_fab_once()
    only_the_hospitals_clientapp()

    sys.argv[0] = "flwr-clientapp"
    entry(CLIENTAPP)()


if __name__ == "__main__":
    main()
