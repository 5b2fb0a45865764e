"""Code conventions that a reader relies on, checked over the whole product."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("client", "server", "shared_model", "benchmarks")
# Declared tables, one row per line, read as columns: keywords would hide the table.
TABLE_ROWS = {
    "Field",  # client/app/outbound.py: every field a hospital sends
    "UtilityConfig",  # benchmarks/utility.py: the configurations compared
}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "__main__.py":
                continue
            rel = path.relative_to(ROOT).with_suffix("")
            names.append(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
    return names


def _wide_dataclasses() -> set[str]:
    """Names of the product's dataclasses with more than four fields."""
    wide = set()
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and obj.__module__ == name
                and dataclasses.is_dataclass(obj)
                and len(dataclasses.fields(obj)) > 4
            ):
                wide.add(obj.__name__)
    return wide


def _positional_constructions(names: set[str], root: Path = ROOT) -> list[str]:
    found = []
    for package in PACKAGES:
        for path in (root / package).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or len(node.args) <= 4:
                    continue
                func = node.func
                name = getattr(func, "id", None) or getattr(func, "attr", "")
                if name == "cls":  # a classmethod of a wide dataclass in this file
                    name = next(iter(classes & names), "")
                if name in names and name not in TABLE_ROWS:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {name}")
    return found


def test_results_of_more_than_four_fields_are_built_with_keywords():
    wide = _wide_dataclasses()
    assert {"LocalRound", "RoundPlan", "EvalStats"} <= wide  # the scan sees the classes
    assert not _positional_constructions(wide)


def test_the_keyword_check_sees_a_positional_construction(tmp_path):
    """The scan itself catches a wide dataclass built from positions."""
    (tmp_path / "client").mkdir()
    (tmp_path / "client" / "probe.py").write_text("x = LocalRound(1, 2, 3, 4, 5)\n")
    assert _positional_constructions({"LocalRound"}, tmp_path) == ["client/probe.py:1 LocalRound"]
