"""Every patch of Flower internals the hospital's node runtime makes, for Flower 1.42.

Each entry of :data:`PATCHED` is a Flower symbol fedfusion replaces or runs by name, with
the parameter names it had in that version (``None``: it must only exist);
``tests/test_flwr_compat.py`` fails when one disappears or changes its parameters, and
when code listed in :data:`PATCHED_SOURCES` differs from the code the patch was
written against.

- :func:`scale_waits`: the SuperNode loop's fixed waits (``client/node/supernode.py``
  says why) through its ``time``, ``pull_objects`` and ``_push_messages``, and the
  per-hop timeline (``shared_model/timeline.py``) through ``_pull_and_store_message``;
- :func:`heartbeat_every`: the SuperNode's heartbeat interval, Flower's fixed 30 s, is
  ``connection.heartbeat-interval``;
- :func:`fast_message_pulls`: a ClientApp fetching its message from its SuperNode
  retries an object the SuperNode is still downloading after 1 s, doubling to 10 s,
  with no setting: now after 20 ms, growing to 0.5 s (a local request each time);
- :func:`install_each_fab_once`: a ClientApp unpacks and re-verifies the app bundle
  (FAB) for every message, 0.2-0.4 s on a busy machine; now only the first time these
  exact bytes arrive;
- :func:`only_the_hospitals_clientapp`: Flower imports whatever ClientApp module the
  server's app bundle names, from the bundle's folder put first on ``sys.path``: code the
  server chose would run at the hospital. Now a bundle naming any other ClientApp is
  refused and the hospital's own runs, with the bundle's folder never on ``sys.path``;
- the SuperExec's task poll (``client/node/superexec.py``) through its ``time`` and the
  ``subprocess`` its executor starts ClientApps with (:func:`superexec_modules`);
- the entry points a hospital's processes run: Flower's ``flower-supernode`` and
  ``flwr-clientapp`` (forked warm by ``client/node/warm.py``, pinned to the hospital's
  own code by ``client/node/pinned.py``).

The module imports Flower only, never torch.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import time
from collections.abc import Callable
from hashlib import sha256
from pathlib import Path
from types import ModuleType
from typing import Any

from shared_model import timeline

__all__ = [
    "CLIENTAPP",
    "FLOWER_IDLE_POLL",
    "FLOWER_VERSION",
    "PATCHED",
    "PATCHED_SOURCES",
    "SUPEREXEC",
    "SUPERNODE",
    "fast_message_pulls",
    "heartbeat_every",
    "install_each_fab_once",
    "only_the_hospitals_clientapp",
    "scale_waits",
    "superexec_modules",
]

FLOWER_VERSION = "1.42"
FLOWER_IDLE_POLL = 3.0  # seconds: the idle poll of flwr 1.42's SuperNode loop
_LOOP = "flwr.supernode.start_client_internal"
_RUNTIME = "flwr.supernode.runtime.run_clientapp"  # inside a ClientApp process
CLIENTAPP = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"  # a ClientApp process
# The one ClientApp a hospital runs: its own installed one (client/node/pinned.py).
HOSPITAL_CLIENTAPP = "client.app.client_app:app"
_APP_UTILS = "flwr.clientapp.utils"
SUPERNODE = "flwr.supernode.cli.flower_supernode:flower_supernode"  # the SuperNode
SUPEREXEC = "flwr.supercore.cli.flower_superexec:flower_superexec"  # starts ClientApps
_EXEC_LOOP = "flwr.supercore.superexec.run_superexec"
_EXECUTOR = "flwr.supercore.superexec.executor.subprocess_executor"
_FLEET = "flwr.supernode.fleet_http_connection"
_HEARTBEAT = "flwr.supercore.heartbeat"
PATCHED: dict[str, tuple[str, ...] | None] = {
    f"{_LOOP}:time": None,
    f"{_LOOP}:pull_objects": (
        "object_ids",
        "pull_object_fn",
        "max_concurrent_pulls",
        "max_time",
        "max_tries_per_object",
        "initial_backoff",
        "backoff_cap",
    ),
    f"{_LOOP}:_push_messages": ("state", "object_store", "send", "push_object"),
    f"{_LOOP}:_pull_and_store_message": (
        "state",
        "object_store",
        "node_config",
        "receive",
        "get_run",
        "get_fab",
        "pull_object",
        "confirm_message_received",
        "trusted_entities",
    ),
    f"{_RUNTIME}:pull_and_inflate_object_from_tree": (
        "object_tree",
        "pull_object_fn",
        "confirm_object_received_fn",
        "return_type",
        "max_concurrent_pulls",
        "max_time",
        "max_tries_per_object",
        "initial_backoff",
        "backoff_cap",
    ),
    f"{_RUNTIME}:install_from_fab": ("fab_file", "install_dir", "skip_prompt"),
    f"{_RUNTIME}:get_load_client_app_fn": ("default_app_ref", "app_path", "multi_app"),
    f"{_APP_UTILS}:get_project_dir": None,
    f"{_APP_UTILS}:get_project_config": None,
    "flwr.clientapp.client_app:LoadClientAppError": None,
    "flwr.supercore.utils:get_flwr_home": (),
    "flwr.supercore.constant:PULL_INITIAL_BACKOFF": None,
    "flwr.supercore.constant:PULL_BACKOFF_CAP": None,
    f"{_EXEC_LOOP}:time": None,
    f"{_EXEC_LOOP}:_get_task_poll_interval": (),
    f"{_EXECUTOR}:subprocess": None,
    f"{_FLEET}:HEARTBEAT_DEFAULT_INTERVAL": None,
    f"{_HEARTBEAT}:HEARTBEAT_DEFAULT_INTERVAL": None,
    CLIENTAPP: (),
    SUPERNODE: (),
    SUPEREXEC: (),
}
# The code whose fixed waits scale_waits rescales: the idle poll (time.sleep(3)) and the
# reply waits (time.sleep(0.5)); and the pull it times (a run id when a message arrived,
# None when none did); and the ClientApp's fetch of its message, which must go through
# the pull fast_message_pulls replaces. ``tests/test_flwr_compat.py`` fails when it changes.
PATCHED_SOURCES: dict[str, str] = {
    f"{_RUNTIME}:pull_task_input": "5607a23e1673ee87",
    # calls install_from_fab(fab.content, skip_prompt=True) by name for each message,
    # ignores what it returns, then loads the app from get_project_dir(...)
    f"{_RUNTIME}:run_clientapp": "6ce09559f3a2f5dc",
    # the SuperExec's loop sleeps time.sleep(task_poll_interval) between task polls, and
    # its executor starts each ClientApp with subprocess.Popen
    f"{_EXEC_LOOP}:run_superexec": "91e7a33c5b898f33",
    f"{_EXECUTOR}:SubprocessExecutor.launch": "83abf3dbe02281fd",
    f"{_LOOP}:start_client_internal": "9e89a6eb68fbec68",
    f"{_LOOP}:_push_messages": "00bb86faffdec114",
    f"{_LOOP}:_pull_and_store_message": "eaf5d0e36dc34e4c",
    # the connection declares HEARTBEAT_DEFAULT_INTERVAL when it activates the node and
    # with each heartbeat; the sender waits in proportion to it between heartbeats
    f"{_FLEET}:http_request_response": "b80ca36779c2657f",
    f"{_HEARTBEAT}:HeartbeatSender._run": "b176ff96c68dbee2",
}


def entry(ref: str) -> Callable[[], None]:
    """The function a ``module:function`` reference names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def fast_message_pulls(initial: float = 0.02, cap: float = 0.5) -> None:
    """In this ClientApp process, retry an object still downloading after ``initial`` s.

    Flower's SuperNode stores a message, and its SuperExec starts the ClientApp, before
    the message's objects have arrived from the SuperLink (the two overlap by design);
    a ClientApp that asks for an object too early waited Flower's fixed 1 s backoff
    (doubling up to 10 s): measured in a deployed round, about 1 s in most message
    stages. Each retry is one request to the hospital's own SuperNode on loopback.
    Call it before the ClientApp runs (the fork server does, before it forks).
    """
    # Flower's ClientApp runtime loads only in the processes that run ClientApps
    runtime = importlib.import_module(_RUNTIME)
    pull = runtime.pull_and_inflate_object_from_tree
    pull = getattr(pull, "func", pull)
    runtime.pull_and_inflate_object_from_tree = functools.partial(  # type: ignore[attr-defined]
        pull, initial_backoff=initial, backoff_cap=cap
    )


