"""One hospital: its own settings, privacy policy, ledger location and data.

The hospital's facts come from Flower's ``node_config`` (``--node-config`` on its
SuperNode, or the simulation's partition). Its privacy policy caps what the server asks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from client.app.features import FeatureCache, frozen_feature_split
from client.dp.hospital_split import hospital_split_spec
from client.dp.ledger import RECORD, LedgerEntry, LedgerError, PrivacyLedger, ledger_lock
from client.dp.ledger_custody import open_ledger
from client.dp.patients import fixed_privacy_unit, wanted_privacy_unit
from client.dp.policy import PrivacyPolicy, effective_policy
from shared_model.config import DataConfig, HospitalConfig, ModelConfig, RunConfig
from shared_model.data import FusionTensors, load_manifest
from shared_model.datasets import HospitalSplit, embedded_records
from shared_model.devices import resolve_device
from shared_model.images import decode_image
from shared_model.manifest import DataLimits
from shared_model.split import SplitSpec, split_records
from shared_model.text import tokenizer_for

__all__ = [
    "DecodedImages",
    "Site",
    "hospital_data",
    "hospital_records",
    "open_site",
]

log = logging.getLogger("fedfusion.hospital")


@dataclass(frozen=True)
class Site:
    """Everything one hospital brings to a round."""

    hospital: HospitalConfig
    policy: PrivacyPolicy
    state_dir: Path
    data: HospitalSplit  # as training reads it: cached features where encoders are frozen
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model: ModelConfig = field(default_factory=ModelConfig)  # with this hospital's own paths
    unit: str = RECORD  # whom epsilon protects: patient or record (client/dp/patients.py)

    @property
    def name(self) -> str:
        """The hospital's display name."""
        return self.hospital.name

    def open_ledger(self, seen: Sequence[LedgerEntry] = ()) -> PrivacyLedger:
        """The hospital's privacy ledger, checked against its backup.

        ``seen``: the history this process already recorded; a ledger without it is
        refused. A simulated hospital starts an empty one on its first round; one with its
        own data needs ``fedfusion ledger init`` first (client/dp/ledger_custody.py).
        """
        backup = self.hospital.ledger_backup_file(self.state_dir)
        allow_new = self.hospital.simulated
        ledger = open_ledger(self.state_dir, self.name, self.policy, seen, backup, allow_new)
        if fixed_privacy_unit(ledger, self.unit) != self.unit:
            raise LedgerError(f"privacy ledger {ledger.path} changed its privacy unit")
        return ledger


def open_site(hospital: HospitalConfig, run: RunConfig) -> Site:
    """Resolve a hospital's policy, state directory, device and data for this run.

    The split is the hospital's (:func:`hospital_split_spec`), whatever the run asks.
    """
    device = resolve_device(hospital.device, "hospital.device")  # no GPU: the CPU, warned
    if hospital.torch_threads():
        torch.set_num_threads(hospital.torch_threads())
    model = hospital.local_model(run.model)
    policy = effective_policy(run.privacy, hospital)
    state_dir = hospital.ledger_dir(run.output_dir)
    spec = hospital_split_spec(hospital, run, state_dir, policy)
    records = hospital_data(hospital, model, run.data, run.seed, spec)
    every = hospital_records(hospital, model, run.data, run.seed).patient_ids  # cached
    unit = wanted_privacy_unit(hospital.privacy_unit, every, hospital.name)
    backup = hospital.ledger_backup_file(state_dir)
    with ledger_lock(state_dir):  # fixed at first use, like the split
        ledger = open_ledger(state_dir, hospital.name, policy, (), backup, hospital.simulated)
        unit = fixed_privacy_unit(ledger, unit)
    cache = hospital.cache_dir(run.output_dir)
    return Site(
        hospital=hospital,
        policy=policy,
        state_dir=state_dir,
        data=frozen_feature_split(records, model, run.seed, cache, device),
        device=device,
        model=model,
        unit=unit,
    )


class DecodedImages:
    """A manifest's decoded images, kept in the hospital's state directory.

    Flower starts a ClientApp process for every message (two a round, four under
    SecAgg+), and each would otherwise decode every image of the manifest again:
    thousands of DICOMs. An image is keyed by its file's path, size and modification
    time and the decode size, so a changed file is decoded again. Decoded images are
    patient data: they stay in the state directory, like the feature cache, and are
    stored and read as plain tensors (``torch.load(weights_only=True)``).
    """

    def __init__(self, root: Path, size: int) -> None:
        self.store = FeatureCache(root, f"images-{size}")
        self.store.refresh()
        self.new_keys: list[str] = []
        self.new: list[torch.Tensor] = []

    def decode(self, path: Path, size: int, max_pixels: int) -> torch.Tensor:
        """The decoded image: kept, or decoded now (and kept at :meth:`flush`).

        The pixel limit is part of the key: an image kept under a higher limit is
        checked again when the limit is lowered.
        """
        try:
            info = path.stat()
        except OSError:  # decode_image says what is wrong with the file
            return decode_image(path, size, max_pixels)
        identity = f"{path}\0{info.st_size}\0{info.st_mtime_ns}\0{size}\0{max_pixels}"
        key = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        kept = self.store.get(key)
        if kept is not None:
            return kept
        image = decode_image(path, size, max_pixels)
        self.new_keys.append(key)
        self.new.append(image)
        return image

    def flush(self) -> None:
        """Keep the images decoded since the last flush."""
        if self.new_keys:
            self.store.put(self.new_keys, torch.stack(self.new))
            log.info("image cache: %d images decoded, kept in %s", len(self.new), self.store.dir)
            self.new_keys, self.new = [], []


# A deployed hospital's process serves one hospital. A simulation worker serves many in
# turn, every round: their records are disjoint parts of one dataset, so keeping them all
# costs at most that dataset's size per worker.
@lru_cache(maxsize=256)
def hospital_data(
    hospital: HospitalConfig, model: ModelConfig, data: DataConfig, seed: int, spec: SplitSpec
) -> HospitalSplit:
    """The hospital's training records and the held-out part the run evaluates on.

    Split as ``spec`` says; ``data.holdout`` picks the held-out part. Decoded once per
    process and cached.
    """
    parts = split_records(hospital_records(hospital, model, data, seed), spec)
    return HospitalSplit(train=parts.train, test=parts.held_out(data.holdout))


@lru_cache(maxsize=256)
def hospital_records(
    hospital: HospitalConfig, model: ModelConfig, data: DataConfig, seed: int
) -> FusionTensors:
    """All of the hospital's records, decoded once per process and cached.

    A hospital with its own data also keeps the decoded images in its state directory
    (:class:`DecodedImages`), for the next message's process.
    """
    if hospital.data_manifest:
        state = Path(hospital.state_dir).expanduser()  # required with a manifest
        images = DecodedImages(state / "image-cache", model.image_size)
        records, _report = load_manifest(
            hospital.data_manifest,
            model.labels,
            tokenizer_for(model),
            model.image_size,
            decode=images.decode,
            limits=DataLimits(data.max_image_pixels, data.max_report_chars),
        )
        images.flush()
        if records.patient_ids and all(p.startswith("record:") for p in records.patient_ids):
            log.warning(
                "%s: the manifest has no patient_id: each record is placed in the split on "
                "its own, so one patient's records may be both trained on and held out",
                hospital.name,
            )
        return records
    return embedded_records(hospital.partition_id, hospital.num_partitions, model, data, seed)
