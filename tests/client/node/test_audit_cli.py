"""`fedfusion audit --simulated`: the one-run audit from the command line.

Settings are refused in one line before any training, the verdict sets the exit status
(as `make audit`'s), and a quick real run prints its progress and table and writes its
files. The attack of a run folder (`fedfusion audit RUN_DIR`) is tested with its module
(tests/client/audit/test_membership.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from client.audit import one_run
from shared_model.cli import build_app
from tests.support.audits import outcome, quick_white_box


def _no_training(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the audit trained before refusing its settings")


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["-c", "privacy.enabled=false"], "privacy.enabled is set by each audited run"),
        (["-c", "privacy.target-epsilon=50"], "privacy.target-epsilon is set by each audited"),
        (["-c", "privacy.nosie=1"], "unknown run config key 'privacy.nosie'"),
        (["-c", "num-rounds"], "num-rounds"),  # not key=value
        (["--variant", "grey"], "variant 'grey'"),
        (["--hospitals", "1"], "at least 2"),
        (["-c", "model.text-encoder='pretrained'"], "the black-box audit: record canar"),
        (["-c", "secagg.num-shares=5"], "secagg.num-shares is not simulated"),
        (["-c", "server.aggregator='median'"], "server.aggregator is not simulated"),
    ],
)
def test_a_refused_setting_is_one_line_and_exit_2_before_any_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], why: str
) -> None:
    monkeypatch.setattr(one_run, "audit_simulated_federation", _no_training)
    monkeypatch.setattr(one_run, "run_one_run_audit", _no_training)
    result = CliRunner().invoke(build_app(), ["audit", "--simulated", *args, "-o", str(tmp_path)])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()  # one line, no traceback
    assert line.startswith("error: ") and why in line, line
    assert not result.stdout and not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ([], "give RUN_DIR (attack a finished run) or --simulated"),
        (["runs/x", "--simulated"], "not both"),
        (["runs/x", "--variant", "white-box"], "are for --simulated"),
        (["runs/x", "-c", "seed=1"], "are for --simulated"),
    ],
)
def test_the_two_audits_are_asked_for_unmistakably(args: list[str], why: str) -> None:
    result = CliRunner().invoke(build_app(), ["audit", *args])
    assert result.exit_code == 2 and why in result.stderr, result.output


@pytest.mark.parametrize(
    ("runs", "status", "said"),
    [
        ([(True, True), (False, False), (False, None)], 0, "every control was caught"),
        ([(True, True), (True, False)], 4, "FAILED: correct DP runs flagged"),
        ([(False, True), (False, False)], 3, "NO POWER: controls not caught"),
        ([(False, True), (True, False)], 4, "FAILED: correct DP runs flagged"),
    ],
)
def test_the_exit_status_is_the_verdict_and_the_settings_reach_the_audit(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    runs: list[tuple[bool, bool | None]],
    status: int,
    said: str,
) -> None:
    """4: a correct run flagged (it leaks); 3: a control not caught (no power); else 0
    (1 is a crash's: never read as a verdict)."""
    asked: dict[str, Any] = {}

    def audited(out: Path, **kwargs: Any) -> list[one_run.AuditOutcome]:
        asked.update(kwargs, out=out)
        return [outcome(*r) for r in runs]

    monkeypatch.setattr(one_run, "audit_simulated_federation", audited)
    args = ["audit", "--simulated", "--variant", "white-box", "--hospitals", "3"]
    args += ["-c", "train.local-epochs=1 data.max-reports=300", "-o", str(tmp_path)]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == status, result.output
    assert said in result.output
    assert asked["out"] == tmp_path and asked["variants"] == ("white-box",)
    assert asked["hospitals"] == 3
    assert asked["overrides"] == {"train.local-epochs": 1, "data.max-reports": 300}


@pytest.mark.slow  # one quick audited federation: about 20 s on 2 cores
def test_fedfusion_audit_simulated_prints_progress_and_the_table_and_writes_the_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The broken-DP control alone, at the quick size: caught, so exit status 0."""
    broken = next(a for a in one_run.AUDIT_RUNS if a.noise_scale < 1)
    quick_white_box(monkeypatch, broken)
    out = tmp_path / "audit"
    args = ["audit", "--simulated", "--variant", "white-box", "-c", "train.local-epochs=1"]
    result = CliRunner().invoke(build_app(), [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("one-run privacy audit of a simulated federation: white-box;")
    progress = lines.index("  [1/1] auditing broken-dp-eps1 (noise x0.1) (white-box) ...")
    table = lines.index(next(x for x in lines if x.startswith("| audit | run | accounted ε")))
    assert progress < table  # progress as it goes, the table at the end
    (row,) = [x for x in lines[table + 2 :] if x.startswith("| white-box |")]
    assert "FLAGGED: leaks more than ε = 1.00 (control: caught)" in row
    assert lines[-1] == "every control was caught and no correct DP run was flagged"
    (written,) = json.loads((out / "audit.json").read_text(encoding="utf-8"))["runs"]
    assert written["flagged"] and written["canaries"] == 200
    assert written["config"]["train.local-epochs"] == 1  # -c reached the run
    assert (out / "audit.md").read_text(encoding="utf-8").count("| white-box |") == 1
    assert (out / "audit.png").stat().st_size > 0


@pytest.mark.parametrize("where", ["a-file", "a-file/sub", "/proc/no-such-folder"])
def test_an_out_folder_that_cannot_be_written_is_refused_before_any_training(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, where: str
) -> None:
    monkeypatch.setattr(one_run, "audit_simulated_federation", _no_training)
    (tmp_path / "a-file").write_text("not a folder", encoding="utf-8")
    out = where if where.startswith("/") else str(tmp_path / where)
    result = CliRunner().invoke(build_app(), ["audit", "--simulated", "-o", out])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: --out {out}: cannot write there"), line


def test_an_audit_that_cannot_run_says_why_in_one_line_never_as_a_verdict(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def cannot_split(out: Path, **kwargs: Any) -> None:
        raise ValueError("cannot split 2 records into 2 hospitals of at least 10 records each")

    monkeypatch.setattr(one_run, "audit_simulated_federation", cannot_split)
    args = ["audit", "--simulated", "-c", "data.max-reports=2", "-o", str(tmp_path)]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 2, result.output  # not 4 (leaking), not 1 (a crash)
    (line,) = result.stderr.splitlines()
    assert line == (
        "error: the audit could not run: cannot split 2 records into 2 hospitals of at least "
        "10 records each"
    )


def test_a_pass_names_the_correct_runs_it_could_not_judge(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """At epsilon 8 the canaries cannot show a leak: the pass says so, by name."""
    runs = [outcome(False, False), outcome(True, True), outcome(False, False)]
    runs[2].power_claimed, runs[2].run = False, "dp-eps8"
    monkeypatch.setattr(one_run, "audit_simulated_federation", lambda out, **kw: runs)
    result = CliRunner().invoke(build_app(), ["audit", "--simulated", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    *_, passed, unjudged = result.stdout.splitlines()
    assert passed == "every control was caught and no correct DP run was flagged"
    assert unjudged.startswith("not judged (") and unjudged.endswith(f"{runs[2].variant} dp-eps8")


@pytest.mark.parametrize(
    ("files", "why"),
    [
        ({"run.json": "{not json"}, "JSONDecodeError"),
        ({"run.json": "{}"}, "KeyError"),
    ],
)
def test_a_run_folder_that_is_not_a_run_is_one_line_and_exit_2(
    tmp_path: Path, files: dict[str, str], why: str
) -> None:
    (tmp_path / "global_model.safetensors").write_bytes(b"junk")
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = CliRunner().invoke(build_app(), ["audit", str(tmp_path), "--hospitals", "2"])
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {tmp_path} is not a finished simulated run: {why}"), line
