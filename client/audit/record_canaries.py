"""Record canaries for the black-box one-run audit: training records no real one resembles.

Each canary is a record of the small model's input space that the embedded data never
has: a report made of one hashed token bucket, repeated, that no real report (train or
held out, at any hospital) uses, no radiograph (its ``present`` flags say so, as for a
record missing its image) and a random multi-hot label. Each gets its own bucket, so a
model can learn a canary only from that canary. The included ones (the audit's secret)
join hospital 0's training records before its first round, so they pass through
everything a record does: the hospital's released count N̂, its Poisson sampler,
per-example clipping, noise and the accountant.

The score of a canary after training is how far training moved the global model's
logits for its token towards its own label (its loss against the opposite label's),
less the drift shared by reference tokens that no record and no canary uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from client.app.local_training import model_from
from client.app.site import Site
from shared_model.config import RunConfig
from shared_model.data import FusionTensors
from shared_model.datasets import HospitalSplit

__all__ = [
    "RecordCanaries",
    "black_box_refusal",
    "canary_records",
    "canary_scores",
    "make_record_canaries",
    "unused_buckets",
    "with_canaries",
]

StateDict = dict[str, torch.Tensor]
_CLS_ID, _SEP_ID, _FIRST_BUCKET = 1, 2, 4  # shared_model/text.py's special ids
CANARY_PATIENT = "audit-canary-"  # each canary is its own patient


@dataclass(frozen=True)
class RecordCanaries:
    """m canary records: their tokens, labels and which are included (the secret)."""

    tokens: np.ndarray  # (m,) one unused bucket per canary
    references: np.ndarray  # buckets neither the records nor the canaries use
    labels: torch.Tensor  # (m, K) random multi-hot
    included: np.ndarray  # (m,) bool: the audit's secret

    def __len__(self) -> int:
        return int(self.tokens.size)


def black_box_refusal(run: RunConfig) -> str | None:
    """Why record canaries cannot be made for ``run``'s model, or None when they can."""
    if run.model.text_encoder == "pretrained":
        return "record canaries need the hashed-bucket tokenizer (model.text-encoder)"
    if run.model.encoder_mode != "full":
        return "record canaries need raw records (model.encoder-mode = full)"
    return None


def unused_buckets(sites: list[Site], num_buckets: int) -> np.ndarray:
    """The token buckets (past the special ids) that no record of any hospital uses."""
    used = torch.zeros(num_buckets, dtype=torch.bool)
    for site in sites:
        for part in (site.data.train, site.data.test):
            if not isinstance(part, FusionTensors):
                raise TypeError("record canaries need raw records (model.encoder-mode = full)")
            used[part.report_ids.reshape(-1)] = True
    used[:_FIRST_BUCKET] = True
    return np.flatnonzero(~used.numpy())


def make_record_canaries(
    sites: list[Site],
    run: RunConfig,
    count: int,
    included: np.ndarray,
    rng: np.random.Generator,
    *,
    references: int = 8,
) -> RecordCanaries:
    """``count`` canaries over buckets no record uses; ``included`` is the audit's secret.

    ``rng`` (not the secret's stream) picks the buckets and the labels; each label is
    present with probability 1/2.
    """
    refusal = black_box_refusal(run)
    if refusal is not None:
        raise ValueError(refusal)
    free = unused_buckets(sites, run.model.text_vocab_buckets)
    if count + references > free.size:
        raise ValueError(f"{count} canaries + {references} references > {free.size} free buckets")
    chosen = rng.permutation(free)[: count + references]
    labels = torch.from_numpy(rng.random((count, len(run.model.labels))) < 0.5).float()
    return RecordCanaries(
        tokens=chosen[:count], references=chosen[count:], labels=labels, included=included
    )


def canary_records(
    tokens: np.ndarray, labels: torch.Tensor, run: RunConfig, first: int = 0
) -> FusionTensors:
    """Records ``[CLS] token ... token [SEP]`` (full length), no image, ``labels``.

    The token fills the report, so the pooled report is the token's alone. Patients are
    numbered from ``first``.
    """
    n, size, length = int(tokens.size), run.model.image_size, run.model.max_report_tokens
    ids = torch.from_numpy(tokens.astype(np.int64)).unsqueeze(1).repeat(1, length)
    ids[:, 0], ids[:, -1] = _CLS_ID, _SEP_ID
    present = torch.tensor([[0.0, 1.0]]).repeat(n, 1)  # image missing, report present
    return FusionTensors(
        torch.zeros(n, 1, size, size),
        ids,
        present,
        labels.float(),
        [f"{CANARY_PATIENT}{first + i}" for i in range(n)],
    )


def with_canaries(site: Site, canaries: RecordCanaries, run: RunConfig) -> Site:
    """``site`` whose training records also hold the included canaries (at random places)."""
    which = np.flatnonzero(canaries.included)
    added = canary_records(canaries.tokens[which], canaries.labels[which], run)
    train = site.data.train
    if not isinstance(train, FusionTensors):
        raise TypeError("record canaries need raw records (model.encoder-mode = full)")
    both = FusionTensors(
        torch.cat([train.images, added.images]),
        torch.cat([train.report_ids, added.report_ids]),
        torch.cat([train.present, added.present]),
        torch.cat([train.labels, added.labels]),
        None if train.patient_ids is None else [*train.patient_ids, *(added.patient_ids or [])],
    )
    # shuffled with a fixed permutation: the Poisson sampler ignores order anyway
    order = np.random.default_rng(len(both)).permutation(len(both))
    split = HospitalSplit(train=both.subset(order), test=site.data.test)
    return dataclasses.replace(site, data=split)


@torch.no_grad()
def _logit_change(
    final: torch.nn.Module, initial: torch.nn.Module, records: FusionTensors
) -> torch.Tensor:
    """How training moved each record's logits, (N, K)."""
    inputs = (records.images, records.report_ids, records.present)
    return final(*inputs) - initial(*inputs)


def canary_scores(
    final: StateDict, initial: StateDict, site: Site, run: RunConfig, canaries: RecordCanaries
) -> np.ndarray:
    """Per canary: how far training moved its token's logits towards its own label.

    ``sum_k (2 y_k - 1) (dz_k(token) - mean over references dz_k(reference))``, where
    ``dz`` is the final minus the initial model's logit: the loss of the canary's label
    against that of the opposite label (for the binary cross-entropy the two differ by
    exactly this), less the drift every unseen token shares. The initial model is public
    (the run's seed builds it), so the score needs the final model and nothing of any
    hospital. High: guess "included".
    """
    after = model_from(final, site, run).cpu().eval()
    before = model_from(initial, site, run).cpu().eval()
    own = _logit_change(after, before, canary_records(canaries.tokens, canaries.labels, run))
    shared = torch.stack(
        [
            _logit_change(after, before, canary_records(np.array([t]), canaries.labels[:1], run))[0]
            for t in canaries.references
        ]
    ).mean(0)
    sign = 2 * canaries.labels - 1
    return (sign * (own - shared)).sum(1).numpy()
