"""Imports run one way: server -> shared_model <- client; app never reaches out; no cycles.

A module "imports" another when it names it in an import statement anywhere in the file
(inside a function or an ``if TYPE_CHECKING:`` block too), loads it by a constant name
(``importlib.import_module("x.y")``, ``__import__("x.y")``), or starts it as a process:
``python -m X`` in a command list (``"-m", "X"``) or a shell string (``-m X``).
"""

import ast
import itertools
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
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
    "client.app": {"client.node", "client.audit"},
    "client.dp": {"client.app", "client.node", "client.audit", "flwr"},
}
# The hospital's audits train whole federations in one process and turn on the audit
# switches of client/dp: only `fedfusion audit` (this module) may reach them.
AUDIT = "client.audit"
AUDIT_COMMAND = "client.node.audit_cli"
# the packages whose modules may not import one another in a circle
ACYCLIC = (*PRODUCT, "benchmarks")
_SHELL_M = re.compile(r"-m\s+([A-Za-z_][\w.]*)")
# "package.module:attribute", the form entry points and Flower's app references take
_MODULE_ATTR = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+):[A-Za-z_][\w.]*$")
_LOADERS = {"import_module", "__import__"}  # importlib.import_module, the builtin


def _module_of(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def _loaded_by_name(node: ast.Call) -> str | None:
    """``x.y`` of ``importlib.import_module("x.y")`` or ``__import__("x.y")``, else None."""
    func = node.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if name not in _LOADERS or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value.lstrip(".") or None  # a relative name is not resolved: rare
    return None


def named_imports(path: Path, root: Path = ROOT) -> set[tuple[str, str | None]]:
    """Every ``(module, name)`` that ``path`` imports: ``name`` for ``from module import name``.

    ``name`` is None when a whole module is named: ``import x.y``, a loader's constant,
    a ``python -m`` target. Relative imports come back absolute.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = _module_of(path, root).rsplit(".", 1)[0]
    found: set[tuple[str, str | None]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update((alias.name, None) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.update((base, alias.name) for alias in node.names)
        elif isinstance(node, ast.Call) and (loaded := _loaded_by_name(node)):
            found.add((loaded, None))
        elif isinstance(node, ast.List | ast.Tuple):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            found.update((b, None) for a, b in itertools.pairwise(items) if a == "-m")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update((m, None) for m in _SHELL_M.findall(node.value))
            found.update((m, None) for m in _MODULE_ATTR.findall(node.value))
    return found


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """Every module ``path`` imports or starts with ``python -m``, fully qualified.

    For ``from x import y`` both ``x`` and ``x.y`` (``y`` may be a module or a name in
    ``x``): enough to check what a file must not import.
    """
    found: set[str] = set()
    for module, name in named_imports(path, root):
        found.add(module)
        if name is not None and name != "*":
            found.add(f"{module}.{name}")
    return found


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted name -> file, a package named by its ``__init__.py``."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = _module_of(path, root)
            found[name.removesuffix(".__init__")] = path
    return found


def _resolve(module: str, name: str | None, known: dict[str, Path]) -> str | None:
    """The known module an import names, or None when it names none of ours."""
    if name is not None and f"{module}.{name}" in known:
        return f"{module}.{name}"  # from pkg import submodule
    while module and module not in known:  # a name inside a module, or a module's attribute
        module = module.rpartition(".")[0]
    return module or None


def import_graph(root: Path = ROOT, packages: Iterable[str] = ACYCLIC) -> dict[str, set[str]]:
    """Each module of ``packages`` -> the modules of ``packages`` it imports.

    ``from pkg import name`` points at the submodule ``pkg.name`` when ``name`` is a module
    file, else at ``pkg`` (its ``__init__``, which defines or re-exports ``name``).
    Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b`` first; those
    implicit edges are not counted, or every package whose ``__init__`` re-exports a
    submodule would be a cycle. An explicit import of a package (``from pkg import X``
    by a module that ``pkg/__init__.py`` imports) is counted: that is the circle in
    which Python hands out a half-initialised module. Imports under ``TYPE_CHECKING``
    and ``python -m`` targets count too: they tie modules together as surely.
    """
    known = _modules(root, packages)
    graph: dict[str, set[str]] = {}
    for module, path in known.items():
        targets = {_resolve(m, n, known) for m, n in named_imports(path, root)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _one_loop(graph: dict[str, set[str]], component: list[str]) -> Iterator[str]:
    """A path through ``component`` that returns to its start: the loop to break."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        step = min(t for t in graph[path[-1]] if t in members)
        if step in seen:
            yield from [*path[path.index(step) :], step]
            return
        path.append(step)
        seen.add(step)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package.replace(".", "/")).rglob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imported(path) for f in FORBIDDEN[package] if _under(m, f)}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_the_audit_command_reaches_the_audit():
    """No module of the ServerApp, a ClientApp or a hospital's node, and no other command
    module, imports client.audit, even late: a real federation never has its switches on."""
    graph = import_graph()
    audit = {m for m in graph if _under(m, AUDIT)}
    assert {f"{AUDIT}.one_run", f"{AUDIT}.inprocess"} <= audit  # the names are still real
    importers = {m for m, targets in graph.items() if targets & audit} - audit
    product = {m for m in importers if m.split(".")[0] in PRODUCT}
    assert product == {AUDIT_COMMAND}, sorted(product)
    # and the command only from the command line's list of commands
    callers = {m for m, targets in graph.items() if AUDIT_COMMAND in targets}
    assert {m for m in callers if m.split(".")[0] in PRODUCT} == {"client.node.cli"}, callers


