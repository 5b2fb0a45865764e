"""Hospital-side subcommands of the ``fedfusion`` CLI (registered via entry points)."""

from __future__ import annotations

import json
import shlex
import statistics
from pathlib import Path
from typing import Annotated, Any

import typer

from client.dp.policy import effective_policy
from client.node.audit_cli import audit
from shared_model.config import (
    ConfigError,
    HospitalConfig,
    PrivacyConfig,
    RunConfig,
    parse_overrides,
)
from shared_model.progress import progress

# Every `fedfusion` call imports this module to list its commands: what loads torch,
# Flower or numpy is imported inside the command that needs it.

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the hospital's subcommands to the CLI."""
    app.command("hospital")(hospital)
    app.command("demo-data")(demo_data)
    app.command("audit")(audit)
    ledger = typer.Typer(help="A hospital's privacy ledger.", no_args_is_help=True)
    ledger.command("show")(ledger_show)
    ledger.command("init")(ledger_init)
    ledger.command("restore")(ledger_restore)
    ledger.command("backup")(ledger_backup)
    ledger.command("split")(ledger_split)
    app.add_typer(ledger, name="ledger")
    data = typer.Typer(help="A hospital's own data.", no_args_is_help=True)
    data.command("check")(data_check)
    app.add_typer(data, name="data")


def data_check(
    manifest: Annotated[Path, typer.Argument(help="The hospital's manifest (CSV or JSONL).")],
    run_config: Annotated[
        list[str] | None,
        typer.Option(
            "--run-config",
            help="The federation's settings, as 'key=value ...' (labels, image size, text "
            "encoder and data limits come from them; defaults otherwise).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The summary as JSON.")] = False,
) -> None:
    """Check a hospital's data before it joins: read every row exactly as training would.

    Every image is decoded and every report tokenized, with the federation's settings.
    Prints the rows that are fine, the rows that are not and why (file and row), and
    the records that miss one modality, and counts patients and records per patient.
    Exits 1 if any row is bad or a patient_id is blank (where others are not), 2 if the
    manifest or the settings cannot be used at all.
    """
    # torch loads with the command (see the note at the top)
    from shared_model.data import load_manifest
    from shared_model.images import decode_image
    from shared_model.manifest import DataLimits, ManifestError, read_manifest_rows
    from shared_model.text import tokenizer_for

    try:
        run = RunConfig.from_run_config(parse_overrides(run_config or []))
        total = len(read_manifest_rows(manifest.expanduser().resolve()))
        records = None
        with progress(total, "rows") as advance:
            records, report = load_manifest(
                manifest,
                run.model.labels,
                tokenizer_for(run.model),
                run.model.image_size,
                strict=False,
                decode=decode_image,
                limits=DataLimits(run.data.max_image_pixels, run.data.max_report_chars),
                progress=lambda: advance("checking", 1),
            )
    except ManifestError as err:
        if err.report is None:  # the manifest itself cannot be read
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from err
        report = err.report  # every row is bad: list them all
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    patients = _patient_summary(records.patient_ids if records is not None else None)
    if as_json:
        summary = {
            "manifest": report.manifest,
            "rows": report.rows_total,
            "ok": report.rows_ok,
            "bad": report.rows_bad,
            "missing_image": report.missing_image,
            "missing_report": report.missing_report,
            **patients,
            "errors": [{"row": e.row, "file": e.file, "reason": e.reason} for e in report.errors],
        }
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(f"{report.manifest}: {report.rows_total} rows")
        typer.echo(f"  ok:  {report.rows_ok}")
        typer.echo(f"  bad: {report.rows_bad}")
        if records is None:
            pass  # no usable row: nothing to count
        elif patients["patients"] is None:
            typer.echo(
                "  no patient_id column: each record counts on its own, and epsilon will be "
                "per record (a patient with k records has up to k times it)"
            )
        elif patients["records_without_patient_id"]:
            typer.secho(
                f"  patient_id is blank on {patients['records_without_patient_id']} records: "
                "each would count as a patient of its own, so per-patient privacy refuses "
                "this manifest (fill them in, or set privacy-unit = 'record')",
                fg=typer.colors.RED,
            )
        else:
            per = patients["records_per_patient"]
            typer.echo(
                f"  patients: {patients['patients']} (records per patient: median "
                f"{per['median']:g}, max {per['max']}); epsilon will be per patient"
            )
        if report.missing_image or report.missing_report:
            typer.echo(
                f"  {report.missing_image} rows have no image and {report.missing_report} no "
                "report: they train as single-modality records"
            )
        for error in report.errors:
            typer.secho(f"  {error}", fg=typer.colors.RED)
    if report.rows_bad or patients["records_without_patient_id"]:
        raise typer.Exit(1)


