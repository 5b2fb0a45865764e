"""``fedfusion audit``: the hospital's privacy audits (registered by ``client/node/cli.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from shared_model.config import ConfigError
from shared_model.progress import progress

# Every `fedfusion` call imports this module to list its commands: what loads torch,
# Flower or numpy is imported inside the command that needs it.

__all__ = ["audit"]


def audit(
    run_dir: Annotated[Path, typer.Argument(help="A finished `fedfusion simulate` run.")],
    hospitals: Annotated[
        int | None, typer.Option(min=1, help="Hospitals of the run (default: from its metrics).")
    ] = None,
) -> None:
    """Membership-inference audit of a run's final model: attack AUC and TPR at low FPR.

    Each simulated hospital's training records are the members, its held-out records the
    non-members. Two attacks score every record: its loss under the final model, and how
    much training lowered that loss since round 0. The result goes to RUN_DIR/audit.json.
    """
    from client.audit.membership import audit_run, hospital_count  # torch: with the command

    try:
        with progress(hospitals or hospital_count(run_dir), "hospitals") as advance:
            result = audit_run(run_dir, hospitals, advance)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
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
    path.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    typer.echo(f"0.5 is a coin toss. Written to {path}")
