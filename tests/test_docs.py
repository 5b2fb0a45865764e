"""The docs stay true to the code: generated tables current, every link resolving."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.docs import GENERATED_FILES, ROOT, SECTIONS, current_section

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