def _patient_summary(patient_ids: list[str] | None) -> dict[str, object]:
    """How many patients the good rows hold, and records per patient (None: no ids)."""
    from client.dp.patients import (  # imports torch: with the command
        has_patient_ids,
        records_per_patient,
        records_without_patient_id,
    )

    if not has_patient_ids(patient_ids):
        return {"patients": None, "records_per_patient": None, "records_without_patient_id": None}
    counts = records_per_patient(patient_ids or [])
    return {
        "patients": len(counts),
        "records_per_patient": {"median": statistics.median(counts), "max": max(counts)},
        "records_without_patient_id": records_without_patient_id(patient_ids),
    }


_HOSPITAL_FILE = typer.Option("--config", "-c", help="The hospital's file (hospital.toml).")


def _custody(config: Path) -> tuple[Any, Path, Path]:
    """The hospital, its state-dir and its ledger backup, from its file (exit 2 if bad)."""
    try:
        hospital = HospitalConfig.from_node_config({"config-file": str(config)})
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if not hospital.state_dir or not hospital.hospital_id:
        typer.secho(
            f"error: {config}: give hospital.hospital-id and hospital.state-dir",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    state = Path(hospital.state_dir).expanduser()
    return hospital, state, hospital.ledger_backup_file(state)


def ledger_init(
    config: Annotated[Path, _HOSPITAL_FILE],
    fresh_start: Annotated[
        bool,
        typer.Option(
            "--fresh-start",
            help="Start anew in a state directory that was used before (its ledger lost): "
            "its patients' epsilon restarts from zero. Only with your privacy officer's word.",
        ),
    ] = False,
) -> None:
    """Start this hospital's privacy ledger, once. A person runs it; nothing runs it alone.

    A hospital with its own data never starts a ledger by itself: a state directory with
    no ledger is refused, so a deleted ledger cannot reset epsilon. This writes the empty
    ledger and its backup (hospital.ledger-backup), and fixes the hospital's split of its
    patients (a secret key and its file's test-fraction and validation-fraction).
    """
    # numpy loads with the ledger commands (see the note at the top)
    from client.dp.hospital_split import new_split
    from client.dp.ledger import LedgerError
    from client.dp.ledger_custody import init_ledger

    hospital, state, backup = _custody(config)
    policy = effective_policy(PrivacyConfig(), hospital)  # its caps; each run's request applies
    try:
        ledger = init_ledger(state, hospital.name, policy, backup, new_split(hospital), fresh_start)
    except LedgerError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(f"started the privacy ledger of {hospital.name}: {ledger.path} (backup {backup})")
    typer.echo(
        f"its split, fixed for good: test {hospital.test_fraction}, validation "
        f"{hospital.validation_fraction} of its patients"
    )


def ledger_restore(config: Annotated[Path, _HOSPITAL_FILE]) -> None:
    """Put the ledger's backup back, after the ledger was deleted (verified first)."""
    # numpy loads with the ledger commands (see the note at the top)
    from client.dp.ledger import LedgerError
    from client.dp.ledger_custody import restore_ledger

    hospital, state, backup = _custody(config)
    try:
        ledger = restore_ledger(state, hospital.name, backup)
    except LedgerError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(
        f"restored the privacy ledger of {ledger.hospital} from {backup}: epsilon "
        f"{ledger.epsilon():.3f}, {len(ledger.history)} release(s)"
    )


def ledger_backup(config: Annotated[Path, _HOSPITAL_FILE]) -> None:
    """Write the ledger's backup anew, after it was lost (the ledger is verified first).

    A ledger without its backup is refused, since nothing then shows an edit or a
    rollback: have your privacy officer check the ledger before running this.
    """
    # numpy loads with the ledger commands (see the note at the top)
    from client.dp.ledger import LedgerError
    from client.dp.ledger_custody import write_backup

    _, state, backup = _custody(config)
    try:
        ledger = write_backup(state, backup)
    except LedgerError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(f"wrote {backup}, the backup of {ledger.hospital}'s ledger ({ledger.epsilon():.3f})")


def ledger_split(
    config: Annotated[Path, _HOSPITAL_FILE],
    after_releases: Annotated[
        bool,
        typer.Option(
            "--after-releases",
            help="Confirm: the ledger holds releases made before it kept a split, and a "
            "patient trained then may now be held out (covered by both epsilons together).",
        ),
    ] = False,
) -> None:
    """Fix the hospital's split in a ledger written before ledgers kept one.

    A ledger started by ``fedfusion ledger init`` has its split already. One that holds
    releases made without a split is refused until a person runs this.
    """
    # numpy loads with the ledger commands (see the note at the top)
    from client.dp.hospital_split import fix_split_after_releases
    from client.dp.ledger import LedgerError

    hospital, state, _ = _custody(config)
    if not after_releases:
        typer.secho(
            "error: give --after-releases to confirm (see `fedfusion ledger split --help`)",
            fg=typer.colors.RED,
            err=True,
        )
        raise typer.Exit(2)
    try:
        ledger = fix_split_after_releases(
            hospital, state, effective_policy(PrivacyConfig(), hospital)
        )
    except LedgerError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    typer.echo(
        f"fixed the split of {ledger.hospital}: test {hospital.test_fraction}, validation "
        f"{hospital.validation_fraction} of its patients, after {len(ledger.history)} "
        "earlier release(s)"
    )


def ledger_show(
    state_dir: Annotated[
        Path, typer.Argument(help="The hospital's state-dir (or its privacy_ledger.json).")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="The stable JSON form (documented in docs/privacy.md).")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="The hospital's file: also check the ledger against its backup."
        ),
    ] = None,
) -> None:
    """Show a hospital's privacy ledger: epsilon spent, round by round, against its budget.

    The ledger is verified first (checksum, hash chain, recorded epsilon against its
    history, and with --config its backup and the file's split fractions); a ledger
    that cannot be trusted is reported, never shown as if it were fine.
    """
    # numpy loads with the ledger commands (see the note at the top)
    from client.dp.hospital_split import check_fractions
    from client.dp.ledger import HELD_OUT_STATS, LedgerError, read_ledger
    from client.dp.ledger_custody import check_against_backup

    try:
        ledger = read_ledger(state_dir)
        if config is not None:
            hospital, _, ledger.backup = _custody(config)
            check_against_backup(ledger)
            check_fractions(hospital, ledger)
        view = ledger.export()
    except LedgerError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if as_json:
        typer.echo(json.dumps(view, indent=2))
        return
    if config is None:
        typer.echo("(its backup not checked: give the hospital's file with --config)")
    unit = view["unit"]
    per = f"per {unit}" if unit else "per patient or record (fixed at its first use)"
    typer.echo(
        f"{view['hospital']}: epsilon {per} {view['epsilon']:.3f} of max "
        f"{view['max_epsilon']:g} (delta {view['delta']:g}, {view['accountant']} accountant); "
        f"{view['remaining_epsilon']:.3f} left"
    )
    held_out = [e for e in view["history"] if e["mechanism"] == HELD_OUT_STATS]
    typer.echo(
        f"held-out part: epsilon {view['held_out_epsilon']:.3f} of max "
        f"{view['max_held_out_epsilon']:g}; {view['remaining_held_out_epsilon']:.3f} left"
        + (
            ""
            if held_out
            else " (no noised release recorded; statistics released exact, with "
            "held-out-noise off as in a simulation, carry no epsilon)"
        )
    )
    if view["public_records"] is not None:
        counted = "patient" if unit == "patient" else "record"
        typer.echo(f"released {counted} count N̂ = {view['public_records']} (N plus Gaussian noise)")
    if (split := view["split"]) is not None:
        typer.echo(
            f"split of its patients, fixed: test {split['test_fraction']:g}, validation "
            f"{split['validation_fraction']:g} (key {split['key_id']})"
            + (
                f"; fixed after {split['since_release']} release(s), whose training records "
                "may lie in any part"
                if split["since_release"]
                else ""
            )
        )
    else:
        typer.echo("split of its patients: not fixed yet (it is at its next run)")
    typer.echo(
        "round  release         noise multiplier  sample rate  steps  status     epsilon after"
    )
    for e in view["history"]:
        typer.echo(
            f"{e['round']:5d}  {e['mechanism']:14s}  {e['noise_multiplier']:16.4f}  "
            f"{e['sample_rate']:11.5f}  {e['steps']:5d}  {e['status']:9s}  "
            f"{e['epsilon_after']:13.3f}"
        )


