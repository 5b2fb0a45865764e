"""One hospital: its own settings, privacy policy, ledger location and data.

The hospital's facts come from Flower's ``node_config`` (``--node-config`` on its
SuperNode, or the simulation's partition). Its privacy policy caps what the server asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from client.privacy import LedgerEntry, PrivacyLedger, PrivacyPolicy, effective_policy
from shared_model.config import DataConfig, HospitalConfig, ModelConfig, RunConfig
from shared_model.data import load_manifest, split_train_test
from shared_model.datasets import HospitalSplit, embedded_hospital
from shared_model.text import ReportTokenizer

__all__ = ["Site", "hospital_data", "open_site"]


@dataclass(frozen=True)
class Site:
    """Everything one hospital brings to a round."""

    hospital: HospitalConfig
    policy: PrivacyPolicy
    state_dir: Path
    data: HospitalSplit

    @property
    def name(self) -> str:
        """The hospital's display name."""
        return self.hospital.name

    def open_ledger(self, seen: Sequence[LedgerEntry] = ()) -> PrivacyLedger:
        """The hospital's privacy ledger (new and empty on its first round).

        ``seen``: the history this process already recorded; a ledger without it is refused.
        """
        return PrivacyLedger.open(self.state_dir, self.name, self.policy, seen)


def open_site(hospital: HospitalConfig, run: RunConfig) -> Site:
    """Resolve a hospital's policy, state directory and data for this run."""
    return Site(
        hospital=hospital,
        policy=effective_policy(run.privacy, hospital),
        state_dir=hospital.ledger_dir(run.output_dir),
        data=hospital_data(hospital, run.model, run.data, run.seed),
    )


@lru_cache(maxsize=4)
def hospital_data(
    hospital: HospitalConfig, model: ModelConfig, data: DataConfig, seed: int
) -> HospitalSplit:
    """The hospital's train/test records, decoded once per process and cached."""
    if hospital.data_manifest:
        tokenizer = ReportTokenizer(model.text_vocab_buckets, model.max_report_tokens)
        records, _report = load_manifest(
            hospital.data_manifest, model.labels, tokenizer, model.image_size
        )
        train, test = split_train_test(records, data.test_fraction, seed)
        return HospitalSplit(train=train, test=test)
    return embedded_hospital(hospital.partition_id, hospital.num_partitions, model, data, seed)