def test_no_import_cycles():
    """A cycle hidden by an import inside a function still ties the modules together:
    break it by moving the shared piece to the lower module, not by importing late."""
    graph = import_graph()
    assert len(graph) > 100 and sum(map(len, graph.values())) > 300  # the scan saw the tree
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        " -> ".join(_one_loop(graph, c)) + f"   (all of: {', '.join(c)})" for c in found
    )


def test_the_scan_sees_subprocess_targets_and_relative_imports(tmp_path):
    """The rule would be empty if the scan missed these forms."""
    probe = ROOT / "client" / "node" / "launch.py"
    assert "client.node.supernode" in imported(probe)  # ["-m", "client.node.supernode"]
    assert any(_under(m, "client.node") for m in imported(ROOT / "client" / "node" / "pinned.py"))
    named = tmp_path / "client" / "node" / "probe.py"
    named.parent.mkdir(parents=True)
    named.write_text('APP = "client.audit.one_run:run"\nNOTE = "see: this"\n', encoding="utf-8")
    assert "client.audit.one_run" in imported(named, tmp_path)  # "module:attribute"


def test_the_cycle_scan_sees_late_and_by_name_imports(tmp_path):
    """Four modules in two circles, each closed only by a form a plain scan would miss."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "low.py": "def f():\n    from pkg import high  # inside a function\n    return high\n",
        "high.py": "from pkg.low import f\n",
        "left.py": "import importlib\n\ndef g():\n    return importlib.import_module('pkg.right')",
        "right.py": "from . import left\n__import__('pkg.alone')\n",
        "alone.py": "from pkg import NAME_IN_INIT\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text, encoding="utf-8")

    graph = import_graph(tmp_path, ["pkg"])

    assert graph["pkg.low"] == {"pkg.high"}
    assert graph["pkg.left"] == {"pkg.right"}
    assert graph["pkg.right"] == {"pkg.left", "pkg.alone"}
    assert graph["pkg.alone"] == {"pkg"}  # a name defined in the package's __init__
    assert cycles(graph) == [["pkg.high", "pkg.low"], ["pkg.left", "pkg.right"]]
    loop = ["pkg.left", "pkg.right", "pkg.left"]
    assert list(_one_loop(graph, ["pkg.left", "pkg.right"])) == loop


def test_a_package_init_is_in_a_cycle_only_when_imported_by_name(tmp_path):
    """``pkg/__init__`` re-exporting ``pkg.a`` is no cycle; ``pkg.a`` importing ``pkg`` is."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from pkg.a import A\n", encoding="utf-8")
    (pkg / "a.py").write_text("from pkg.b import B\nA = B\n", encoding="utf-8")
    (pkg / "b.py").write_text("B = 1\n", encoding="utf-8")
    assert cycles(import_graph(tmp_path, ["pkg"])) == []

    (pkg / "b.py").write_text("from pkg import A\nB = 1\n", encoding="utf-8")
    assert cycles(import_graph(tmp_path, ["pkg"])) == [["pkg", "pkg.a", "pkg.b"]]


