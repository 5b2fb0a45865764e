"""The one-run privacy audit: an empirical lower bound on epsilon beside the accounted one.

Steinke, Nasr and Jagielski (NeurIPS 2023): m canaries, each included independently with
probability 1/2, one training run, then guesses; the count of right guesses gives a
lower bound on epsilon at 95% confidence (``client/audit/bound.py``).

**White-box, gradient canaries, the server's view.** At one hospital, m Dirac canaries
(``client/dp/audit_hooks.py``): each included canary is sampled at every DP step with the
records' own rate and adds a gradient of norm C (the clip norm) on its own coordinate of
the trainable weights to the clipped sum, before the production noise function runs.
The coordinates are those training barely moves: the smallest entries of the canary
hospital's full-data gradient at the initial model (e.g. the embedding rows of text
buckets no report uses). The federation is the in-process one (``inprocess.py``: the
hospitals' own round code, SecAgg+ sums at the server). Each canary's score is the
global model's movement against its coordinate over the run (final minus initial
weights, which sum the aggregates the server received); the top k+ scores are guessed
"included", the bottom k- "excluded".

The auditor sees the sum of every hospital's update, as the server does; it knows the
canary coordinates, which the real server does not. So the white-box bound is for a
stronger adversary than the threat model's.

**Broken DP** scales the noise multiplier the production noise function reads at every
hospital (``audit_hooks.scaled_noise``); **non-private** turns privacy off (the canaries
are still added at norm C). A run is flagged when its bound exceeds its accounted
epsilon: under correct DP that happens with probability at most 5%.

**Black-box, record canaries** (``black_box_audit``, ``record_canaries.py``): the canaries
are training records at hospital 0 (the sampler, clipping, noise and accountant see
them), scored from the final global model alone. **Broken clipping**
(``audit_hooks.scaled_clipping``, ``BROKEN_CLIPPING``) is measured apart from the suite.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from client.app.local_training import prepare_training
from client.app.site import Site
from client.audit.bound import epsilon_cap, epsilon_lower_bound
from client.audit.inprocess import federate
from client.audit.record_canaries import (
    black_box_refusal,
    canary_scores,
    make_record_canaries,
    with_canaries,
)
from client.audit.report import AuditOutcome, audit_row, audit_table, write_audit_results
from client.dp import audit_hooks
from client.dp.policy import PrivacyPolicy
from shared_model.config import ConfigError, RunConfig

__all__ = [
    "AUDIT_OWNED",
    "AUDIT_RUNS",
    "BLACK_BOX",
    "BLACK_BOX_RUNS",
    "BROKEN_CLIPPING",
    "NOT_SIMULATED",
    "VARIANTS",
    "AuditOutcome",
    "AuditRun",
    "audit_simulated_federation",
    "black_box_audit",
    "check_settings",
    "quiet_coordinates",
    "run_one_run_audit",
    "white_box_audit",
    "write_audit_results",
]

StateDict = dict[str, torch.Tensor]

# Small enough for the four runs to fit 15 minutes on 2 cores; the default settings
# otherwise (DP + SecAgg+, the default model and training).
AUDIT_DATA: dict[str, Any] = {"data.max-reports": 1500}


@dataclass(frozen=True)
class AuditRun:
    """One audited federation: its run-config overrides and its noise scale."""

    name: str
    overrides: dict[str, Any]
    noise_scale: float = 1.0  # < 1: broken DP (audit_hooks.scaled_noise)
    clip_scale: float = 1.0  # > 1: broken clipping (audit_hooks.scaled_clipping)
    # without DP, the epsilon the run is checked against (what DP runs beside it claim)
    reference_epsilon: float = math.inf
    # True: a control the audit must flag (else it has no power at these settings);
    # False: a correct run it must not flag (else the implementation leaks); None: shown
    expect_flagged: bool | None = False


def _dp(epsilon: float) -> dict[str, Any]:
    """A DP run at ``epsilon``, whatever the operator's settings say of privacy."""
    return {"privacy.enabled": True, "privacy.target-epsilon": epsilon}


_NON_PRIVATE = {"privacy.enabled": False}
AUDIT_RUNS = (
    AuditRun("dp-eps1", _dp(1.0)),
    AuditRun("non-private", _NON_PRIVATE, reference_epsilon=1.0, expect_flagged=True),
    AuditRun("broken-dp-eps1 (noise x0.1)", _dp(1.0), noise_scale=0.1, expect_flagged=True),
    AuditRun("dp-eps8 (default)", _dp(8.0)),
)