def demo_data(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for hospital-N/ subfolders.")],
    hospitals: Annotated[
        int | None, typer.Option(min=1, max=12, help="How many hospitals (default 3).")
    ] = None,
    records: Annotated[
        int | None, typer.Option(min=10, help="Records per hospital (default 300).")
    ] = None,
    text_source: Annotated[
        str,
        typer.Option(
            help="The report column: indication (the clinical question, for diagnosis) or "
            "report (the radiologist's findings, which the labels were indexed from)."
        ),
    ] = "indication",
    held_out_of: Annotated[
        Path | None,
        typer.Option(
            help="A `fedfusion simulate` run: write each of its hospitals' held-out test "
            "records instead (never trained on; a test set for `fedfusion evaluate`). The "
            "run decides the hospitals and records."
        ),
    ] = None,
) -> None:
    """Write demo data in the manifest format: out/hospital-N/manifest.csv plus PNG files.

    Each hospital gets its own slice of the embedded data (real Indiana University
    reports' clinical indications and labels, with phantom radiographs drawn from the
    labels), to rehearse a deployment (deploy/compose.yaml, `fedfusion hospital`) before
    a hospital's own data is ready. With --held-out-of RUN, the slices are that
    simulated run's held-out records, rendered as its hospitals held them.
    """
    from shared_model.datasets.export import write_held_out, write_manifest  # torch: here only

    try:
        if held_out_of is not None:
            if hospitals is not None or records is not None:
                raise ValueError(
                    "--held-out-of takes the run's hospitals and records: drop "
                    "--hospitals and --records"
                )
            run, count = _simulated_run(held_out_of)
            manifests = write_held_out(out, run, count)
        else:
            manifests = [
                write_manifest(out / f"hospital-{i}", i, records or 300, text_source=text_source)
                for i in range(hospitals or 3)
            ]
    except ValueError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    for i, manifest in enumerate(manifests):
        typer.echo(f"  hospital-{i}: {manifest}")


