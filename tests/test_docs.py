"""The docs stay true to the code: generated tables current, every link resolving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.docs import (
    GENERATED_FILES,
    ROOT,
    SECTIONS,
    current_section,
    layout_map,
    product_layout,
)

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) outside code; images too. Targets with a scheme are external.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"```.*?```", re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize("path", GENERATED_FILES, ids=lambda p: p.name)
def test_generated_docs_are_current(path: Path) -> None:
    assert path.read_text(encoding="utf-8") == GENERATED_FILES[path](), (
        f"{path.relative_to(ROOT)} is stale: run `make docs`"
    )


@pytest.mark.parametrize("path", SECTIONS, ids=lambda p: p.name)
def test_generated_sections_are_current(path: Path) -> None:
    render = SECTIONS[path]
    assert current_section(path, render) == render(), (
        f"a generated table in {path.relative_to(ROOT)} is stale: run `make docs`"
    )


def test_the_fault_table_has_its_rows() -> None:
    """A broken marker scan would render an empty, still 'current', table."""
    from tests.support.fault_table import scan

    rows = scan()
    assert len(rows) >= 30
    assert all(r.injected and r.outcome and r.kept for r in rows)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in _links(path):
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{path.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_link_check_catches_a_broken_link(tmp_path: Path) -> None:
    """The checker itself finds a missing file and a missing heading."""
    doc = tmp_path / "a.md"
    doc.write_text("# Real heading\n[x](missing.md) [y](#real-heading) [z](#nope)\n")
    assert _links(doc) == ["missing.md", "#real-heading", "#nope"]
    assert _anchors(doc) == {"real-heading"}


def test_the_readme_is_an_entry_not_a_notebook() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; details belong in docs/"


INTERNAL = re.compile(
    r"seeds? \d{3}\b|(?-i:FACTS\.md|DESIGN\.md)|\.\./shared/|\bissue #?\d+|the issue's", re.I
)


def test_no_internal_vocabulary_in_the_product_or_its_docs() -> None:
    """Users read these: no project-internal references, no files outside the repository."""
    files = [*DOC_FILES, ROOT / "pyproject.toml", ROOT / "Makefile"]
    for package in ("client", "server", "shared_model", "deploy", "benchmarks"):
        files += [p for p in (ROOT / package).rglob("*") if p.suffix in {".py", ".toml", ".md"}]
    hits = [
        f"{p.relative_to(ROOT)}: {m.group(0)!r}"
        for p in files
        for m in INTERNAL.finditer(p.read_text(encoding="utf-8"))
    ]
    assert not hits, hits


REPO_PATH = re.compile(
    r"`((?:client|server|shared_model|tests|deploy|benchmarks|docs)/[\w./-]+)(?:::\w+)?`"
)


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_every_file_of_the_repository_named_in_the_docs_exists(path: Path) -> None:
    """A module moved or renamed leaves no stale `client/...py` behind in the docs."""
    named = set(REPO_PATH.findall(path.read_text(encoding="utf-8")))
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"{path.relative_to(ROOT)} names files that do not exist: {missing}"


DESIGN = ROOT / "docs" / "design.md"


def test_the_layout_map_names_only_what_exists() -> None:
    named = layout_map(DESIGN.read_text(encoding="utf-8"))
    exists = {p: (ROOT / p).is_dir() if p.endswith("/") else (ROOT / p).is_file() for p in named}
    missing = [p for p, there in exists.items() if not there]
    assert not missing, f"docs/design.md's layout map names what is not in the tree: {missing}"
    assert len(named) == len(set(named)), "docs/design.md's layout map names a path twice"


def test_the_layout_map_names_every_package_and_module() -> None:
    """Every folder and module of the product (and benchmarks/) has its line in the map."""
    expected = product_layout()
    assert len(expected) > 100 and "server/app/" in expected and "server/app/store.py" in expected
    missing = sorted(expected - set(layout_map(DESIGN.read_text(encoding="utf-8"))))
    assert not missing, f"docs/design.md's layout map lacks: {missing}"


def test_the_layout_map_reader_follows_nesting_and_skips_descriptions(tmp_path: Path) -> None:
    text = """# Design

## Layout

```
pkg/                  a package
  a.py                a module
  sub/                a folder
    b.py              a module whose description goes on
                      like.py this, indented past any entry
  c.py                back one level
top.py
```

```
elsewhere.py          not the map
```
"""
    expected = ["pkg/", "pkg/a.py", "pkg/sub/", "pkg/sub/b.py", "pkg/c.py", "top.py"]
    assert layout_map(text) == expected

    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "data").mkdir()  # no __init__.py: not a package
    for name in ("__init__.py", "__main__.py", "a.py", "sub/__init__.py", "sub/b.py", "data/x.py"):
        (pkg / name).write_text("")
    assert product_layout(tmp_path, ["pkg"]) == {"pkg/", "pkg/a.py", "pkg/sub/", "pkg/sub/b.py"}
