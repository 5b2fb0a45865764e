"""The one-run audit catches broken DP through the real hospital code, and only then."""

from __future__ import annotations

import ast
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from client.audit import one_run
from client.audit.bound import epsilon_lower_bound
from client.audit.one_run import AuditRun, black_box_audit, check_settings, white_box_audit
from client.audit.report import judge
from client.dp import audit_hooks
from shared_model.config import ConfigError
from tests.support.audits import QUICK, outcome, quick_white_box

ROOT = Path(__file__).resolve().parents[3]
PRODUCT = ("client", "server", "shared_model")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit")


def test_the_audit_catches_broken_dp_and_writes_what_it_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Broken DP is caught through the real hospital code, by what `make audit` runs: the
    operator's settings reach the runs, the files say which run was flagged. The broken
    run alone, at the quick size."""
    broken = next(a for a in one_run.AUDIT_RUNS if a.noise_scale < 1)
    assert broken.expect_flagged is True  # a control
    quick_white_box(monkeypatch, broken)
    out, lines = tmp_path / "audit", []
    outcomes = one_run.audit_simulated_federation(
        out, echo=lines.append, variants=("white-box",), overrides={"train.local-epochs": 1}
    )
    assert any("[1/1] auditing broken-dp-eps1" in line for line in lines)
    assert "FLAGGED: leaks more than ε = 1.00 (control: caught)" in lines[-1]
    assert judge(outcomes) == ([], [])  # the control caught, no correct run flagged
    written = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert set(written["software"]) == {"fedfusion", "flwr", "opacus", "torch"}
    (row,) = written["runs"]
    assert row["flagged"] and row["lower_bound"] > 1.0 and row["canaries"] == 200
    assert row["accounted_epsilon"] == pytest.approx(1.0, abs=0.01)  # the accountant is fooled
    assert audit_hooks.attached_hospitals()[-2:] == ["hospital-0", "hospital-1"]  # every one
    assert row["config"]["train.local-epochs"] == 1  # the operator's setting reached the run
    assert row["config"]["privacy.target-epsilon"] == 1.0  # the run's own still wins
    assert (out / "audit.md").is_file() and (out / "audit.png").stat().st_size > 0


def test_the_audit_refuses_bad_settings_before_training() -> None:
    both = ("white-box", "black-box")
    for args, why in (
        ((("grey",), {}, 2), "variant 'grey'"),
        ((both, {"privacy.nosie": 1}, 2), "unknown run config key 'privacy.nosie'"),
        ((both, {}, 1), "at least 2"),
        # what each audited run sets itself: a DP run must not be turned off from outside
        ((both, {"privacy.enabled": False}, 2), "privacy.enabled is set by each audited run"),
        ((both, {"privacy.target-epsilon": 50.0}, 2), "privacy.target-epsilon is set by"),
        ((both, {"model.text-encoder": "pretrained"}, 2), "the black-box audit: record canar"),
    ):
        with pytest.raises(ConfigError, match=re.escape(why)):
            check_settings(*args)
    check_settings(("white-box",), {"model.text-encoder": "pretrained"}, 2)  # white-box: fine


@pytest.mark.parametrize(
    ("outcomes", "leaking", "blind"),
    [
        ([(True, True), (False, False), (True, None)], [], []),
        ([(True, True), (True, False)], ["white-box True-False"], []),
        ([(False, True), (False, False)], [], ["white-box False-True"]),
        ([(False, True), (True, False)], ["white-box True-False"], ["white-box False-True"]),
    ],
)
def test_the_verdict_names_leaking_runs_and_uncaught_controls(
    outcomes: list, leaking: list, blind: list
) -> None:
    """A correct run flagged is a leak; a control not flagged is no power; a run shown
    without an expectation (the black-box broken run) is neither."""
    assert judge([outcome(*o) for o in outcomes]) == (leaking, blind)


def test_the_bound_is_taken_at_the_hospitals_delta_and_privacy_cannot_come_out_off() -> None:
    """A run asking for delta 0.01 is accounted at the hospital's smaller delta: bounding
    at 0.01 would silently take the audit's power away."""
    scores = np.arange(1000.0)
    included = scores >= 500  # every guess right
    policy = SimpleNamespace(enabled=True, delta=1e-5)
    run = AuditRun("dp", {"privacy.enabled": True, "privacy.target-epsilon": 1.0})
    got = one_run._outcome(run, "white-box", scores, included, 200, policy, 1.0, 0.0, {})
    assert got.delta == 1e-5 and got.lower_bound == pytest.approx(
        epsilon_lower_bound(1000, 200, 200, 1e-5)
    )
    assert got.flagged and got.power_claimed
    assert epsilon_lower_bound(1000, 200, 200, 0.01) < 1.0  # what the run's delta would give
    with pytest.raises(RuntimeError, match="privacy came out False"):
        off = SimpleNamespace(enabled=False, delta=1e-5)
        one_run._outcome(run, "white-box", scores, included, 200, off, None, 0.0, {})