def _simulated_run(run_dir: Path) -> tuple[Any, int]:
    """A simulated run's settings and hospital count; ValueError if it is not one."""
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
        count = int(json.loads((run_dir / "simulation.json").read_text("utf-8"))["hospitals"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{run_dir} is not a `fedfusion simulate` run directory (run.json and "
            f"simulation.json): {err}"
        ) from err
    return RunConfig.from_run_config(info.get("config", {})), count


def hospital(
    config: Annotated[
        Path, typer.Option("--config", "-c", help="The hospital's TOML file (see deploy/).")
    ],
    check: Annotated[
        bool, typer.Option(help="Only check the file and print the SuperNode command.")
    ] = False,
) -> None:
    """Join the federation as one hospital: run its SuperNode from its config file.

    The file's [hospital] table holds the hospital's facts and privacy policy
    (hospital-id, data-manifest, state-dir, max-epsilon, delta): its limits override
    whatever the server asks. The [connection] table says how to reach the server
    (server, root-certificates, private-key, port; insecure only for development).
    """
    # Flower loads with the command (see the note at the top)
    from client.node.launch import explain_exit, plan_supernode, run_until_joined

    try:
        launch = plan_supernode(config)
    except ConfigError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from err
    if launch.warning:
        typer.secho(launch.warning, fg=typer.colors.RED, err=True)
    if launch.note:
        typer.secho(launch.note, fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"{launch.hospital.hospital_id}: max-epsilon {launch.hospital.max_epsilon:g}, "
        f"delta {launch.hospital.delta:g}, ledger in {launch.hospital.state_dir}"
    )
    if check:
        typer.echo(shlex.join(launch.command))  # a command the operator can paste
        return
    code, output = run_until_joined(launch, echo=typer.echo)
    reason = explain_exit(code, output, launch)
    if reason:
        typer.secho(f"error: {reason}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
