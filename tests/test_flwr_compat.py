"""Every patch of Flower internals still finds what it was written for.

Each flwr_compat module lists the Flower symbols it replaces or runs by name, with the
parameter names they had in the Flower version it names. This reads them in a fresh
interpreter, before anything fedfusion patches them, and fails when a symbol is gone or
its parameters changed: after a Flower upgrade, the failure names the workaround to
check. It also fails when Flower is another version than the one the patches name.
"""

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

COMPAT = ("server.app.flwr_compat", "client.app.flwr_compat", "client.node.flwr_compat")
_PROBE = """
import functools, hashlib, importlib, inspect, json, sys
found, sources = {}, {}
for ref in json.loads(sys.argv[1]):
    module, _, name = ref.partition(":")
    try:
        obj = functools.reduce(getattr, name.split("."), importlib.import_module(module))
    except (ImportError, AttributeError) as err:
        found[ref] = "missing: " + str(err)
        continue
    obj = getattr(obj, "func", obj)
    try:
        sources[ref] = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
    except (TypeError, OSError):
        sources[ref] = None
    try:
        found[ref] = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        found[ref] = None
print(json.dumps([found, sources]))
"""


def _probe(refs: list[str]) -> tuple[dict, dict]:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(refs)], capture_output=True, text=True, check=True
    )
    found, sources = json.loads(out.stdout)
    return found, sources


@pytest.mark.parametrize("compat", COMPAT)
def test_every_patched_flower_symbol_is_as_the_patch_expects(compat):
    import importlib

    module = importlib.import_module(compat)
    assert module.PATCHED, "an empty list would check nothing"
    refs = sorted(module.PATCHED)
    found, _ = _probe(refs)
    for ref in refs:
        assert not str(found[ref]).startswith("missing"), f"{compat}: {ref} {found[ref]}"
        expected = module.PATCHED[ref]
        if expected is not None:
            assert found[ref] == list(expected), f"{compat}: {ref} now takes {found[ref]}"


@pytest.mark.parametrize("compat", COMPAT)
def test_the_patches_name_the_installed_flower(compat):
    import importlib

    written_for = importlib.import_module(compat).FLOWER_VERSION
    assert version("flwr").startswith(written_for + "."), (
        f"{compat} was written for Flower {written_for}; {version('flwr')} is installed: "
        "check each patch against its source, then update FLOWER_VERSION"
    )


@pytest.mark.parametrize("compat", ["server.app.flwr_compat", "client.node.flwr_compat"])
def test_flower_code_a_patch_relies_on_is_the_code_it_was_checked_against(compat):
    """SignedSecAggPlusWorkflow relies on what Flower's SecAgg+ stages do inside; the
    SuperNode's scaled waits on the fixed sleeps inside Flower's loop."""
    import importlib

    patched = importlib.import_module(compat).PATCHED_SOURCES
    _, sources = _probe(sorted(patched))
    for ref, digest in patched.items():
        assert sources[ref] == digest, (
            f"{ref} changed in Flower {version('flwr')}: check the patch in {compat} "
            "against its new source, then update PATCHED_SOURCES"
        )
