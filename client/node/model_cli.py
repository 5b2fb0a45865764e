"""``fedfusion predict`` and ``fedfusion evaluate``: a hospital uses an exported model bundle.

Both run entirely on the hospital's machine; nothing is sent anywhere.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from shared_model.config import ConfigError
from shared_model.progress import progress

# Every `fedfusion` call imports this module to list its commands: torch, and the
# modules that import it, load inside the command that needs them.

if TYPE_CHECKING:
    from shared_model.inference.loaded import LoadedModel
    from shared_model.inference.predict import Prediction

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the commands that apply a trained model."""
    app.command("predict")(predict)
    app.command("evaluate")(evaluate)


_BUNDLE = typer.Argument(help="A model bundle folder (from `fedfusion export`).")
_DEVICE = typer.Option(help="cpu, cuda, cuda:N or auto; without a GPU, the CPU (with a warning).")
_TEXT_MODEL = typer.Option(
    help="Where this machine keeps the pretrained text model, if not where the bundle says."
)
_IMAGE_WEIGHTS = typer.Option(
    help="Where this machine keeps the pretrained image weights, if not where the bundle says."
)
_EXPECT = typer.Option(
    help="Refuse the bundle unless its digest starts with this (the digest `fedfusion "
    "export` printed, at least 16 characters)."
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(code)


def _manifest_failure(err: Exception) -> typer.Exit:
    """A manifest that cannot be used at all: the reason, then every row refused."""
    report = getattr(err, "report", None)
    for error in report.errors if report is not None else ():
        typer.secho(f"  {error}", fg=typer.colors.RED, err=True)
    return _fail(str(err))


def _load(
    bundle: Path, device: str, text_model: str, image_weights: str, expect: str
) -> LoadedModel:
    # torch loads with the command (see the note at the top)
    from shared_model.devices import resolve_device
    from shared_model.inference.bundle import BundleError, load_bundle
    from shared_model.inference.loaded import load_model

    try:
        where = str(resolve_device(device, "--device"))  # no GPU: the CPU, with a warning
        found = load_bundle(bundle)
        if expect and (len(expect) < 16 or not found.digest.startswith(expect.lower())):
            raise BundleError(
                f"{bundle}: digest {found.digest} is not the expected {expect} (give at least "
                "16 characters): this is not the bundle the coordinator announced"
            )
        loaded = load_model(found, text_model=text_model, image_weights=image_weights, device=where)
    except (BundleError, ConfigError) as err:
        raise _fail(str(err)) from err
    typer.echo(f"bundle {loaded.bundle.describe()}, digest {found.digest[:16]}", err=True)
    if not found.shareable:
        typer.secho(
            "note: this bundle is recalibrated on one hospital's records: keep it there",
            fg=typer.colors.YELLOW,
            err=True,
        )
    return loaded


def _manifest_rows(manifest: Path) -> int:
    from shared_model.manifest import ManifestError, read_manifest_rows  # numpy: with the command

    try:
        return len(read_manifest_rows(manifest.expanduser().resolve(), ("image", "report")))
    except ManifestError as err:
        raise _fail(str(err)) from err


def _write_predictions(predictions: list[Prediction], labels: tuple[str, ...], out: Path) -> None:
    """Write the results, readable by their owner only (they name patients)."""
    out.touch(mode=0o600)
    suffix = out.suffix.lower()
    if suffix == ".json":
        rows = [
            {
                "row": p.row,
                "image": p.image,
                "patient_id": p.patient_id,
                "probabilities": p.probabilities,
                "findings": p.findings if p.probabilities is not None else None,
                "error": p.error or None,
            }
            for p in predictions
        ]
        out.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
        return
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["row", "image", "patient_id", *(f"p_{x}" for x in labels), *labels, "error"]
        )
        for p in predictions:
            probs = (
                [f"{p.probabilities[x]:.4f}" for x in labels]
                if p.probabilities
                else [""] * len(labels)
            )
            decided = [int(p.decisions[x]) for x in labels] if p.decisions else [""] * len(labels)
            writer.writerow([p.row, p.image, p.patient_id, *probs, *decided, p.error])