# The black-box audit: record canaries, scored from the final model alone. Its broken-DP
# run is shown, not expected to be flagged: at these sizes it is not (docs/benchmarks.md).
BLACK_BOX_RUNS = (
    AuditRun("dp-eps1", _dp(1.0)),
    AuditRun("non-private", _NON_PRIVATE, reference_epsilon=1.0, expect_flagged=True),
    AuditRun("broken-dp-eps1 (noise x0.1)", _dp(1.0), noise_scale=0.1, expect_flagged=None),
    AuditRun("dp-eps8 (default)", _dp(8.0)),
)
# Each example clipped to 100 C while the noise stays sigma C. Not in BLACK_BOX_RUNS: at
# these settings the black-box audit does not flag it (docs/benchmarks.md).
BROKEN_CLIPPING = AuditRun(
    "broken-clipping-eps1 (clip x100)", _dp(1.0), clip_scale=100.0, expect_flagged=None
)
# Run-config keys each audited run sets itself: an operator's -c may not set them.
AUDIT_OWNED = ("privacy.enabled", "privacy.target-epsilon", "num-rounds", "output-dir", "seed")
# What the in-process federation does not simulate (it averages every hospital's update,
# and SecAgg+ shares among all of them): refused, not recorded as audited and ignored.
NOT_SIMULATED = (
    "server.aggregator",
    "server.fraction-train",
    "server.max-update-norm",
    "server.min-update-fraction",
    "server.trim-fraction",
    "server.byzantine-hospitals",
    "secagg.num-shares",
    "secagg.reconstruction-threshold",
    "secagg.sparse",
)

# The black-box audit's size: a canary is learnt only in the steps that sample it, so it
# needs more rounds than the white-box audit (12: a non-private run is flagged, 2: not);
# fewer reports keep a DP run near 2.5 minutes on 2 cores.
BLACK_BOX: dict[str, Any] = {
    "canaries": 1000,
    "guesses": 100,
    "rounds": 12,
    "data": {"data.max-reports": 800},
}


def quiet_coordinates(
    run: RunConfig, site: Site, state: StateDict, count: int, rng: np.random.Generator
) -> list[audit_hooks.CanaryCoordinate]:
    """``count`` coordinates that the hospital's data barely moves, for Dirac canaries.

    The smallest entries of ``|sum over batches of the batch gradient|`` at ``state``
    over the hospital's training records (ties broken at random).
    """
    local = prepare_training(state, site, run, 0.0, server_round=1, planned_rounds=1)
    model = local.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for image, report_ids, present, labels in DataLoader(local.train_set, batch_size=256):
        model.zero_grad(set_to_none=True)
        local.loss_fn(model(image, report_ids, present), labels).backward()
        for t, p in zip(total, params, strict=True):
            if p.grad is not None:
                t += p.grad
    flat = torch.cat([t.abs().reshape(-1) for t in total]).numpy()
    order = rng.permutation(flat.size)
    chosen = order[np.argsort(flat[order], kind="stable")[:count]]
    starts = np.cumsum([0] + [p.numel() for p in params])
    coordinates = []
    for i in chosen:
        param = int(np.searchsorted(starts, i, side="right") - 1)
        coordinates.append((param, int(i - starts[param])))
    return coordinates


def _guesses(
    scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int
) -> tuple[int, int]:
    """(r, v): the top ``k_plus`` guessed included, the bottom ``k_minus`` excluded."""
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > scores.size:
        raise ValueError(f"{k_plus} + {k_minus} guesses of {scores.size} canaries")
    order = np.argsort(-scores, kind="stable")
    bottom = order[scores.size - k_minus :]  # order[-0:] would be every canary
    right = int(included[order[:k_plus]].sum()) + int((~included[bottom]).sum())
    return k_plus + k_minus, right


