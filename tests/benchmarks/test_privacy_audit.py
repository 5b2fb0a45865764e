"""The one-run audit catches broken DP through the real hospital code, and only then."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from benchmarks.privacy_audit import AuditRun, black_box_audit, white_box_audit
from client.dp import audit_hooks

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("client", "server", "shared_model")

# Small and fast (about 5 s a run once features are cached): 200 canaries, 100 guesses,
# whose cap (3.49) is far above the accounted epsilon of 1.
QUICK = {
    "canaries": 200,
    "guesses": 100,
    "hospitals": 2,
    "rounds": 1,
    "data": {"data.max-reports": 400},
}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("audit")


def test_broken_dp_is_flagged(work: Path) -> None:
    broken = AuditRun("broken", {"privacy.target-epsilon": 1.0}, noise_scale=0.1)
    outcome = white_box_audit(broken, work, feature_cache=work / "features", **QUICK)
    assert outcome.accounted_epsilon == pytest.approx(1.0, abs=0.01)  # the accountant is fooled
    assert outcome.flagged and outcome.lower_bound > 1.0
    assert audit_hooks.attached_hospitals()[-2:] == ["hospital-0", "hospital-1"]  # every one


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


def test_no_config_key_environment_variable_or_product_module_reaches_the_switches() -> None:
    source = (ROOT / "client/dp/audit_hooks.py").read_text(encoding="utf-8")
    assert not re.search(r"\bos\.|\bimport os\b|getenv", source)  # no environment variable
    setters = re.compile(r"\b(gradient_canaries|scaled_noise|scaled_clipping|_AuditState)\b")
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            if path.name != "audit_hooks.py":
                text = path.read_text(encoding="utf-8")
                assert not setters.search(text), f"{path} reaches an audit switch"
                if "audit_hooks" in text:  # only the round that attaches them may import it
                    assert path.relative_to(ROOT).as_posix() == "client/app/local_training.py"
                    assert re.findall(r"audit_hooks\.(?!py\b)(\w+)", text) == [
                        "attach_to_optimizer",
                        "attach_to_dp_optimizer",
                    ], f"{path} uses more of the audit hooks than attaching them"
    config = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert not re.search(
        r"canar|noise-scale|clip-scale|audit", config.split("[tool.flwr.app.config]")[1]
    )
