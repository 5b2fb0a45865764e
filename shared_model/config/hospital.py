"""One hospital's facts and privacy policy: Flower's ``node_config``, or its own file.

The hospital's policy is its own: whatever the server asks, its ``max-epsilon`` and
``delta`` cap the budget, and DP, secure aggregation and sharing its evaluation are off
the table unless its own config says otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_model.config.model import ModelConfig
from shared_model.config.schema import ConfigError, construct, load_toml, parse_table
from shared_model.config.schema import option as _opt

__all__ = ["DEVICE_SPEC", "SIM_DEVICE_ENV", "SIM_FEATURE_CACHE_ENV", "HospitalConfig"]

# Where `fedfusion simulate` tells its simulated hospitals to cache frozen features.
SIM_FEATURE_CACHE_ENV = "FEDFUSION_SIM_FEATURE_CACHE"
# Where a local simulation tells its simulated hospitals to train (their node config
# holds only their partition); a device in the node config itself wins.
SIM_DEVICE_ENV = "FEDFUSION_SIM_DEVICE"
# Every device setting's form (shared_model/devices.py resolves it against the machine).
DEVICE_SPEC = r"cpu|auto|cuda(:\d+)?"


@dataclass(frozen=True)
class HospitalConfig:
    """Facts and policy of one hospital, from Flower's ``node_config``.

    The hospital's privacy policy is its own: ``max_epsilon`` and ``delta`` cap whatever
    the server asks for, and a round that would exceed ``max_epsilon`` is declined.
    """

    hospital_id: str = _opt(
        "", "Name of this hospital in logs and ledgers (default: hospital-<partition>)."
    )
    data_manifest: str = _opt(
        "", "CSV/JSONL manifest of this hospital's records; empty: the embedded partition."
    )
    state_dir: str = _opt(
        "",
        "Directory for the privacy ledger; required with a data-manifest (default for a "
        "simulated hospital: <output-dir>/hospitals/<id>).",
    )
    ledger_backup: str = _opt(
        "",
        "Folder of the privacy ledger's backup, written at every save (better on other "
        "storage than state-dir); empty: <state-dir>/ledger-backup.",
    )
    test_fraction: float = _opt(
        0.2,
        "Share of this hospital's patients held out for testing, placed by a secret key "
        "drawn once; fixed in the privacy ledger at first use (a simulated hospital follows "
        "the run's data.test-fraction).",
        min=0.05,
        max=0.5,
    )
    privacy_unit: str = _opt(
        "auto",
        "Whom the (epsilon, delta) guarantee protects: patient (all of a patient's records "
        "together; needs a patient_id column), record (each record on its own: a patient "
        "with k records has up to k times epsilon), or auto: patient where the manifest "
        "has patient ids (on every record), record otherwise. Kept in the privacy ledger, "
        "fixed from its first release on.",
        choices=("auto", "patient", "record"),
    )
    validation_fraction: float = _opt(
        0.0,
        "Share of this hospital's patients kept apart for validation (tuning runs with "
        "data.holdout = validation), never trained on; fixed like test-fraction. 0: none, "
        "and such runs get no evaluation from this hospital.",
        min=0.0,
        max=0.4,
    )
    max_epsilon: float = _opt(
        10.0, "Hard cap on cumulative epsilon at this hospital.", min=0.0, min_exclusive=True
    )
    delta: float = _opt(
        1e-5, "Largest delta this hospital accepts.", min=0.0, max=0.1, min_exclusive=True
    )
    max_held_out_epsilon: float = _opt(
        0.0,
        "Hard cap on cumulative epsilon of the held-out patients (their statistics leave "
        "through the Gaussian mechanism); 0: max-epsilon (the parts are disjoint).",
        min=0.0,
    )
    held_out_releases: int = _opt(
        4,
        "How many evaluations of a model on the held-out patients this hospital releases "
        "over a run's planned rounds: the final model, and evenly spaced rounds before it. "
        "The held-out budget is spread over them.",
        min=1,
        max=100,
    )
    held_out_noise: bool | None = _opt(
        None,
        "Release held-out statistics through the Gaussian mechanism, charged to the "
        "held-out budget. Default: true for a hospital with its own data; false for a "
        "simulated hospital holding the public embedded data (exact pooled metrics).",
    )
    partition_id: int = _opt(-1, "Simulation: which embedded partition this node holds.", min=-1)
    num_partitions: int = _opt(
        0, "Simulation: how many partitions the embedded data is split into.", min=0
    )
    threads: int = _opt(
        0,
        "CPU threads for training; 0: all cores, or 1 per hospital in a simulation "
        "(simulated hospitals share one machine).",
        min=0,
    )
    device: str = _opt("cpu", "Where training runs: cpu, cuda, cuda:N, or auto (cuda if any).")
    secure_noise: bool = _opt(
        True,
        "Keep CSPRNG noise even if the server asks for privacy.secure-noise = false; "
        "only a hospital's own false lets that through (simulated hospitals follow the server).",
    )
    allow_non_private: bool | None = _opt(
        None,
        "Train without differential privacy when the server asks (privacy.enabled = "
        "false). Default: false for a hospital with its own data, which then declines "
        "such rounds; true for a simulated hospital holding the public embedded data.",
    )
    require_secagg: bool | None = _opt(
        None,
        "Send updates only inside secure aggregation: a plain training request is "
        "declined. Default: true for a hospital with its own data, false for a "
        "simulated hospital.",
    )
    share_evaluation: bool | None = _opt(
        None,
        "Send this hospital's own held-out metrics to the server in the clear, in runs "
        "without secure aggregation. Default: false for a hospital with its own data "
        "(the server then learns evaluation results only summed over hospitals, inside "
        "SecAgg+), true for a simulated hospital.",
    )
    secagg_members: str = _opt(
        "",
        "The federation's members file (name = public signing key of every hospital), "
        "agreed outside the coordinator; key shares go only to listed members. Default: "
        "members.toml beside secagg-signing-key (simulated hospitals: the simulation's "
        "own members folder).",
    )
    secagg_signing_key: str = _opt(
        "",
        "This hospital's private signing key for SecAgg+ (its key advertisements and "
        "survivor statements). `fedfusion hospital` uses [connection] private-key, the "
        "key the server registers; simulated hospitals make one of their own.",
    )
    secagg_min_hospitals: int = _opt(
        3,
        "Smallest SecAgg+ group this hospital takes part in (hospitals sampled, and "
        "hospitals surviving to the unmasking).",
        min=3,
    )
    secagg_min_threshold: float = _opt(
        2 / 3,
        "Smallest reconstruction threshold accepted, as a fraction of the shares "
        "(rounded up); above one half.",
        min=0.5,
        max=1.0,
        min_exclusive=True,
    )
    secagg_sparse_shares: bool | None = _opt(
        None,
        "Take part when keys are shared with only some of the hospitals sampled (a sparse "
        "neighbour graph, which SecAgg+ needs to scale), with at least max(secagg-min-shares, "
        "2 * ceil(log2 hospitals) + 1) shares. The server draws the graph, so it protects "
        "against a server that follows the protocol, not one that lies (docs/privacy.md). "
        "Default: true for a simulated hospital; for a hospital with its own data, true only "
        "if secagg-min-shares > 0.",
    )
    secagg_min_shares: int = _opt(
        0,
        "Fewest shares accepted on a sparse graph (secagg-sparse-shares), at least "
        "2 * ceil(log2 hospitals) + 1 whatever this says. Without a sparse graph the "
        "hospital shares keys with every hospital sampled, never fewer.",
        min=0,
    )
    text_model: str = _opt(
        "",
        "This hospital's copy of the run's model.text-model folder, where its path differs "
        "from the server's; empty: the run's path.",
    )
    image_weights: str = _opt(
        "",
        "This hospital's copy of the run's model.image-weights file; empty: the run's path. "
        "Frozen weights are never sent: each hospital loads its own, checked by hash.",
    )
    feature_cache: str = _opt(
        "",
        "Directory of the cached features of frozen encoders (never sent); empty: "
        "<state-dir>/feature-cache.",
    )
    warm_start: bool = _opt(
        True,
        "Deployment: start each message's ClientApp by forking a process that has already "
        "imported Flower and torch, instead of Flower's fresh process per message.",
    )

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> HospitalConfig:
        """Parse Flower's ``node_config``; ``partition-id``/``num-partitions`` come from Flower.

        ``config-file`` names a TOML file of the hospital's own, with the same keys at its
        top level or under ``[hospital]``; keys given directly in the node config win.
        Relative paths in the file are taken relative to the file.
        """
        merged = dict(node_config)
        if "config-file" in merged:
            from_file = _read_hospital_file(str(merged.pop("config-file")))
            merged = {**from_file, **merged}
        simulated = "partition-id" in merged and not merged.get("data-manifest")
        if simulated and "device" not in merged and os.environ.get(SIM_DEVICE_ENV):
            merged["device"] = os.environ[SIM_DEVICE_ENV]
        values = parse_table(cls, merged, "", "node")
        cfg = construct(cls, values, prefix="")
        if not cfg.data_manifest and cfg.partition_id < 0:
            raise ConfigError(
                "node config: give 'data-manifest' (a hospital's own data) or "
                "'partition-id' and 'num-partitions' (the embedded simulation data)"
            )
        if cfg.data_manifest and not cfg.state_dir:
            raise ConfigError(
                "node config 'state-dir': a hospital with its own data (data-manifest) needs "
                "a state directory of its own for its privacy ledger; without one the ledger "
                "would live under the server's output-dir, which the server chooses (a new "
                "output-dir would start it again from zero)"
            )
        if not cfg.data_manifest and not 0 <= cfg.partition_id < cfg.num_partitions:
            raise ConfigError(
                f"node config 'partition-id': {cfg.partition_id} is not in "
                f"[0, num-partitions={cfg.num_partitions})"
            )
        if cfg.ledger_backup and cfg.state_dir:
            backup = Path(cfg.ledger_backup).expanduser().resolve()
            if backup.is_relative_to(Path(cfg.state_dir).expanduser().resolve()):
                raise ConfigError(
                    f"hospital 'ledger-backup': {cfg.ledger_backup} lies in state-dir, where it "
                    "would be lost, rolled back or edited with the ledger; give a folder on "
                    "other storage (or leave it empty for state-dir/ledger-backup)"
                )
        if cfg.test_fraction + cfg.validation_fraction > 0.6:
            raise ConfigError(
                f"hospital 'test-fraction' {cfg.test_fraction} + 'validation-fraction' "
                f"{cfg.validation_fraction} hold out more than 0.6 of the patients"
            )
        if not re.fullmatch(DEVICE_SPEC, cfg.device):
            raise ConfigError(
                f"hospital 'device': expected cpu, cuda, cuda:N or auto, got {cfg.device!r}"
            )
        return cfg

    @property
    def simulated(self) -> bool:
        """True for a simulated hospital holding a partition of the embedded data."""
        return not self.data_manifest and self.partition_id >= 0

    @property
    def non_private_allowed(self) -> bool:
        """Whether this hospital may train without DP (allow-non-private, or its default)."""
        return self.simulated if self.allow_non_private is None else self.allow_non_private

    @property
    def secagg_required(self) -> bool:
        """Whether this hospital sends updates only inside SecAgg+."""
        return not self.simulated if self.require_secagg is None else self.require_secagg

    @property
    def sparse_shares_accepted(self) -> bool:
        """Whether this hospital shares keys with only some of the hospitals sampled."""
        if self.secagg_sparse_shares is not None:
            return self.secagg_sparse_shares
        return self.simulated or self.secagg_min_shares > 0

    @property
    def held_out_noised(self) -> bool:
        """Whether this hospital's held-out statistics leave through the Gaussian mechanism."""
        return not self.simulated if self.held_out_noise is None else self.held_out_noise

    @property
    def evaluation_shared(self) -> bool:
        """Whether this hospital sends its own held-out metrics in the clear."""
        return self.simulated if self.share_evaluation is None else self.share_evaluation

    def torch_threads(self) -> int:
        """Threads torch may use (0: leave torch's default, all cores)."""
        if self.threads:
            return self.threads
        return 1 if self.simulated else 0

    @property
    def name(self) -> str:
        """The hospital's display name."""
        return self.hospital_id or f"hospital-{self.partition_id}"

    def ledger_dir(self, output_dir: str) -> Path:
        """Directory holding this hospital's privacy ledger."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        return Path(output_dir).expanduser() / "hospitals" / self.name

    def ledger_backup_file(self, state_dir: Path) -> Path:
        """Where the backup of the ledger in ``state_dir`` is kept (named after the hospital)."""
        folder = Path(self.ledger_backup).expanduser() if self.ledger_backup else None
        return (folder or Path(state_dir) / "ledger-backup") / f"{self.name}.privacy_ledger.json"

    def cache_dir(self, output_dir: str) -> Path:
        """Directory of this hospital's frozen-feature cache.

        Simulated hospitals share one machine, and `fedfusion simulate` points them all
        at one cache (``FEDFUSION_SIM_FEATURE_CACHE``) that later runs reuse.
        """
        if self.feature_cache:
            return Path(self.feature_cache).expanduser()
        shared = os.environ.get(SIM_FEATURE_CACHE_ENV, "")
        if self.simulated and shared:
            return Path(shared)
        return self.ledger_dir(output_dir) / "feature-cache"

    def local_model(self, model: ModelConfig) -> ModelConfig:
        """The run's model settings with this hospital's own paths to pretrained files."""
        return dataclasses.replace(
            model,
            text_model=self.text_model or model.text_model,
            image_weights=self.image_weights or model.image_weights,
        )


def _read_hospital_file(path_text: str) -> dict[str, Any]:
    path = Path(path_text).expanduser().resolve()
    data = load_toml(path, "node config 'config-file'")
    table = data.get("hospital", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [hospital] must be a table")
    # relative to the file, not the cwd
    for key in (
        "data-manifest",
        "state-dir",
        "text-model",
        "image-weights",
        "feature-cache",
        "secagg-members",
        "secagg-signing-key",
        "ledger-backup",
    ):
        if isinstance(table.get(key), str) and table[key] and not Path(table[key]).is_absolute():
            table[key] = str(path.parent / table[key])
    return table