def late_imports_without_a_reason(path: Path) -> list[int]:
    """Lines of the imports inside functions of ``path`` that carry no comment saying why.

    Imports in a row (blank lines between allowed) share one reason: a comment on the
    line just above the first of them, or on the first's own lines. Otherwise each needs
    its own.
    """
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    late = sorted(
        {
            (node.lineno, node.end_lineno or node.lineno)
            for func in ast.walk(ast.parse(text, str(path)))
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(func)
            if isinstance(node, ast.Import | ast.ImportFrom)
        }
    )
    groups: list[list[tuple[int, int]]] = []
    for first, last in late:
        previous = groups[-1][-1][1] if groups else 0
        if groups and all(not line.strip() for line in lines[previous : first - 1]):
            groups[-1].append((first, last))
        else:
            groups.append([(first, last)])

    def commented(first: int, last: int) -> bool:  # an import statement holds no "#" else
        return any("#" in lines[i - 1] for i in range(first, last + 1))

    missing = []
    for group in groups:
        head = group[0][0]
        if (head > 1 and lines[head - 2].strip().startswith("#")) or commented(*group[0]):
            continue
        missing += [first for first, last in group if not commented(first, last)]
    return missing


def test_every_import_inside_a_function_says_why():
    """An import inside a function hides a dependency (and hid the cycles above): it
    stays only with a reason, such as a library loaded late so that a command starts
    fast, said in a comment beside it. benchmarks/ is held to the same rule."""
    files = [
        p for package in (*PRODUCT, "benchmarks") for p in sorted((ROOT / package).rglob("*.py"))
    ]
    assert len(files) > 100 and any(p.parent.name == "benchmarks" for p in files)
    found = {str(p.relative_to(ROOT)): late_imports_without_a_reason(p) for p in files}
    missing = [f"{path}:{line}" for path, lines in sorted(found.items()) for line in lines]
    assert not missing, "imports inside a function without a comment saying why:\n" + "\n".join(
        missing
    )


def test_the_command_line_starts_without_the_heavy_libraries():
    """The reason most late imports give: every `fedfusion` call, `--help` included,
    imports each command module to list its commands."""
    heavy = ["torch", "flwr", "opacus", "mlflow", "cryptography", "numpy", "matplotlib"]
    commands = ["server.commands.cli", "client.node.cli", "client.node.model_cli", AUDIT_COMMAND]
    code = (
        "import sys; from shared_model.cli import build_app; build_app(); "
        f"print(sorted(set({heavy + commands!r}) & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(commands))  # every command module, nothing heavy


def test_the_late_import_check_sees_a_bare_one_and_accepts_a_reason(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def a():\n"
        "    import json\n"  # 2: no reason
        "\n"
        "\n"
        "def b():\n"
        "    # torch loads only here\n"
        "    import torch\n"
        "\n"
        "    import numpy\n"  # the same group as torch: one reason
        "    x = 1\n"
        "    import scipy\n"  # 11: a new group, no reason
        "    import rich  # loads only here\n"
        "\n"
        "\n"
        "def c():\n"
        "    try:\n"
        "        from x import (\n"  # 17: on none of its lines
        "            y,\n"
        "        )\n"
        "    except ImportError:\n"
        "        pass\n",
        encoding="utf-8",
    )
    assert late_imports_without_a_reason(probe) == [2, 11, 17]


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