def install_each_fab_once() -> None:
    """In this ClientApp process, install an app bundle only the first time its bytes come.

    Flower's ClientApp unpacks the FAB its SuperNode hands it into a temporary folder,
    checks every file's hash and, finding that FAB already installed, returns: for every
    message. The same bytes (by SHA-256 of the whole bundle) verified and installed once
    are not unpacked again; the record of it lives under ``$FLWR_HOME/apps`` with the
    installed folder, and a folder since removed is installed afresh. Call it before the
    ClientApp runs (the fork server does, before it forks).
    """
    # Flower's ClientApp runtime loads only in the processes that run ClientApps
    runtime = importlib.import_module(_RUNTIME)
    flwr_home = entry("flwr.supercore.utils:get_flwr_home")
    install = runtime.install_from_fab
    install = getattr(install, "__wrapped__", install)

    @functools.wraps(install)
    def install_once(
        fab_file: Any, install_dir: Path | None = None, skip_prompt: bool = False
    ) -> Path:
        if not isinstance(fab_file, bytes) or install_dir is not None:
            return install(fab_file, install_dir, skip_prompt)  # type: ignore[no-any-return]
        record = Path(flwr_home()) / "apps" / ".fedfusion-installed" / sha256(fab_file).hexdigest()
        with contextlib.suppress(OSError, ValueError):
            installed = Path(record.read_text("utf-8"))
            if installed.is_dir():
                return installed
        installed = install(fab_file, install_dir, skip_prompt)
        with contextlib.suppress(OSError):  # no record: the next message installs again
            record.parent.mkdir(parents=True, exist_ok=True)
            partial = record.with_suffix(f".{os.getpid()}")
            partial.write_text(str(installed), "utf-8")
            partial.replace(record)
        return installed  # type: ignore[no-any-return]

    runtime.install_from_fab = install_once  # type: ignore[attr-defined]


