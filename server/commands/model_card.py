"""The model card of an exported bundle: what the model is, how it was made, how well it does.

Written for the people who decide whether to use the model at a hospital. Every figure
comes from the run directory: the settings, the hospitals' reported privacy spend, and
the federation's pooled held-out statistics (never one hospital's records).
"""

from __future__ import annotations

import math
from typing import Any

from server.app.report import hospital_units
from server.commands.run_facts import RunFacts
from shared_model.inference.operating_points import PooledLabel

__all__ = ["PooledFigures", "render_model_card"]

_OPTIMIZER_NAMES = {"sgd": "SGD with momentum", "adamw": "AdamW"}

# Per-label figures, and (macro AUROC, its 95% CI low, high): operating_points.pooled_figures
PooledFigures = tuple[list[PooledLabel], tuple[float, float, float]]

_EMBEDDED_DATA = (
    "The embedded demonstration data: 3,860 labelled chest X-ray reports from Indiana "
    "University (real: the text input, each report's clinical indication, and the "
    "finding labels indexed from the radiologist's report) paired with **synthetic "
    "phantom radiographs** drawn from each report's labels (not real images), split "
    "across {n} simulated hospitals with label skew (Dirichlet alpha {alpha}), each "
    "hospital's phantoms with its own simulated scanner."
)
_OWN_DATA = (
    "Each hospital's own records (radiograph, clinical text, finding labels), which "
    "never left the hospital; the coordinator saw only DP-protected updates and pooled "
    "evaluation statistics, so this card cannot describe the records themselves."
)


def _f(value: float | None, spec: str = ".3f") -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (format(value, spec))
    )


def _secagg_plan(facts: RunFacts) -> str:
    """The SecAgg+ shares and reconstruction threshold the rounds used."""
    plans = sorted(
        {
            (r["secagg_shares"], r["secagg_threshold"])
            for r in facts.rounds
            if r.get("secagg_shares") and r.get("secagg_threshold")
        }
    )
    used = ", ".join(f"{n} shares, reconstruction threshold {t}" for n, t in plans)
    return "inside SecAgg+ secure aggregation" + (f" ({used})" if used else "")


def _privacy_rows(facts: RunFacts, server_round: int) -> list[str]:
    """Per hospital: epsilon spent by the exported round and by the run's end, cap, delta.

    With the held-out records' epsilon at the end and its cap, where the hospital noised
    its held-out statistics.
    """
    at_round: dict[str, dict[str, Any]] = {}
    at_end: dict[str, dict[str, Any]] = {}
    for record in facts.rounds:
        for h in record["hospitals"]:
            if h.get("status") not in {"trained", "declined"}:
                continue
            at_end[h["hospital"]] = h
            if int(record["round"]) <= server_round:
                at_round[h["hospital"]] = h
    default_delta = facts.run.privacy.delta
    units = hospital_units(facts.rounds)
    held_out: dict[str, dict[str, Any]] = {}
    for record in facts.rounds:
        for h in record["hospitals"]:
            if h.get("held_out_epsilon") is not None:
                held_out[h["hospital"]] = h
    rows = []
    for name in sorted(at_end):
        end, mine = at_end[name], at_round.get(name, {})
        held = held_out.get(name)
        held_cells = (
            f"{_f(held['held_out_epsilon'], '.2f')} | {_f(held.get('max_held_out_epsilon'), 'g')}"
            if held
            else ("exact (public data) | -" if facts.simulated_hospitals else "none stated | -")
        )
        private = end.get("epsilon") is not None or end.get("noise_multiplier")
        if not private:
            rows.append(
                f"| {name} | - | not private (DP off by its own config) | - | - | {held_cells} "
                "| - |"
            )
            continue
        delta = end.get("delta") if end.get("delta") is not None else default_delta
        rows.append(
            f"| {name} | {units.get(name, '-')} | {_f(mine.get('epsilon'), '.2f')} | "
            f"{_f(end.get('epsilon'), '.2f')} | "
            f"{_f(end.get('max_epsilon'), 'g')} | {held_cells} | {delta:g} |"
        )
    return rows