@pytest.mark.slow
def test_correct_dp_stays_below_its_accounted_epsilon(work: Path) -> None:
    """Flagged with probability at most 5% by the theorem; far less at these counts."""
    correct = AuditRun("correct", {"privacy.target-epsilon": 1.0})
    outcome = white_box_audit(correct, work, feature_cache=work / "features", **QUICK)
    assert not outcome.flagged and outcome.lower_bound <= outcome.accounted_epsilon
    assert outcome.guesses == 100 and outcome.canaries == 200


@pytest.mark.slow
def test_a_non_private_run_is_flagged_against_the_epsilon_it_is_checked_for(work: Path) -> None:
    plain = AuditRun("plain", {"privacy.enabled": False}, reference_epsilon=1.0)
    outcome = white_box_audit(plain, work, feature_cache=work / "features", **QUICK)
    assert math.isinf(outcome.accounted_epsilon) and outcome.flagged


@pytest.mark.slow
def test_record_canaries_flag_a_non_private_run(work: Path) -> None:
    """The black-box audit's strongest effect: about 60 s (12 rounds, 500 canaries)."""
    plain = AuditRun("plain", {"privacy.enabled": False}, reference_epsilon=1.0)
    outcome = black_box_audit(
        plain,
        work,
        canaries=500,
        guesses=60,
        rounds=12,
        data={"data.max-reports": 400},
        feature_cache=work / "features",
    )
    assert outcome.variant == "black-box" and outcome.guesses == 60
    assert outcome.flagged and outcome.lower_bound > 1.0


def test_a_scale_switch_refuses_to_open_twice_and_always_closes_back_to_one() -> None:
    """Two open together could close out of order and leave the noise scaled."""
    for switch in (audit_hooks.scaled_noise, audit_hooks.scaled_clipping):
        with switch(0.5), pytest.raises(RuntimeError, match="already set"), switch(0.1):
            pass
        with pytest.raises(ZeroDivisionError), switch(0.5):
            _ = 1 / 0
    assert (audit_hooks._STATE.noise_scale, audit_hooks._STATE.clip_scale) == (1.0, 1.0)


def test_the_switches_are_off_outside_their_context() -> None:
    before = audit_hooks.attached_hospitals()

    class Optimizer:  # what attach reads of an Opacus DP optimizer
        noise_multiplier, max_grad_norm = 1.0, 1.0

        def add_noise(self) -> None: ...

    optimizer = Optimizer()
    production = optimizer.add_noise
    audit_hooks.attach_to_dp_optimizer(optimizer, "hospital-0", 0.5)
    assert optimizer.add_noise == production  # nothing hooked without an audit
    with audit_hooks.scaled_noise(0.0):
        audit_hooks.attach_to_dp_optimizer(optimizer, "hospital-0", 0.5)
    assert optimizer.add_noise != production
    assert audit_hooks.attached_hospitals() == [*before, "hospital-0"]


