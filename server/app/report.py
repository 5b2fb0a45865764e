"""What a person looks at after a run: a summary table, plots and a small report.

Everything here reads the run directory's ``metrics.json`` (the rounds as plain dicts),
so it works the same for a live run, a finished one, or one copied off a server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "THREAT_MODEL",
    "format_evaluation_line",
    "format_round_line",
    "load_rounds",
    "privacy_section",
    "summary_table",
    "write_report",
]

Round = dict[str, Any]


def load_rounds(run_dir: Path) -> list[Round]:
    """The completed rounds recorded in ``run_dir/metrics.json``."""
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["rounds"]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or value != value else format(value, spec)  # None or NaN


def _eps(h: Round) -> str:
    if h["status"] in {"failed", "rejected"}:
        return h["status"]
    if h["status"] == "evaluated":  # round 0: the initial model, nothing trained yet
        return "-"
    if h.get("epsilon") is None:
        return "no DP"
    mark = "*" if h["status"] == "declined" else ""
    held_out = h.get("held_out_epsilon")
    return f"{h['epsilon']:.2f}{mark}" + ("" if held_out is None else f"/{held_out:.2f}")


def format_round_line(rnd: Round, num_rounds: int) -> str:
    """One line of progress for a completed round."""
    eps = ", ".join(f"{h['hospital']} {_eps(h)}" for h in rnd["hospitals"])
    extra = ""
    if rnd["failures"] or rnd["declined"] or rnd.get("rejected"):
        extra = f" | {rnd['failures']} failed, {rnd['declined']} declined"
        if rnd.get("rejected"):
            extra += f", {rnd['rejected']} updates refused"
    if rnd.get("skipped"):
        extra += " | skipped: too few updates, model unchanged"
    if rnd["eval_auroc"] is None and rnd.get("secagg_shares") and not rnd.get("skipped"):
        evaluation = "evaluated in the next exchange"  # it rides in the next masked upload
    else:
        evaluation = f"eval loss {_fmt(rnd['eval_loss'])} | macro AUROC {_fmt(rnd['eval_auroc'])}"
    return (
        f"round {rnd['round']}/{num_rounds} | train loss {_fmt(rnd['train_loss'])} | "
        f"{evaluation} | epsilon: {eps} | {rnd['seconds']:.1f}s{extra}"
    )


def format_evaluation_line(server_round: int, metrics: dict[str, float], stats: Any) -> str:
    """One line for a model's global evaluation that arrived after its round's line."""
    return (
        f"evaluation of the model after round {server_round}, summed over hospitals: "
        f"eval loss {_fmt(metrics.get('loss'))} | macro AUROC {_fmt(metrics.get('auroc'))} "
        f"| {int(stats.examples)} held-out records"
    )


def hospital_units(rounds: list[Round]) -> dict[str, str]:
    """Whom each hospital's epsilon protects, as it last said (patient or record).

    Only hospitals that trained with DP: one without has no epsilon to qualify.
    """
    return {
        h["hospital"]: h["privacy_unit"]
        for r in rounds
        for h in r["hospitals"]
        if h.get("privacy_unit") and h.get("epsilon") is not None
    }


def _units_line(rounds: list[Round]) -> str:
    """'epsilon per patient: a, b; per record: c', or "" when no hospital said."""
    units = hospital_units(rounds)
    parts = [
        f"per {unit}: {', '.join(sorted(n for n, u in units.items() if u == unit))}"
        for unit in ("patient", "record")
        if unit in units.values()
    ]
    return "epsilon " + "; ".join(parts) if parts else ""


def summary_table(rounds: list[Round]) -> str:
    """Per round: global loss, macro AUROC, and each hospital's cumulative epsilon."""
    hospitals = sorted({h["hospital"] for r in rounds for h in r["hospitals"]})
    header = ["round", "train loss", "eval loss", "macro AUROC", *(f"eps {h}" for h in hospitals)]
    rows = []
    for r in rounds:
        by_name = {h["hospital"]: h for h in r["hospitals"]}
        rows.append(
            [
                str(r["round"]),
                _fmt(r["train_loss"]),
                _fmt(r["eval_loss"]),
                _fmt(r["eval_auroc"]),
                *(_eps(by_name[h]) if h in by_name else "-" for h in hospitals),
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
        *("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows),
    ]
    if units := _units_line(rounds):
        lines.append(units)
    if any(h.get("held_out_epsilon") is not None for r in rounds for h in r["hospitals"]):
        lines.append(
            "eps a/b: a for the hospital's training records, b for its held-out records "
            "(their noised evaluation statistics)"
        )
    if any(h["status"] == "declined" for r in rounds for h in r["hospitals"]):
        lines.append("* declined the round: training would have exceeded its max-epsilon")
    return "\n".join(lines)


THREAT_MODEL = """\
- **Each patient at a hospital** (all of their records together, where the hospital
  has patient ids; each record on its own where it does not: the table says which) is
  protected by that hospital's (epsilon, delta) differential privacy, add/remove-one,
  cumulative over every round and capped by the hospital's own limits. The hospital
  splits its patients itself, by a secret key: a training patient's epsilon covers
  everything computed from the training records (its updates, its released count and
  training loss, and so the global model); a held-out patient's covers the evaluation
  statistics, which leave with Gaussian noise (a hospital with its own data; simulated
  hospitals send exact ones). It does not cover a patient seen at several hospitals
  (the guarantees add up), nor anything a hospital sends outside fedfusion.
- **The server may lie.** With secure aggregation (SecAgg+) each hospital checks every
  protocol message itself, so the server learns only sums over the hospitals' uploads
  (updates and held-out statistics) unless enough hospitals collude with it; the
  differential privacy above holds even then.
- **Public:** each hospital's name, whether it trained or declined and why, its epsilons
  and DP parameters (functions of its settings and public values), and the final
  model, which is DP-protected.
- **Not covered:** a hospital's own compromised machine, and side channels such as
  timing and message sizes.
"""


def _latest_held_out(rounds: list[Round]) -> dict[str, tuple[float, float | None]]:
    """Per hospital, its last reported held-out epsilon and cap."""
    out: dict[str, tuple[float, float | None]] = {}
    for r in rounds:
        for h in r["hospitals"]:
            if h.get("held_out_epsilon") is not None:
                out[h["hospital"]] = (h["held_out_epsilon"], h.get("max_held_out_epsilon"))
    return out


def privacy_section(rounds: list[Round], config: dict[str, Any]) -> list[str]:
    """The report's privacy part: DP per hospital, secure aggregation, threat model."""
    latest: dict[str, Round] = {}
    for r in rounds:
        for h in r["hospitals"]:
            if h.get("noise_multiplier") is not None or h["hospital"] not in latest:
                latest[h["hospital"]] = h
    lines = [
        "## Privacy",
        "",
        f"Each hospital trains with DP-SGD (Opacus, Poisson sampling), clipping norm "
        f"C = {config.get('privacy.max-grad-norm')}, delta = {config.get('privacy.delta')} "
        f"(or the hospital's smaller one), accountant {config.get('privacy.accountant')}. "
        "epsilon is cumulative over every round the hospital trained in, recomputed from "
        "its privacy ledger (`fedfusion ledger show <state-dir>`). Per patient, it covers "
        "all of a patient's records at that hospital together (each step samples patients "
        "and trains on one record of each); per record, each record on its own.",
        "",
        "![epsilon](epsilon.png)",
        "",
        "| hospital | protects each | epsilon spent | max epsilon | held-out epsilon | max "
        "held-out epsilon | noise multiplier | sample rate | steps (last round) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    held_out = _latest_held_out(rounds)
    units = hospital_units(rounds)
    for name, h in sorted(latest.items()):
        spent, cap = held_out.get(name, (None, None))
        lines.append(
            f"| {name} | {units.get(name, '-')} | {_fmt(h.get('epsilon'), '.3f')} | "
            f"{_fmt(h.get('max_epsilon'), 'g')} | "
            f"{_fmt(spent, '.3f')} | {_fmt(cap, 'g')} | "
            f"{_fmt(h.get('noise_multiplier'), '.4f')} | {_fmt(h.get('sample_rate'), '.5f')} | "
            f"{h.get('steps') if h.get('steps') is not None else '-'} |"
        )
    lines += [
        "",
        "Held-out epsilon: what the hospital's held-out records have spent on the "
        "evaluation statistics it released with Gaussian noise; `-` where it stated none "
        "(it released them exact, as a simulated hospital does by default, or not at all).",
    ]
    secagg = config.get("secagg.enabled", False)
    lines += ["", "### Secure aggregation", ""]
    if secagg:
        lines += [
            "Updates travel only inside SecAgg+ (the server unmasks the sum alone): "
            f"clipping range {config.get('secagg.clipping-range')}, max weight "
            f"{config.get('secagg.max-weight')}, stage timeout "
            f"{config.get('secagg.stage-timeout')} s.",
        ]
    else:
        lines += [
            "**Off** (`secagg.enabled = false`): the server saw each hospital's DP-noised "
            "update in the clear.",
        ]
    lines += [
        "",
        "| round | trained | declined | dropped out | evaluation failures | shares / "
        "threshold | median bytes up per hospital |",
        "|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rounds:
        if r["round"] == 0:
            continue
        trained = sum(h["status"] == "trained" for h in r["hospitals"])
        ups = sorted(h.get("bytes_up", 0) for h in r["hospitals"] if h.get("bytes_up"))
        plan = f"{r['secagg_shares']} / {r['secagg_threshold']}" if r.get("secagg_shares") else "-"
        median_up = f"{ups[len(ups) // 2] / 1e6:.2f} MB" if ups else "-"
        lines.append(
            f"| {r['round']} | {trained} | {r['declined']} | {r['failures']} | "
            f"{r['eval_failures']} | {plan} | {median_up} |"
        )
    lines += ["", "### Who is protected from whom", "", THREAT_MODEL]
    return lines


def write_report(run_dir: Path, config: dict[str, Any]) -> Path:
    """Plot training curves, epsilon per hospital and per-label AUROC; write report.md."""
    # matplotlib loads only to draw a report: the commands import this module for its table
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen
    from matplotlib.ticker import MaxNLocator

    rounds = load_rounds(run_dir)
    xs = [r["round"] for r in rounds]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(xs, [r["train_loss"] for r in rounds], "o-", label="train (hospitals, DP)")
    ax1.plot(xs, [r["eval_loss"] for r in rounds], "s-", label="held-out")
    ax1.set(xlabel="round", ylabel="loss", title="Loss")
    ax1.legend()
    ax2.plot(xs, [r["eval_auroc"] for r in rounds], "o-", color="tab:green")
    ax2.set(xlabel="round", ylabel="macro AUROC", title="Held-out macro AUROC", ylim=(0.4, 1.0))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(run_dir / "training_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    hospitals = sorted({h["hospital"] for r in rounds for h in r["hospitals"]})
    budgets = set()
    for name in hospitals:
        pts = [
            (r["round"], h["epsilon"])
            for r in rounds
            for h in r["hospitals"]
            if h["hospital"] == name and h.get("epsilon") is not None
        ]
        budgets.update(
            h["max_epsilon"]
            for r in rounds
            for h in r["hospitals"]
            if h["hospital"] == name and h.get("max_epsilon") is not None
        )
        if pts:
            (line,) = ax.plot(*zip(*pts, strict=True), "o-", label=name)
            held = [
                (r["round"], h["held_out_epsilon"])
                for r in rounds
                for h in r["hospitals"]
                if h["hospital"] == name and h.get("held_out_epsilon") is not None
            ]
            if held:
                ax.plot(*zip(*held, strict=True), "s:", color=line.get_color(), label=None)
    for budget in budgets:
        ax.axhline(budget, color="red", ls="--", lw=1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.set(
        xlabel="round",
        ylabel="cumulative epsilon",
        title=f"Privacy spent (delta={config.get('privacy.delta')}); red: max-epsilon",
    )
    ax.text(
        0.01,
        0.98,
        "solid: training records; dotted: held-out records",
        transform=ax.transAxes,
        va="top",
        fontsize=7,
    )
    if hospitals:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "epsilon.png", dpi=110)
    plt.close(fig)

    last = rounds[-1]["eval_metrics"] if rounds else {}
    # a label without an AUROC (one class, or too few to read under the hospitals' noise)
    # is left out of the plot
    labels = [
        k.split(".", 1)[1] for k, v in last.items() if k.startswith("auroc.") and v is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.barh(labels, [last[f"auroc.{lab}"] for lab in labels], color="tab:blue")
    ax.axvline(0.5, color="grey", ls=":")
    ax.set(
        xlim=(0, 1),
        xlabel="AUROC (held-out, summed over hospitals)",
        title="Per-label AUROC, final round",
    )
    fig.tight_layout()
    fig.savefig(run_dir / "per_label_auroc.png", dpi=110)
    plt.close(fig)

    roc = _roc_plot(run_dir)
    final = rounds[-1] if rounds else None
    lines = [
        "# fedfusion run report",
        "",
        f"Rounds trained: {sum(r['round'] > 0 for r in rounds)} (round 0 is the initial "
        f"model). Hospitals: {', '.join(hospitals)}.",
        "",
        "Data: the embedded default pairs real Indiana University report text and labels"
        " with synthetic phantom radiographs drawn from those labels. Image metrics here"
        " say how well the model reads the phantoms, not real radiographs."
        if not config.get("data-manifest")
        else "",
        "",
        "## Summary",
        "",
        "```",
        summary_table(rounds),
        "```",
        "",
        *privacy_section(rounds, config),
        "## Utility",
        "",
        "![curves](training_curves.png)",
        "",
        "![per-label AUROC](per_label_auroc.png)",
        "",
        *([f"![ROC curves]({roc.name})", ""] if roc else []),
    ]
    if final:
        lines += [
            "Final held-out metrics (from the statistics summed over hospitals; accuracy, "
            "precision, recall, F1 and exact match at probability 0.5 for every label: "
            "`fedfusion export` chooses per-label thresholds):",
            "",
        ]
        lines += [
            f"- {k}: {v:.3f}" for k, v in sorted(final["eval_metrics"].items()) if v is not None
        ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _roc_plot(run_dir: Path) -> Path | None:
    """ROC curves of the last evaluated model, from its summed score histograms."""
    from shared_model.evaluation import EvalStats  # numpy: for this plot only, as above

    path = run_dir / "evaluation.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if not data.get("rounds"):
        return None
    last = max(data["rounds"], key=int)
    stats = EvalStats.from_vector(data["labels"], data["rounds"][last])
    import matplotlib.pyplot as plt  # loaded late, as in write_report (its Agg backend)

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for j, label in enumerate(stats.labels):
        fpr, tpr = stats.roc_curve(j)
        auc = stats.auroc(j)
        if auc == auc:  # defined: both classes present
            ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({auc:.2f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.set(xlabel="false positive rate", ylabel="true positive rate",
           title=f"ROC, model after round {last}")  # fmt: skip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = run_dir / "roc_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