def white_box_audit(
    audit: AuditRun,
    work: Path,
    *,
    canaries: int = 1000,
    guesses: int = 200,
    hospitals: int = 2,
    rounds: int = 2,
    seed: int = 0,
    data: dict[str, Any] | None = None,
    feature_cache: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> AuditOutcome:
    """Train one federation with gradient canaries at hospital 0 and bound its epsilon.

    ``overrides``: more run-config keys, applied before the audit's own (its epsilon,
    privacy on or off), which always win.
    """
    started = time.monotonic()
    # The secret and the coordinates' tie-break come from independent streams.
    secret_seed, choice_seed = np.random.SeedSequence(seed).spawn(2)
    included = np.random.default_rng(secret_seed).random(canaries) < 0.5  # the audit's secret
    rng = np.random.default_rng(choice_seed)
    chosen: dict[str, Any] = {}
    settings = _settings(audit, data, overrides)
    with ExitStack() as stack:
        stack.enter_context(audit_hooks.scaled_noise(audit.noise_scale))

        def on_start(run: RunConfig, sites: list[Site], state: StateDict) -> None:
            coordinates = quiet_coordinates(run, sites[0], state, canaries, rng)
            chosen.update(
                run=run,
                coordinates=coordinates,
                initial=dict(state),
                hospital=sites[0].name,
                policy=sites[0].policy,
            )
            mine = [c for c, inside in zip(coordinates, included, strict=True) if inside]
            stack.enter_context(audit_hooks.gradient_canaries(sites[0].name, mine, seed + 1))

        out = work / audit.name.split(" ")[0]
        out.mkdir(parents=True, exist_ok=True)
        history = federate(
            settings, hospitals, rounds, out, feature_cache=feature_cache, on_start=on_start
        )
    final = load_file(str(out / "global_model.safetensors"))
    names = list(chosen["initial"])
    scores = np.array(
        [
            # SGD moves against the gradient: an included canary pulls its weight down
            float(chosen["initial"][names[p]].reshape(-1)[i] - final[names[p]].reshape(-1)[i])
            for p, i in chosen["coordinates"]
        ]
    )
    return _outcome(
        audit,
        "white-box",
        scores,
        included,
        guesses,
        chosen["policy"],
        history[-1].get("epsilon", {}).get(chosen["hospital"]),
        started,
        {**settings, "hospitals": hospitals, "rounds": rounds, "seed": seed},
    )


def _settings(
    audit: AuditRun, data: dict[str, Any] | None, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """The run config of one audited run: data, then ``overrides``, then the run's own."""
    return {**(AUDIT_DATA if data is None else data), **(overrides or {}), **audit.overrides}


def _outcome(
    audit: AuditRun,
    variant: str,
    scores: np.ndarray,
    included: np.ndarray,
    guesses: int,
    policy: PrivacyPolicy,
    spent: float | None,
    started: float,
    config: dict[str, Any],
) -> AuditOutcome:
    """Guess from ``scores`` (top half "included", bottom half "excluded") and bound.

    ``policy``: the audited hospital's own, whose delta its accounted epsilon is stated
    at (the smaller of the run's and the hospital's), so the bound is taken there too.
    """
    meant_private = bool(audit.overrides.get("privacy.enabled", True))
    if meant_private != policy.enabled:
        raise RuntimeError(f"audit run {audit.name!r}: privacy came out {policy.enabled}")
    canaries = int(included.size)
    r, v = _guesses(scores, included, guesses // 2, guesses - guesses // 2)
    accounted = float(spent) if policy.enabled and spent is not None else math.inf
    bound = epsilon_lower_bound(canaries, r, v, policy.delta)
    checked = accounted if policy.enabled else audit.reference_epsilon
    cap = epsilon_cap(canaries, r, policy.delta)
    return AuditOutcome(
        run=audit.name,
        accounted_epsilon=accounted,
        checked_against=checked,
        lower_bound=bound,
        cap=cap,
        canaries=canaries,
        included=int(included.sum()),
        guesses=r,
        right=v,
        delta=policy.delta,
        flagged=bound > checked,
        power_claimed=cap > checked,
        seconds=time.monotonic() - started,
        config=config,
        variant=variant,
        expect_flagged=audit.expect_flagged,
    )


def black_box_audit(
    audit: AuditRun,
    work: Path,
    *,
    canaries: int = 1000,
    guesses: int = 200,
    hospitals: int = 2,
    rounds: int = 2,
    seed: int = 0,
    data: dict[str, Any] | None = None,
    feature_cache: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> AuditOutcome:
    """Train one federation with record canaries at hospital 0 and bound its epsilon.

    ``client/audit/record_canaries.py`` builds the canaries; the included ones join
    hospital 0's training records before its first round. Each canary is scored by
    how far training moved the global model towards its label (its loss against the
    opposite label's, less the reference tokens' drift), as anyone holding
    the model could. ``overrides``: more run-config keys, before the audit's own.
    """
    started = time.monotonic()
    # The secret, and the canaries' tokens and labels, come from independent streams.
    secret_seed, canary_seed = np.random.SeedSequence(seed).spawn(2)
    included = np.random.default_rng(secret_seed).random(canaries) < 0.5  # the audit's secret
    chosen: dict[str, Any] = {}
    settings = _settings(audit, data, overrides)

    def on_start(run: RunConfig, sites: list[Site], state: StateDict) -> None:
        made = make_record_canaries(
            sites, run, canaries, included, np.random.default_rng(canary_seed)
        )
        sites[0] = with_canaries(sites[0], made, run)  # before its first round
        chosen.update(run=run, canaries=made, site=sites[0], initial=dict(state))
        chosen.update(policy=sites[0].policy)

    out = work / f"black-box-{audit.name.split(' ')[0]}"
    out.mkdir(parents=True, exist_ok=True)
    with audit_hooks.scaled_noise(audit.noise_scale), audit_hooks.scaled_clipping(audit.clip_scale):
        history = federate(
            settings, hospitals, rounds, out, feature_cache=feature_cache, on_start=on_start
        )
    run: RunConfig = chosen["run"]
    final = load_file(str(out / "global_model.safetensors"))
    scores = canary_scores(final, chosen["initial"], chosen["site"], run, chosen["canaries"])
    return _outcome(
        audit,
        "black-box",
        scores,
        included,
        guesses,
        chosen["policy"],
        history[-1].get("epsilon", {}).get(chosen["site"].name),
        started,
        {**settings, "hospitals": hospitals, "rounds": rounds, "seed": seed},
    )


VARIANTS = ("white-box", "black-box")


def run_one_run_audit(
    work: Path,
    *,
    echo: Callable[[str], Any] = print,
    variants: Sequence[str] = VARIANTS,
    black_box: dict[str, Any] | None = None,
    after_each: Callable[[list[AuditOutcome]], Any] | None = None,
    **kwargs: Any,
) -> list[AuditOutcome]:
    """``AUDIT_RUNS`` white-box, then ``BLACK_BOX_RUNS`` black-box; prints, returns them.

    ``variants``: which of the two to run. ``black_box``: the black-box audit's own
    settings (default ``BLACK_BOX``), beside ``kwargs``. ``after_each``: called with the
    outcomes so far after each run (to write them: a later run's failure keeps them).
    """
    unknown = set(variants) - set(VARIANTS)
    if unknown or not variants:
        raise ValueError(f"audit variants: {sorted(unknown) or 'none'}; choose from {VARIANTS}")
    plans: list[tuple[str, AuditRun, dict[str, Any]]] = []
    if "white-box" in variants:
        plans += [("white-box", a, kwargs) for a in AUDIT_RUNS]
    if "black-box" in variants:
        settings = {**kwargs, **(black_box or BLACK_BOX)}
        plans += [("black-box", a, settings) for a in BLACK_BOX_RUNS]
    outcomes = []
    for i, (variant, audit, settings) in enumerate(plans, 1):
        echo(f"  [{i}/{len(plans)}] auditing {audit.name} ({variant}) ...")
        audit_fn = white_box_audit if variant == "white-box" else black_box_audit
        outcomes.append(audit_fn(audit, work, **settings))
        echo(audit_row(outcomes[-1]))
        if after_each is not None:
            after_each(outcomes)
    echo(audit_table(outcomes))
    return outcomes


def check_settings(variants: Sequence[str], overrides: dict[str, Any], hospitals: int) -> None:
    """Refuse, before any training, settings the audit cannot run with (ConfigError why)."""
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants:
        raise ConfigError(f"variant {unknown[0] if unknown else None!r}: one of {VARIANTS}")
    if hospitals < 2:
        raise ConfigError("hospitals: the audited federation needs at least 2")
    owned = sorted(set(overrides) & set(AUDIT_OWNED))
    if owned:
        raise ConfigError(f"run settings: {', '.join(owned)} is set by each audited run")
    ignored = sorted(set(overrides) & set(NOT_SIMULATED))
    if ignored:
        raise ConfigError(
            f"run settings: {', '.join(ignored)} is not simulated by the audit's federation "
            "(every hospital's update is averaged)"
        )
    run = RunConfig.from_run_config({**overrides, "num-rounds": 1})  # unknown keys: now
    refusal = black_box_refusal(run) if "black-box" in variants else None
    if refusal:
        raise ConfigError(f"the black-box audit: {refusal}; audit the white-box variant only")


def audit_simulated_federation(
    out: Path,
    *,
    echo: Callable[[str], Any] = print,
    variants: Sequence[str] = VARIANTS,
    overrides: dict[str, Any] | None = None,
    hospitals: int = 2,
) -> list[AuditOutcome]:
    """Every run of the one-run audit, side by side; ``audit.json|md|png`` go to ``out``.

    The federations train in a temporary folder (removed after), on the default
    settings with ``overrides`` (run-config keys) applied to each run before the run's
    own privacy settings. The results are written after each run. What ``fedfusion
    audit --simulated`` and ``make audit`` run. Settings are checked before any training
    (:func:`check_settings`).
    """
    check_settings(variants, overrides or {}, hospitals)
    started = time.monotonic()

    def write(outcomes: list[AuditOutcome]) -> None:
        seconds = time.monotonic() - started
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        machine = f"{os.cpu_count()} cores; load average at the end {load}; {seconds:.0f} s"
        write_audit_results(outcomes, out, machine)

    with tempfile.TemporaryDirectory(prefix="fedfusion-audit-") as tmp:
        return run_one_run_audit(
            Path(tmp),
            echo=echo,
            variants=variants,
            after_each=write,
            hospitals=hospitals,
            overrides=overrides,
            feature_cache=Path(tmp) / "features",
        )
