"""The environment is exactly the CPU lock, and both locks are in step with pyproject.toml.

`make lock` writes requirements/lock-cpu.txt and lock-cuda.txt; `make venv` installs the
CPU lock, every package with --no-deps, then the project. These read files and installed
metadata only.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
CPU_LOCK = ROOT / "requirements" / "lock-cpu.txt"
CUDA_LOCK = ROOT / "requirements" / "lock-cuda.txt"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", re.M)
REBUILD = "`make clean` then `make test` rebuild .venv from the lock"


def pins(lock: Path) -> dict[str, str]:
    """Normalized name -> normalized version of every package the lock pins."""
    found = PIN.findall(lock.read_text(encoding="utf-8"))
    pinned = {canonicalize_name(name): str(Version(version)) for name, version in found}
    assert len(pinned) == len(found), f"{lock.name} pins a package twice"
    return pinned


def installed() -> dict[str, list[str]]:
    """Normalized name -> the versions installed under it (more than one is an error).

    Read by a fresh interpreter of this environment, isolated (``-I``) from the
    variables and user folders that add to sys.path: Ray's simulation, run in this
    process by an earlier test, leaves the base interpreter's site-packages on
    PYTHONPATH.
    """
    listing = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import importlib.metadata as m\n"
            "for d in m.distributions(): print(d.metadata['Name'], d.version, sep='==')",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    found: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, version = line.split("==", 1)
        found.setdefault(canonicalize_name(name), []).append(str(Version(version)))
    return found


def declared() -> list[Requirement]:
    """What pyproject.toml asks the locks to hold: dependencies, the dev extra, the
    dependency groups and the build backend (the project installs without isolation)."""
    project = PYPROJECT["project"]
    specs = [
        *project["dependencies"],
        *project["optional-dependencies"]["dev"],
        *(spec for group in PYPROJECT["dependency-groups"].values() for spec in group),
        *PYPROJECT["build-system"]["requires"],
    ]
    return [Requirement(spec) for spec in specs]


def test_the_environment_is_exactly_the_cpu_lock():
    locked, found = pins(CPU_LOCK), installed()
    found.pop(canonicalize_name(PYPROJECT["project"]["name"]), None)
    twice = {name: versions for name, versions in found.items() if len(versions) > 1}
    missing = sorted(f"{n}=={v}" for n, v in locked.items() if n not in found)
    unlocked = sorted(f"{n}=={v[0]}" for n, v in found.items() if n not in locked)
    differ = sorted(
        f"{n}: {v[0]} installed, {locked[n]} locked"
        for n, v in found.items()
        if n in locked and v[0] != locked[n]
    )
    assert not (missing or unlocked or differ or twice), (
        f"the environment differs from {CPU_LOCK.name} ({REBUILD}): missing {missing}; "
        f"not in the lock {unlocked}; other versions {differ}; installed twice {twice}"
    )


def test_pip_check_misses_only_what_the_reports_group_leaves_out():
    """pip check passes but for the packages the locks hold without their dependencies."""
    without_deps = {
        canonicalize_name(Requirement(spec).name)
        for spec in PYPROJECT["dependency-groups"]["reports"]
    }
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False
    ).stdout
    allowed = re.compile(r"^(\S+) \S+ requires \S+, which is not installed\.$")
    broken = [
        line
        for line in out.splitlines()
        if line.strip() and line != "No broken requirements found."
        if not ((m := allowed.match(line)) and canonicalize_name(m.group(1)) in without_deps)
    ]
    assert not broken, broken


@pytest.mark.parametrize("lock", [CPU_LOCK, CUDA_LOCK], ids=lambda p: p.name)
def test_the_lock_holds_every_declared_requirement_at_a_version_it_allows(lock):
    locked = pins(lock)
    stale = [
        f"{req}: {locked.get(canonicalize_name(req.name), 'not locked')}"
        for req in declared()
        if req.marker is None or req.marker.evaluate()
        if canonicalize_name(req.name) not in locked
        or not req.specifier.contains(locked[canonicalize_name(req.name)], prereleases=True)
    ]
    assert not stale, f"{lock.name} is out of step with pyproject.toml (`make lock`): {stale}"


def test_the_cuda_lock_differs_from_the_cpu_lock_only_by_torchs_build():
    cpu, cuda = pins(CPU_LOCK), pins(CUDA_LOCK)
    assert cpu["torch"] == f"{cuda['torch']}+cpu"
    assert not cpu.keys() - cuda.keys(), cpu.keys() - cuda.keys()
    differ = {
        name: (v, cuda[name]) for name, v in cpu.items() if name != "torch" and v != cuda[name]
    }
    assert not differ, f"the locks disagree (`make lock` writes both): {differ}"
    extra = cuda.keys() - cpu.keys()
    assert extra and all(re.match(r"nvidia-|cuda-|triton$", name) for name in extra), extra
