"""``fedfusion audit``: the hospital's privacy audits (registered by ``client/node/cli.py``).

With RUN_DIR, membership-inference attacks on a finished simulated run's model
(``client/audit/membership.py``). With ``--simulated``, the one-run audit of a
federation trained here (``client/audit/one_run.py``), which ``make audit`` runs too.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from shared_model.config import ConfigError, parse_overrides
from shared_model.progress import progress

# Every `fedfusion` call imports this module to list its commands: what loads torch,
# Flower or numpy is imported inside the command that needs it.

__all__ = ["LEAKING", "NO_POWER", "audit", "audit_simulated"]

# the one-run audit's exit statuses (`make audit` runs it too); 2: a usage error, or the
# audit could not run (one line says why); 1 is left to a crash, never read as a verdict
LEAKING = 4  # a correct DP run was flagged: the implementation leaks more than it accounts
NO_POWER = 3  # a control was not caught: a pass proves little at these settings

_SIMULATED = "The one-run audit of a simulated federation (--simulated)"


def audit(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A finished `fedfusion simulate` run: attack its final model.",
            show_default=False,
        ),
    ] = None,
    simulated: Annotated[
        bool,
        typer.Option(
            "--simulated",
            help="Instead of attacking a run: train federations here, with canaries, and "
            "bound epsilon from below (minutes: see --variant).",
            rich_help_panel=_SIMULATED,
        ),
    ] = False,
    variant: Annotated[
        list[str] | None,
        typer.Option(
            help="white-box (gradient canaries, under a minute on 2 idle cores) or black-box "
            "(record canaries, about 2 minutes); repeatable; default both. Each runs DP at "
            "epsilon 1 and 8 and two controls it must flag: no DP, and DP noise x0.1.",
            rich_help_panel=_SIMULATED,
        ),
    ] = None,
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config",
            "-c",
            help="Run settings for every audited federation, as for `fedfusion simulate`, "
            "except those each run sets itself (privacy.enabled, privacy.target-epsilon, "
            "num-rounds, output-dir, seed), which are refused.",
            rich_help_panel=_SIMULATED,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Where audit.json, audit.md and audit.png go (default runs/audit; "
            "rewritten after each run).",
            rich_help_panel=_SIMULATED,
        ),
    ] = None,
    hospitals: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="RUN_DIR: the run's hospitals (default: from its metrics). --simulated: "
            "the audited federation's (default 2).",
        ),
    ] = None,
) -> None:
    """Audit privacy empirically: a run's membership inference, or an epsilon lower bound.

    **RUN_DIR**: each simulated hospital's training records are the members, its held-out
    records the non-members. Two attacks score every record: its loss under the final
    model, and how much training lowered that loss since round 0. The result goes to
    RUN_DIR/audit.json.

    **--simulated**: the one-run audit (Steinke, Nasr and Jagielski, 2023) of federations
    trained in this process on the embedded data, with the default settings (DP +
    SecAgg+) and the hospitals' own training code; not a deployed federation. Canaries at
    one hospital, each included with probability 1/2, scored from the final model; the
    right guesses give an epsilon lower bound at 95% confidence, printed beside the
    accounted epsilon after each run, with the table at the end. Exit status 4 if a
    correct DP run is flagged (the implementation leaks more than it accounts), 3 if a
    control is not caught (no power at these settings), else 0. docs/privacy.md says
    what the bound means and what it does not.
    """
    if run_dir is None:
        if not simulated:
            _usage("give RUN_DIR (attack a finished run) or --simulated (the one-run audit)")
        try:
            overrides = parse_overrides(run_config or [])
        except ConfigError as err:
            _usage(str(err))
        audit_simulated(out or Path("runs/audit"), variant, overrides, hospitals or 2)
        return
    if simulated:
        _usage("give RUN_DIR (attack a finished run) or --simulated, not both")
    if variant or run_config or out:
        _usage(
            "--variant, --run-config and --out are for --simulated; a run's attack is "
            "written to RUN_DIR/audit.json"
        )
    _attack_run(run_dir, hospitals)


def _usage(message: str) -> NoReturn:
    """Stop with a one-line error and the usage errors' status."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def audit_simulated(
    out: Path,
    variants: Sequence[str] | None = None,
    overrides: dict[str, Any] | None = None,
    hospitals: int = 2,
) -> None:
    """The one-run audit of a simulated federation: progress, the table, the verdict.

    Exits 2 for settings the audit refuses (before any training), else ``LEAKING`` or
    ``NO_POWER`` when the verdict says so. ``make audit`` runs it with the defaults.
    """
    # torch, Flower and Opacus load with the audit (see the note at the top)
    from client.audit.one_run import VARIANTS, audit_simulated_federation, check_settings
    from client.audit.report import judge

    chosen = tuple(dict.fromkeys(variants or VARIANTS))
    try:
        check_settings(chosen, overrides or {}, hospitals)
        _check_writable(out)
    except ConfigError as err:
        _usage(str(err))
    typer.echo(
        f"one-run privacy audit of a simulated federation: {', '.join(chosen)}; "
        f"{hospitals} hospitals; results in {out}"
    )
    started = time.monotonic()
    try:
        outcomes = audit_simulated_federation(
            out, echo=typer.echo, variants=chosen, overrides=overrides, hospitals=hospitals
        )
    except (ConfigError, ValueError, OSError) as err:  # e.g. data settings that cannot split
        _usage(f"the audit could not run: {err}")
    typer.echo(f"\n{time.monotonic() - started:.0f} s; written to {out}/audit.json, .md, .png")
    leaking, blind = judge(outcomes)
    if leaking:
        typer.secho(
            f"FAILED: correct DP runs flagged, leaking more than they account: "
            f"{'; '.join(leaking)}",
            fg=typer.colors.RED,
            err=True,
        )
    if blind:
        typer.secho(
            f"NO POWER: controls not caught, so a pass proves little here: {'; '.join(blind)}",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if leaking or blind:
        raise typer.Exit(LEAKING if leaking else NO_POWER)
    correct = [o for o in outcomes if o.expect_flagged is False]
    unjudged = [f"{o.variant} {o.run}" for o in correct if not o.power_claimed]
    typer.echo("every control was caught and no correct DP run was flagged")
    if unjudged:
        typer.echo(
            f"not judged (epsilon above what the canaries can show, no power claimed): "
            f"{'; '.join(unjudged)}"
        )


def _check_writable(out: Path) -> None:
    """Refuse, before any training, an ``--out`` the results could not be written to."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or err})") from err


def _attack_run(run_dir: Path, hospitals: int | None) -> None:
    """Membership-inference attacks on a finished run's model: RUN_DIR/audit.json."""
    from safetensors import SafetensorError  # with the command: see the note at the top

    from client.audit.membership import audit_run, hospital_count  # torch: with the command

    try:
        with progress(hospitals or hospital_count(run_dir), "hospitals") as advance:
            result = audit_run(run_dir, hospitals, advance)
    except ConfigError as err:
        _usage(str(err))
    except (ValueError, KeyError, TypeError, OSError, SafetensorError) as err:  # not a run's
        _usage(f"{run_dir} is not a finished simulated run: {type(err).__name__}: {err}")
    typer.echo(
        f"{result.members} members, {result.non_members} non-members, {result.hospitals} hospitals"
    )
    typer.echo("attack            AUC (95% CI)           TPR@1%FPR  TPR@0.1%FPR")
    for name, r in result.attacks.items():
        low, high = r.auc_ci95
        typer.echo(
            f"{name:16s}  {r.auc:.3f} ({low:.3f}-{high:.3f})    "
            f"{r.tpr_at_fpr['0.01']:9.3f}  {r.tpr_at_fpr['0.001']:11.3f}"
        )
    path = Path(run_dir) / "audit.json"
    try:
        path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        _usage(f"cannot write {path}: {err.strerror or err}")
    typer.echo(f"0.5 is a coin toss. Written to {path}")