def only_the_hospitals_clientapp() -> None:
    """In this ClientApp process, run the hospital's own ClientApp, whatever the bundle says.

    Flower's loader reads ``[tool.flwr.app.components] clientapp`` from the server's app
    bundle and imports that module from the bundle's folder, which it puts first on
    ``sys.path``: a lying server could ship a module of its own that wraps the real
    ClientApp and changes what it does. This loader reads the name, refuses any other
    than :data:`HOSPITAL_CLIENTAPP` (Flower then replies with the error and the message
    is not handled), and returns the hospital's own ClientApp, imported from its
    installation (``client/node/pinned.py``); the bundle's folder never reaches
    ``sys.path``. Call it after ``pin()`` and before the ClientApp runs.
    """
    # Flower's ClientApp runtime loads only in the processes that run ClientApps
    runtime = importlib.import_module(_RUNTIME)
    utils = importlib.import_module(_APP_UTILS)
    refused = entry("flwr.clientapp.client_app:LoadClientAppError")
    module, _, attribute = HOSPITAL_CLIENTAPP.partition(":")

    def hospitals_loader(
        default_app_ref: str, app_path: str | None, multi_app: bool
    ) -> Callable[[str, str, str], Any]:
        def load(fab_id: str, fab_version: str, fab_hash: str) -> Any:
            try:
                folder = app_path or utils.get_project_dir(fab_id, fab_version, fab_hash)
                config = utils.get_project_config(folder)
                named = config["tool"]["flwr"]["app"]["components"]["clientapp"]
            except Exception as err:  # no readable bundle: nothing to run
                raise refused(f"the server's app bundle names no ClientApp: {err}") from None
            if named != HOSPITAL_CLIENTAPP:
                raise refused(
                    f"the server's app bundle names the ClientApp {named!r}; this hospital "
                    f"runs only its own installed {HOSPITAL_CLIENTAPP}"
                )
            return getattr(importlib.import_module(module), attribute)

        return load

    runtime.get_load_client_app_fn = hospitals_loader  # type: ignore[attr-defined]


