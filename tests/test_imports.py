"""Imports run one way: server -> shared_model <- client; app never reaches out.

A module "imports" another when it names it in an import statement, or starts it as a
process: ``python -m X`` in a command list (``"-m", "X"``) or a shell string (``-m X``).
"""

import ast
import itertools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("server", "client", "shared_model")
NEVER_IN_PRODUCT = {"benchmarks", "tests"}
# (package, what it must not import): dotted prefixes
FORBIDDEN = {
    "server": {"client", *NEVER_IN_PRODUCT},
    "client": {"server", *NEVER_IN_PRODUCT},
    "shared_model": {"server", "client", "flwr", "opacus", *NEVER_IN_PRODUCT},
    "server.app": {"server.commands"},
    "client.app": {"client.node"},
    "client.dp": {"client.app", "client.node", "flwr"},
}
_SHELL_M = re.compile(r"-m\s+([A-Za-z_][\w.]*)")


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports or starts with ``python -m``, fully qualified."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_of(path).rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.update(f"{base}.{alias.name}" for alias in node.names)
            found.add(base)
        elif isinstance(node, ast.List | ast.Tuple):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            found.update(b for a, b in itertools.pairwise(items) if a == "-m")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(_SHELL_M.findall(node.value))
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package.replace(".", "/")).rglob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported(path) for f in FORBIDDEN[package] if _under(m, f)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_scan_sees_subprocess_targets_and_relative_imports(tmp_path):
    """The rule would be empty if the scan missed these forms."""
    probe = ROOT / "client" / "node" / "launch.py"
    assert "client.node.supernode" in imported(probe)  # ["-m", "client.node.supernode"]
    assert any(_under(m, "client.node") for m in imported(ROOT / "client" / "node" / "pinned.py"))


def test_no_test_module_imports_another():
    """Shared test helpers live in tests/support: a test module imported by another runs
    its tests' module-level code twice and ties the two files' fates together."""
    offenders = []
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        for module in imported(path):
            last = module.split(".")[-1]
            if _under(module, "tests") and (last.startswith("test_") or ".test_" in module):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, "\n".join(sorted(set(offenders)))