def _noise_note(info: dict[str, Any]) -> str:
    """How the pooled figures were released and what their intervals include."""
    pooled = info.get("pooled-evaluation", {})
    noised, std = pooled.get("noised-hospitals") or 0, pooled.get("noise-std")
    if not noised:
        return (
            "The hospitals released these statistics exact (a simulated hospital, whose "
            "data is public, does by default; a hospital with its own data only if its file "
            "says held-out-noise = false). 95% confidence intervals: stratified "
            "bootstrap over the histograms."
        )
    return (
        f"{noised} of the hospitals released theirs with Gaussian noise, charged to their "
        "held-out epsilon (Privacy, above), in 16 coarse score bins; each AUROC is read "
        "from a binormal fit to the noised bins (summed noise std "
        f"{_f(std, '.1f')} per bin, in units of a patient or record). 95% confidence "
        "intervals: parametric "
        "bootstrap that resamples the records and adds fresh noise of the same "
        "variance, so they include the privacy noise. Thresholds use only these "
        "released values."
    )


def _evaluation_section(
    facts: RunFacts,
    info: dict[str, Any],
    figures: PooledFigures | None,
) -> list[str]:
    source = info["source"]
    split = facts.run.data.holdout
    if figures is None:
        why = "; ".join(info["decision"]["notes"]) or "no pooled held-out statistics"
        return [
            "## Evaluation",
            "",
            f"No pooled figures are published for this round ({why}); the decision "
            "thresholds are at probability 0.5. Evaluate the model on your own records with "
            "`fedfusion evaluate`.",
        ]
    per_label, (macro, low, high) = figures
    n = per_label[0].positives + per_label[0].negatives if per_label else 0
    summed = (
        "summed inside secure aggregation"
        if facts.run.secagg.enabled
        else "each sent by its hospital in the clear (its own choice) and summed by the server"
    )
    lines = [
        "## Evaluation",
        "",
        f"On the pooled held-out {'test' if split == 'test' else 'validation'} records of "
        f"{source['pooled-hospitals']} hospitals ({n:,} patients or records, as each "
        "hospital counts them; each hospital split its own "
        "records by patient and never trained on these), from their score histograms, "
        f"{summed}. {_noise_note(info)}",
        "",
        f"**Macro AUROC {_f(macro)} (95% CI {_f(low)}-{_f(high)})** "
        "(labels resampled independently: the histograms do not keep which records "
        "share labels).",
        "",
        "| label | positives | AUROC (95% CI) | threshold | sensitivity | specificity | "
        "PPV | NPV |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p, t in zip(per_label, info["decision"]["thresholds"], strict=True):
        lo, hi = p.auroc_ci95
        lines.append(
            f"| {p.label} | {p.positives} | {_f(p.auroc)} ({_f(lo)}-{_f(hi)}) | {t:.3f} | "
            f"{_f(p.sensitivity)} | {_f(p.specificity)} | {_f(p.ppv)} | {_f(p.npv)} |"
        )
    lines += [
        "",
        f"Thresholds: rule `{info['decision']['rule']}` on the same pooled statistics. PPV "
        "and NPV hold for the pooled prevalence; at a hospital with another prevalence "
        "they differ: `fedfusion evaluate` gives them on its own records.",
    ]
    if source["selection"] == "best":
        lines += [
            "",
            f"This round was chosen as the best of {source['rounds-completed']} by the same "
            f"pooled {split} metric, so these figures are optimistic by that selection"
            + (
                "; train with `data.holdout = validation` to select on a validation split."
                if split == "test"
                else " (validation split: the test split was never used)."
            ),
        ]
    return lines


def render_model_card(
    facts: RunFacts,
    info: dict[str, Any],
    figures: PooledFigures | None,
) -> str:
    """MODEL_CARD.md for a bundle (``info`` is its bundle.json without the weights' hash)."""
    run, source, model = facts.run, info["source"], info["model"]
    hospitals = sorted({h["hospital"] for r in facts.rounds for h in r["hospitals"]})
    data = (
        _EMBEDDED_DATA.format(n=facts.simulated_hospitals, alpha=run.data.dirichlet_alpha)
        if facts.simulated_hospitals
        else _OWN_DATA
    )
    parts = info["frozen-base"]["parts"]
    frozen = (
        "frozen pretrained parts (not shipped; every hospital holds them, and loading checks "
        f"their SHA-256, {info['frozen-base']['sha256'][:16]}...): "
        + "; ".join(f"{p['part']}: {p['source']}" for p in parts)
        if parts
        else "no frozen parts: every parameter trained and ships in weights.safetensors"
    )
    title = (
        f"{model['model.image-encoder']} + {model['model.text-encoder']} text encoder, "
        f"{model['model.fusion'].replace('_', ' ')} fusion"
    )
    lines = [
        f"# Model card: {title}",
        "",
        f"fedfusion {info['fedfusion-version']} · exported {info['created']} · round "
        f"{source['round']} ({source['selection']}) of run `{source['run']}`",
        "",
        *([f"*{source['selection-note']}.*", ""] if source.get("selection-note") else []),
        "> **Not a medical device.** For research and evaluation only. It has not been "
        "cleared or approved by any regulator and must not be used for diagnosis or "
        "treatment decisions.",
        "",
        "## Intended use",
        "",
        "Research on federated, privacy-preserving multimodal models: scoring chest "
        "radiographs with their clinical text for the findings below, and measuring how "
        "well such a model transfers to a hospital's own patients (`fedfusion evaluate`).",
        "",
        "## Task",
        "",
        f"Multi-label findings from a frontal chest radiograph and the clinical text "
        f"({run.data.text_source}): {', '.join(run.model.labels)}. Either input may be "
        "missing; the model was trained with modality dropout to handle it.",
        "",
        "## Model",
        "",
        f"- image encoder: {model['model.image-encoder']}; text encoder: "
        f"{model['model.text-encoder']}; fusion: {model['model.fusion']}; branches: "
        f"{model['model.branches']}; encoder mode: {model['model.encoder-mode']}",
        f"- {frozen}",
        f"- input: {run.model.image_size} x {run.model.image_size} grayscale; text up to "
        f"{run.model.max_report_tokens} tokens",
        "",
        "## Training data",
        "",
        data,
        "",
        "## Training",
        "",
        f"{len(hospitals)} hospitals, {source['rounds-completed']} rounds of federated "
        f"averaging with server momentum {run.server.momentum} "
        f"({run.train.local_epochs} local epochs, batch {run.train.batch_size}, "
        f"{_OPTIMIZER_NAMES[run.train.optimizer]}, learning rate {run.train.learning_rate}"
        + (
            f" with {run.train.warmup_rounds} warm-up rounds and cosine decay"
            if run.train.lr_schedule == "cosine"
            else ""
        )
        + "); updates "
        + (_secagg_plan(facts) if run.secagg.enabled else "sent in the clear")
        + ".",
        "",
        "## Privacy",
        "",
        "Each hospital trained with DP-SGD (Opacus): each patient there (all of their "
        "records together, where the table says patient) or each record (where it says "
        "record: a patient with k records has up to k times it) has the (epsilon, delta) "
        "guarantee below, add/remove-one, per hospital, cumulative over every round it "
        "trained in, capped by its own maximum. The run asked each hospital to "
        f"spend at most epsilon = {run.privacy.target_epsilon:g} over its rounds "
        "(privacy.target-epsilon); a hospital's own max epsilon is the hard cap. The "
        f"model of round {source['round']} depends only on the rounds up to it; everyone "
        "who saw the whole run saw the later rounds too. Each hospital split its records "
        "by patient with its own secret key; held-out records are never trained on, and "
        "their evaluation statistics have a budget of their own (held-out epsilon, over "
        "every evaluation the hospital released), or were released exact where the "
        "hospital's data is public (simulated hospitals).",
        "",
        f"| hospital | protects each | epsilon by round {source['round']} | epsilon at the end "
        "| max epsilon | held-out epsilon at the end | max held-out epsilon | delta |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *_privacy_rows(facts, source["round"]),
        "",
        *_evaluation_section(facts, info, figures),
        "",
        "## Known limits",
        "",
    ]
    if facts.simulated_hospitals:
        lines.append(
            "- The radiographs it learned from are synthetic phantoms: its image scores say "
            "how well it reads phantoms, not real radiographs. Do not apply it to patients."
        )
    lines += [
        "- Differential privacy costs accuracy, most for rare findings; labels with few "
        "positives have wide intervals.",
        "- The pooled figures average over the hospitals that took part; a hospital's own "
        "patients may differ (scanner, population, prevalence): evaluate on them first.",
        "- Probabilities are uncalibrated for a new site; `fedfusion evaluate "
        "--recalibrate` fits a per-label temperature on a hospital's own records.",
        "",
        "## Configuration",
        "",
        "```toml",
        *(f"{k} = {_toml(v)}" for k, v in sorted(info["run-config"].items())),
        "```",
        "",
    ]
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)