def superexec_modules() -> tuple[ModuleType, ModuleType]:
    """Flower's SuperExec loop module and its subprocess executor's module."""
    return importlib.import_module(_EXEC_LOOP), importlib.import_module(_EXECUTOR)


def _node_id(kwargs: dict[str, Any]) -> int | None:
    """The SuperNode's id, from the ``state`` Flower's loop passes by keyword."""
    get = getattr(kwargs.get("state"), "get_node_id", None)
    try:
        return int(get()) if get is not None else None
    except Exception:  # no id yet: the timeline goes without it
        return None


def _marked_receive(receive: Callable[[], Any], node: int | None) -> Callable[[], Any]:
    """Flower's ``receive``, marking when it lists a message (before its objects arrive)."""

    def marked() -> Any:
        got = receive()
        if got is not None:
            timeline.mark("node.listed", node=node)
        return got

    return marked


def heartbeat_every(seconds: float) -> None:
    """Make this process's SuperNode declare and send a heartbeat every ``seconds``.

    Flower's SuperLink counts a node offline two declared intervals after its last
    heartbeat; the interval must lie in [10, 1800] s (the SuperLink refuses others).
    """
    for module in (_FLEET, _HEARTBEAT):
        importlib.import_module(module).HEARTBEAT_DEFAULT_INTERVAL = float(seconds)


def scale_waits(clock: Any) -> ModuleType:
    """Make Flower's SuperNode loop sleep through ``clock`` and pull objects in its scale.

    ``clock`` stands in for the ``time`` module (``clock.object_backoff`` turns Flower's
    object-pull retries into its own; ``clock.active()`` is called once a reply is
    sent). A message pulled and a reply sent are marked on the timeline, when one is
    recorded. Returns the loop module.
    """
    # Flower loads only when the SuperNode is patched: the fork server and the pinned
    # start import this module for its names alone
    from flwr.supercore.constant import PULL_BACKOFF_CAP, PULL_INITIAL_BACKOFF

    loop = importlib.import_module(_LOOP)
    loop.time = clock  # type: ignore[attr-defined]
    pull = getattr(loop.pull_objects, "func", loop.pull_objects)
    initial, cap = clock.object_backoff(PULL_INITIAL_BACKOFF, PULL_BACKOFF_CAP)
    loop.pull_objects = functools.partial(  # type: ignore[attr-defined]
        pull, initial_backoff=initial, backoff_cap=cap
    )
    push = getattr(loop._push_messages, "__wrapped__", loop._push_messages)

    @functools.wraps(push)
    def push_then_poll_soon(*args: Any, **kwargs: Any) -> None:
        timeline.mark("node.reply-wait", node=_node_id(kwargs))
        push(*args, **kwargs)  # the reply is sent: the loop goes back to polling
        timeline.mark("node.sent", node=_node_id(kwargs))
        clock.active()

    pull_message = getattr(
        loop._pull_and_store_message, "__wrapped__", loop._pull_and_store_message
    )

    @functools.wraps(pull_message)
    def pull_and_mark(*args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        receive = kwargs.get("receive")
        if receive is not None and timeline.enabled():
            kwargs["receive"] = _marked_receive(receive, _node_id(kwargs))
        run_id = pull_message(*args, **kwargs)
        if run_id is not None:  # a message (and its objects) arrived from the SuperLink
            timeline.mark("node.pulled", node=_node_id(kwargs), seconds=time.monotonic() - started)
        return run_id

    loop._push_messages = push_then_poll_soon  # type: ignore[attr-defined]
    loop._pull_and_store_message = pull_and_mark  # type: ignore[attr-defined]
    return loop
