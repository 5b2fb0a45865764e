"""What a warm-started child sees: run by the fork server in tests/client/node/test_warm.py."""

import gc
import json
import os
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    """Print what the child inherited and was given; then exit, sleep or fail as asked."""
    import importlib

    import numpy as np

    args = sys.argv[1:]
    bundle = os.environ.get("WARM_PROBE_BUNDLE")
    if bundle:  # what Flower's loader does with the server's app bundle
        sys.path.insert(0, bundle)
    clientapp = importlib.import_module("client.app.client_app").__file__
    print(
        json.dumps(
            {
                "argv": sys.argv,
                "cwd": str(Path.cwd()),
                "probe": os.environ.get("WARM_PROBE"),
                "pid": os.getpid(),
                "numpy": float(np.random.random()),
                "torch_preloaded": "torch" in sys.modules,
                "project_inherited": sorted(
                    m for m in sys.modules if m.split(".")[0] in ("client", "shared_model")
                ),
                "server_inherited": any(m.split(".")[0] == "server" for m in sys.modules),
                "clientapp_file": clientapp,
                "threads": threading.active_count(),
                "gc_enabled": gc.isenabled(),
                "gc_frozen": gc.get_freeze_count(),
                "gc_tracked": len(gc.get_objects()),
                "fab_installed_once": hasattr(
                    getattr(
                        sys.modules.get("flwr.supernode.runtime.run_clientapp"),
                        "install_from_fab",
                        None,
                    ),
                    "__wrapped__",
                ),
                "message_pull_backoff": getattr(
                    getattr(
                        sys.modules.get("flwr.supernode.runtime.run_clientapp"),
                        "pull_and_inflate_object_from_tree",
                        None,
                    ),
                    "keywords",
                    None,
                ),
            }
        ),
        flush=True,
    )
    print("to stderr", file=sys.stderr, flush=True)
    if "--sleep" in args:
        time.sleep(60)
    if "--raise" in args:
        raise RuntimeError("the probe failed on purpose")
    if "--exit" in args:
        sys.exit(int(args[args.index("--exit") + 1]))