def _show_record(prediction: Prediction, loaded: LoadedModel) -> None:
    bundle = loaded.bundle
    typer.echo(f"{'finding':14s} {'probability':>11s} {'threshold':>9s}  decision")
    thresholds = loaded.probabilities(bundle.threshold_logits[None, :])[0]
    for label, t in zip(bundle.labels, thresholds, strict=True):
        p = prediction.probabilities[label]  # type: ignore[index]
        decided = "POSITIVE" if prediction.decisions[label] else "negative"  # type: ignore[index]
        typer.echo(f"{label:14s} {p:11.4f} {t:9.4f}  {decided}")
    typer.echo(
        "(each finding is decided on its own: positive when its probability reaches its threshold)"
    )


def predict(
    bundle: Annotated[Path, _BUNDLE],
    image: Annotated[Path | None, typer.Option(help="A radiograph: PNG, JPEG or DICOM.")] = None,
    text: Annotated[str, typer.Option(help="The clinical text (e.g. the indication).")] = "",
    manifest: Annotated[
        Path | None,
        typer.Option(help="Many records: a CSV or JSONL with image and report columns."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the results as .csv or .json.")
    ] = None,
    device: Annotated[str, _DEVICE] = "cpu",
    text_model: Annotated[str, _TEXT_MODEL] = "",
    image_weights: Annotated[str, _IMAGE_WEIGHTS] = "",
    expect_digest: Annotated[str, _EXPECT] = "",
) -> None:
    """Apply a model bundle to one record (--image, --text) or to a manifest (--manifest).

    Records are preprocessed exactly as in training. Either input may be missing. Prints
    each finding's probability and decision at the bundle's thresholds, or writes them
    (--out results.csv / results.json, one row per manifest row, a row that cannot be
    read with its error). Exits 1 if any row could not be read, 2 if nothing could run.
    """
    # torch loads with the command (see the note at the top)
    from shared_model.inference.predict import predict_manifest, predict_record
    from shared_model.manifest import ManifestError

    if manifest is not None and (image is not None or text):
        raise _fail("give either --manifest or --image/--text, not both")
    if out is not None and out.suffix.lower() not in {".csv", ".json"}:
        raise _fail(f"--out {out}: use a .csv or .json file name")
    if out is not None and out.exists():
        raise _fail(f"--out {out} exists: choose another name or remove it first")
    total = _manifest_rows(manifest) if manifest is not None else 0
    loaded = _load(bundle, device, text_model, image_weights, expect_digest)
    labels = loaded.bundle.labels
    if manifest is None:
        try:
            predictions = [predict_record(loaded, image, text)]
        except ValueError as err:
            raise _fail(str(err)) from err
        if out is None:
            _show_record(predictions[0], loaded)
    else:
        try:
            with progress(total) as advance:
                predictions, _report = predict_manifest(loaded, manifest, advance)
        except ManifestError as err:
            raise _manifest_failure(err) from err
        if out is None:
            typer.echo("row  findings (probability)")
            for p in predictions:
                shown = (
                    p.error
                    or ", ".join(
                        f"{x} ({p.probabilities[x]:.3f})"
                        for x in p.findings  # type: ignore[index]
                    )
                    or "none"
                )
                typer.echo(f"{p.row:>3d}  {shown}")
    bad = [p for p in predictions if p.error]
    if out is not None:
        _write_predictions(predictions, labels, out)
        unread = f", {len(bad)} could not be read (see the error column)" if bad else ""
        typer.echo(
            f"{len(predictions)} rows written to {out}: {len(predictions) - len(bad)} "
            f"predicted{unread}"
        )
    if bad:
        for p in bad:
            typer.secho(f"row {p.row} ({p.image or '-'}): {p.error}", fg=typer.colors.RED, err=True)
        typer.secho(f"{len(bad)} of {len(predictions)} rows could not be read", err=True)
        raise typer.Exit(1)


def evaluate(
    bundle: Annotated[Path, _BUNDLE],
    manifest: Annotated[
        Path, typer.Argument(help="This hospital's labelled test records (CSV or JSONL).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report and plots.")],
    recalibrate: Annotated[
        bool,
        typer.Option(
            help="Also fit per-label temperatures on these records and write a recalibrated "
            "bundle for this hospital (OUT/recalibrated-bundle)."
        ),
    ] = False,
    bootstrap: Annotated[
        int, typer.Option(min=0, help="Bootstrap resamples for the AUROC CIs.")
    ] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    device: Annotated[str, _DEVICE] = "cpu",
    text_model: Annotated[str, _TEXT_MODEL] = "",
    image_weights: Annotated[str, _IMAGE_WEIGHTS] = "",
    expect_digest: Annotated[str, _EXPECT] = "",
) -> None:
    """Evaluate a model bundle on this hospital's own labelled records; nothing leaves.

    Per finding and macro: AUROC with a bootstrap 95% CI; sensitivity, specificity, PPV
    and NPV at the bundle's thresholds with Wilson 95% CIs; calibration (expected
    calibration error, reliability diagram). Writes OUT/report.md, evaluation.json,
    roc_curves.png and reliability.png. Rows that cannot be read are left out and
    listed; the command then exits 1.
    """
    # torch loads with the command (see the note at the top)
    from shared_model.inference.local_evaluation import evaluate_bundle
    from shared_model.manifest import ManifestError

    total = _manifest_rows(manifest)
    loaded = _load(bundle, device, text_model, image_weights, expect_digest)
    try:
        with progress(total) as advance:
            run = evaluate_bundle(
                loaded,
                manifest,
                out,
                bootstrap=bootstrap,
                seed=seed,
                recalibrate=recalibrate,
                progress=advance,
            )
    except (ManifestError, ValueError) as err:
        raise _manifest_failure(err) from err
    ev = run.evaluation
    typer.echo(
        f"{ev.n} records; thresholds from the federation ({loaded.bundle.info['decision']['rule']})"
    )
    header = ("sens", "spec", "PPV", "NPV", "ECE")
    typer.echo(f"{'finding':14s} {'AUROC (95% CI)':>22s} " + " ".join(f"{h:>6s}" for h in header))
    for f in ev.per_label:
        typer.echo(
            f"{f.label:14s} {_ci(f.auroc, f.auroc_ci95):>22s} {_n(f.sensitivity.value)} "
            f"{_n(f.specificity.value)} {_n(f.ppv.value)} {_n(f.npv.value)} {_n(f.ece)}"
        )
    m = ev.macro
    typer.echo(
        f"{'macro':14s} {_ci(m.auroc, m.auroc_ci95):>22s} {_n(m.sensitivity)} "
        f"{_n(m.specificity)} {_n(m.ppv)} {_n(m.npv)} {_n(m.ece)}"
    )
    recal = run.recalibration
    if recal is not None:
        typer.echo(f"\n{'finding':14s} {'temperature':>11s} {'ECE before':>10s} {'after*':>7s}")
        for label, t, before, after in zip(
            recal.labels, recal.temperatures, recal.ece_before, recal.ece_after, strict=True
        ):
            typer.echo(f"{label:14s} {t:11.2f} {before:10.3f} {after:7.3f}")
        typer.echo("* cross-fitted: each half of the records with the other half's fit")
    for caution in run.cautions:
        typer.secho(f"caution: {caution}", fg=typer.colors.YELLOW)
    typer.echo(f"report: {run.out / 'report.md'}")
    if recal is not None:
        typer.echo(f"recalibrated bundle: {recal.bundle}")
        typer.secho(
            "  for this hospital only, do not share: its calibration is fitted on your "
            "records without differential privacy",
            fg=typer.colors.YELLOW,
        )
    if run.rows_refused:
        for r in run.rows_refused:
            typer.secho(
                f"row {r['row']} ({r['file']}): {r['reason']}", fg=typer.colors.RED, err=True
            )
        typer.secho(f"{len(run.rows_refused)} rows could not be read and were left out", err=True)
        raise typer.Exit(1)


def _n(value: float) -> str:
    return f"{'-':>6s}" if value != value else f"{value:6.3f}"


def _ci(value: float, ci: tuple[float, float]) -> str:
    if value != value:
        return "undefined (one class)"
    if ci[0] != ci[0]:
        return f"{value:.3f} (no CI)"
    return f"{value:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