def test_broken_clipping_widens_only_book_keepings_clip_norm_and_only_inside() -> None:
    class BookKeeping:
        max_grad_norm = 1.0

    class Loss:  # what attach reads of book-keeping's loss
        bookkeeping = BookKeeping()

    class Optimizer:  # the noise reads the optimizer's clip norm, which must stay
        noise_multiplier, max_grad_norm = 1.0, 1.0

        def add_noise(self) -> None: ...

    loss = Loss()
    audit_hooks.attach_to_dp_optimizer(Optimizer(), "hospital-0", 0.5, loss)
    assert loss.bookkeeping.max_grad_norm == 1.0  # no audit: nothing changes
    optimizer = Optimizer()
    with audit_hooks.scaled_clipping(100.0):
        audit_hooks.attach_to_dp_optimizer(optimizer, "hospital-0", 0.5, loss)
        with pytest.raises(RuntimeError, match="book-keeping"):  # another mode: refused
            audit_hooks.attach_to_dp_optimizer(Optimizer(), "hospital-0", 0.5, object())
    assert loss.bookkeeping.max_grad_norm == 100.0 and optimizer.max_grad_norm == 1.0


def test_the_switches_read_nothing_from_outside_and_the_round_passes_them_nothing() -> None:
    """No file, argument or environment reaches the switches through their own module,
    and the round attaches them with the arguments it had when this was reviewed: a new
    one (a run-config value passed through, say) would be a new way in."""
    hooks = ROOT / "client/dp/audit_hooks.py"
    allowed = {"__future__", "types", "collections.abc", "contextlib", "dataclasses", "typing"}
    allowed |= {"numpy", "torch"}
    tree = ast.parse(hooks.read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= allowed, imported - allowed
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {"open", "sys", "os", "input", "__import__", "eval", "exec"}

    source = (ROOT / "client/app/local_training.py").read_text(encoding="utf-8")
    calls = {
        ast.unparse(n.func): [ast.unparse(a) for a in n.args] + [k.arg for k in n.keywords]
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Call) and ast.unparse(n.func).startswith("audit_hooks.")
    }
    assert calls == {
        "audit_hooks.attach_to_optimizer": [
            "local.optimizer",
            "site.name",
            "min(1.0, run.train.batch_size / len(local.train_set))",
            "site.policy.max_grad_norm",
            "run.train.batch_size",
        ],
        "audit_hooks.attach_to_dp_optimizer": [
            "private.optimizer",
            "site.name",
            "plan.entry.sample_rate",
            "private.loss_fn",
        ],
    }


def test_no_config_key_environment_variable_or_product_module_reaches_the_switches() -> None:
    source = (ROOT / "client/dp/audit_hooks.py").read_text(encoding="utf-8")
    assert not re.search(r"\bos\.|\bimport os\b|getenv", source)  # no environment variable
    setters = re.compile(r"\b(gradient_canaries|scaled_noise|scaled_clipping|_AuditState)\b")
    # The audit's own module sets them, and nothing else, benchmarks included (which
    # reach them through it); test_imports checks that only `fedfusion audit` imports it,
    # nothing the ServerApp, a ClientApp or a hospital's node runs. The round only
    # attaches them.
    setting = {"client/audit/one_run.py"}
    for package in (*PRODUCT, "benchmarks"):
        for path in (ROOT / package).rglob("*.py"):
            where = path.relative_to(ROOT).as_posix()
            if path.name != "audit_hooks.py" and where not in setting:
                text = path.read_text(encoding="utf-8")
                assert not setters.search(text), f"{path} reaches an audit switch"
                if "audit_hooks" in text:  # only the round that attaches them may import it
                    assert where == "client/app/local_training.py"
                    assert re.findall(r"audit_hooks\.(?!py\b)(\w+)", text) == [
                        "attach_to_optimizer",
                        "attach_to_dp_optimizer",
                    ], f"{path} uses more of the audit hooks than attaching them"
    assert setters.search((ROOT / "client/audit/one_run.py").read_text(encoding="utf-8"))
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(
        r"canar|noise-scale|clip-scale|audit", config.split("[tool.flwr.app.config]")[1]
    )
