"""Record canaries: inputs no record has, included only by the secret, seen by the accountant."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch

from client.app import private_round
from client.app.site import Site
from client.audit.inprocess import federate, site_list
from client.audit.record_canaries import (
    CANARY_PATIENT,
    canary_records,
    canary_scores,
    make_record_canaries,
    unused_buckets,
    with_canaries,
)
from client.dp.planning import plan_round
from shared_model.config import RunConfig
from shared_model.config.hospital import SIM_FEATURE_CACHE_ENV
from shared_model.weights import initial_model, shared_state

SMALL = {"data.max-reports": 200, "privacy.target-epsilon": 1.0}


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunConfig, list[Site]]:
    out = tmp_path_factory.mktemp("canaries")
    run = RunConfig.from_run_config({**SMALL, "num-rounds": 1, "output-dir": str(out / "run")})
    with mock.patch.dict(os.environ, {SIM_FEATURE_CACHE_ENV: str(out / "features")}):
        return run, site_list(run, 2)


def _canaries(run: RunConfig, sites: list[Site], count: int = 50, seed: int = 0) -> Any:
    included = np.random.default_rng(seed).random(count) < 0.5
    return make_record_canaries(sites, run, count, included, np.random.default_rng(seed + 1))


def test_canary_tokens_are_used_by_no_record_of_any_hospital(opened) -> None:
    run, sites = opened
    canaries = _canaries(run, sites)
    used = set()
    for site in sites:
        for part in (site.data.train, site.data.test):
            used |= set(part.report_ids.unique().tolist())
    ours = {*canaries.tokens.tolist(), *canaries.references.tolist()}
    assert len(ours) == len(canaries) + canaries.references.size  # one bucket each
    assert not ours & used and min(ours) >= 4  # no record's bucket, no special id
    assert set(unused_buckets(sites, run.model.text_vocab_buckets).tolist()) >= ours
    records = canary_records(canaries.tokens, canaries.labels, run)
    assert set(records.report_ids[:, 1:-1].unique().tolist()) == set(canaries.tokens.tolist())
    assert torch.equal(records.present, torch.tensor([[0.0, 1.0]]).expand(len(canaries), 2))


def test_only_the_secret_decides_which_canaries_join_the_training_records(opened) -> None:
    run, sites = opened
    canaries = _canaries(run, sites)
    before = sites[0].data.train
    after = with_canaries(sites[0], canaries, run)
    train = after.data.train
    assert len(train) == len(before) + int(canaries.included.sum())
    assert after.data.test is sites[0].data.test  # the held-out part is untouched
    joined = set(train.report_ids[:, 1].tolist()) & set(canaries.tokens.tolist())
    assert joined == set(canaries.tokens[canaries.included].tolist())
    assert sum(p.startswith(CANARY_PATIENT) for p in train.patient_ids or []) == len(joined)
    # the tokens and labels come from their own stream: another secret, the same canaries
    other = make_record_canaries(sites, run, 50, ~canaries.included, np.random.default_rng(1))
    assert np.array_equal(other.tokens, canaries.tokens)
    assert torch.equal(other.labels, canaries.labels)


def test_the_hospitals_plan_and_accountant_count_the_included_canaries(
    opened, tmp_path: Path
) -> None:
    run, sites = opened
    canaries = _canaries(run, sites)
    seen: list[int] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["num_examples"])
        return plan_round(*args, **kwargs)

    sizes: list[int] = []

    def on_start(run: RunConfig, sites: list[Site], state: Any) -> None:
        sizes.extend([len(sites[0].data.train), len(sites[1].data.train)])
        sites[0] = with_canaries(sites[0], _canaries(run, sites), run)

    with mock.patch.object(private_round, "plan_round", side_effect=spy):
        federate(SMALL, 2, 1, tmp_path / "run", on_start=on_start)
    assert seen == [sizes[0] + int(canaries.included.sum()), sizes[1]]


def test_an_untrained_model_scores_every_canary_zero(opened) -> None:
    run, sites = opened
    canaries = _canaries(run, sites)
    state = shared_state(initial_model(run.model, run.seed))
    scores = canary_scores(state, state, sites[0], run, canaries)
    assert scores.shape == (len(canaries),) and np.allclose(scores, 0.0)
