"""The run's settings: what the server asks of every hospital, and how it runs the rounds.

A run key is ``<section>.<field-with-dashes>`` (``privacy.target-epsilon``) or, for the
top-level fields, just the field (``num-rounds``). Flower hands them to the apps as
``context.run_config``; :meth:`RunConfig.from_run_config` parses them once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from shared_model.config.model import ModelConfig
from shared_model.config.schema import (
    ConfigError,
    coerce,
    construct,
    unknown_key_message,
)
from shared_model.config.schema import option as _opt

__all__ = [
    "ACCOUNTANTS",
    "AGGREGATORS",
    "GRAD_SAMPLE_MODES",
    "HOLDOUTS",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "STRATEGIES",
    "TEXT_SOURCES",
    "DataConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "ServerConfig",
    "TrainConfig",
    "describe_run_config",
]

ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "bk", "hooks", "ghost", "functorch", "ew")
STRATEGIES = ("fedavg", "fedprox")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
# Which text of an embedded report the model reads (data.text-source).
TEXT_SOURCES = ("indication", "report")
HOLDOUTS = ("test", "validation")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each hospital, per round."""

    local_epochs: int = _opt(2, "Passes over the hospital's training split per round.", min=1)
    batch_size: int = _opt(
        256,
        "Expected batch size; with Poisson sampling the rate is batch/N. DP noise is "
        "added per step, so a larger batch carries less of it per record.",
        min=1,
    )
    max_physical_batch_size: int = _opt(
        0,
        "Split each batch into chunks of at most this many examples, one step per batch "
        "(bounds memory for large batches; 0: never split).",
        min=0,
    )
    optimizer: str = _opt(
        "sgd",
        "Local optimizer. SGD with momentum is the default: measured side by side on the "
        "default run it reached a higher macro AUROC under DP noise than AdamW "
        "(docs/benchmarks.md).",
        choices=OPTIMIZERS,
    )
    learning_rate: float = _opt(
        0.2,
        "Peak learning rate (lr-schedule shapes it over the rounds).",
        min=0.0,
        min_exclusive=True,
    )
    lr_schedule: str = _opt(
        "cosine",
        "Learning rate over the planned rounds: cosine (warm-up-rounds of linear warm-up, "
        "then a cosine decay towards 0 at the last round) or constant. The model trained "
        "from scratch at a constant 0.2 ended at chance for some seeds (docs/models.md).",
        choices=LR_SCHEDULES,
    )
    warmup_rounds: int = _opt(
        2,
        "Rounds of linear warm-up at the start of lr-schedule = cosine: round r of the "
        "first n trains at r/(n+1) of the rate.",
        min=0,
    )
    momentum: float = _opt(0.9, "SGD momentum (optimizer sgd).", min=0.0, max=0.99)
    weight_decay: float = _opt(0.0, "Weight decay.", min=0.0)
    modality_dropout: float = _opt(
        0.1,
        "Chance per example of hiding one modality in training, for robustness to a "
        "missing image or report.",
        min=0.0,
        max=0.5,
    )
    pos_weight: str = _opt(
        "public-prior",
        "Positive-class weights of the BCE loss: 'public-prior' (from the public label "
        "prevalence of the Indiana University corpus, never from a hospital's own counts, "
        "which would leak outside the DP accounting), 'none', one number, or one number "
        "per label, comma-separated.",
    )
    alignment_weight: float = _opt(
        0.0,
        "Weight of a per-example image-report alignment loss, 1 - cos(image, report) of "
        "the pooled embeddings when both are present; 0: off. Per example, unlike an "
        "in-batch contrastive loss, so DP-SGD's per-record clipping stays valid.",
        min=0.0,
    )


@dataclass(frozen=True)
class PrivacyConfig:
    """What the server asks for. Each hospital's own policy caps epsilon and delta."""

    enabled: bool = _opt(True, "Train with Opacus DP-SGD. Off only for experiments.")
    target_epsilon: float = _opt(
        8.0,
        "Epsilon to spend over all planned rounds (capped by each hospital's max-epsilon).",
        min=0.0,
        min_exclusive=True,
    )
    delta: float = _opt(
        1e-5, "Delta of the (epsilon, delta) guarantee.", min=0.0, max=0.1, min_exclusive=True
    )
    max_grad_norm: float = _opt(
        1.0, "Per-example gradient clipping norm C.", min=0.0, min_exclusive=True
    )
    accountant: str = _opt("rdp", "Privacy accountant.", choices=ACCOUNTANTS)
    grad_sample_mode: str = _opt(
        "auto",
        "How per-example gradients are clipped: bk (book-keeping, one backward pass), or "
        "an Opacus mode (hooks, ghost, functorch, ew); auto: bk, or hooks for a model "
        "with a layer bk cannot clip.",
        choices=GRAD_SAMPLE_MODES,
    )
    secure_noise: bool = _opt(
        True,
        "DP noise and Poisson sampling from the OS's cryptographic RNG, with Opacus's "
        "floating-point attack mitigation. Off only for tests and experiments (warns).",
    )


@dataclass(frozen=True)
class DataConfig:
    """The embedded default data, used in simulation, and limits on a hospital's own data."""

    text_source: str = _opt(
        "indication",
        "The embedded data's text input: indication (the patient's history and the "
        "referring physician's question, written before the image was read) or report "
        "(the radiologist's FINDINGS and IMPRESSION, which the labels were indexed from: "
        "a report labeller, not a diagnostic task).",
        choices=TEXT_SOURCES,
    )
    max_reports: int = _opt(0, "Use at most this many reports (0: all 3,860 labelled).", min=0)
    min_studies: int = _opt(
        1,
        "Embedded data: each report is one patient with between min-studies and "
        "max-studies studies (drawn per patient), each study a phantom drawn anew from the "
        "report's labels, with the same text: data for privacy per patient.",
        min=1,
        max=20,
    )
    max_studies: int = _opt(
        1, "Embedded data: the most studies a patient has (see min-studies).", min=1, max=20
    )
    dirichlet_alpha: float = _opt(
        1.0, "Label skew across hospitals; smaller is more non-IID.", min=0.0, min_exclusive=True
    )
    test_fraction: float = _opt(
        0.2,
        "Share of each simulated hospital's patients held out for evaluation. A hospital "
        "with its own data keeps its own split (its test-fraction, fixed in its ledger).",
        min=0.05,
        max=0.5,
    )
    holdout: str = _opt(
        "test",
        "What the run evaluates on: test (each hospital's held-out test part) or "
        "validation (a part never trained on; the test part is then neither trained nor "
        "evaluated on: for tuning). A simulated hospital carves one the size of its test "
        "part; a hospital with its own data uses its validation-fraction, or declines.",
        choices=HOLDOUTS,
    )
    max_image_pixels: int = _opt(
        100_000_000,
        "Refuse an image with more pixels (read from its header, before decoding it): a "
        "guard against decompression bombs.",
        min=1,
    )
    max_report_chars: int = _opt(
        100_000, "Refuse a report longer than this many characters.", min=1
    )


@dataclass(frozen=True)
class ServerConfig:
    """Round logic at the coordinator."""

    strategy: str = _opt("fedavg", "Aggregation strategy.", choices=STRATEGIES)
    proximal_mu: float = _opt(0.0, "FedProx proximal weight (strategy fedprox).", min=0.0)
    momentum: float = _opt(
        0.5,
        "Server momentum (FedAvgM): the global model moves by learning-rate times a running "
        "sum of the averaged updates, each round's earlier sum scaled by this. 0: plain "
        "averaging. It acts on the aggregate alone, so no hospital spends privacy on it.",
        min=0.0,
        max=0.99,
    )
    learning_rate: float = _opt(
        1.0,
        "Server learning rate: the global model moves by this times the (momentum) "
        "averaged update; 1 with momentum 0 is FedAvg.",
        min=0.0,
        max=10.0,
        min_exclusive=True,
    )
    fraction_train: float = _opt(
        1.0, "Share of hospitals sampled to train per round.", min=0.0, max=1.0, min_exclusive=True
    )
    fraction_evaluate: float = _opt(
        1.0, "Share of hospitals sampled to evaluate per round.", min=0.0, max=1.0
    )
    min_hospitals: int = _opt(2, "Hospitals that must be connected before a round starts.", min=1)
    round_timeout: float = _opt(600.0, "Seconds to wait for replies in one round stage.", min=1.0)
    wait_for_hospitals_timeout: float = _opt(
        120.0,
        "Seconds to wait for min-hospitals (with SecAgg+ at least 3) to be connected, at the "
        "start and before each round, before failing the run (a later run resumes it).",
        min=1.0,
    )
    min_update_fraction: float = _opt(
        0.66,
        "Without SecAgg+, a round needs updates from at least this share of its sampled "
        "hospitals (the rest may fail, not answer or be refused); otherwise "
        "server.short-round decides. With SecAgg+, the reconstruction threshold decides.",
        min=0.0,
        max=1.0,
    )
    short_round: str = _opt(
        "skip",
        "A round with too few updates: 'skip' it (the model stays as it was, the run goes "
        "on), 'retry' it (up to server.round-retries times, then fail) or 'fail' the run.",
        choices=("skip", "retry", "fail"),
    )
    round_retries: int = _opt(
        2,
        "With short-round = 'retry': how many times one round is tried again before the "
        "run fails. Hospitals count every attempt they trained in full.",
        min=1,
        max=100,
    )
    aggregator: str = _opt(
        "mean",
        "How updates are combined (SecAgg+ off only, as the server must see each): 'mean' "
        "(weighted FedAvg), or Flower's robust 'median', 'trimmed-mean' or 'krum'.",
        choices=AGGREGATORS,
    )
    trim_fraction: float = _opt(
        0.2,
        "trimmed-mean: share of the updates cut at each end, value by value.",
        min=0.0,
        max=0.49,
    )
    byzantine_hospitals: int = _opt(
        1, "krum: malicious hospitals to tolerate (needs more than 2x + 2 updates).", min=0
    )
    max_update_norm: float = _opt(
        10000.0,
        "SecAgg+ off: refuse an update (new minus global weights) with a larger L2 norm; "
        "0: no limit.",
        min=0.0,
    )


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+): the server learns only the sum of updates."""

    enabled: bool = _opt(
        True, "Send updates only inside SecAgg+ (masked; the server sees only the sum)."
    )
    num_shares: int = _opt(
        0,
        "Shares of each hospital's key (odd below the hospitals sampled); 0: every "
        "hospital sampled, or with secagg.sparse about 2 * ceil(log2 n) + 1 of them.",
        min=0,
    )
    sparse: bool = _opt(
        False,
        "With num-shares = 0, share each key with about 2 * ceil(log2 n) + 1 of the n "
        "hospitals sampled (all of them up to 7) on a random neighbour graph, so a round's "
        "key work grows with n log n, not n squared. The server draws the graph, so it "
        "protects less against a lying server: hospitals with their own data take part "
        "only if their file allows it (secagg-sparse-shares; docs/privacy.md).",
    )
    reconstruction_threshold: int = _opt(
        0,
        "Shares needed to unmask a dropped hospital; 0: max(2, ceil(2/3 of the shares)). "
        "Higher resists more colluding hospitals, lower tolerates more dropouts; it must "
        "be above half the shares (hospitals refuse less).",
        min=0,
    )
    clipping_range: float = _opt(
        0.5,
        "Weighted update values are clipped to +-this before quantization; hospitals warn "
        "when theirs would clip.",
        min=0.0,
        min_exclusive=True,
    )
    max_weight: float = _opt(
        10000.0,
        "Bound on a hospital's released training-set size (its weight in the mean), with "
        "SecAgg+ or without; larger costs SecAgg+ precision.",
        min=1.0,
    )
    stage_timeout: float = _opt(
        600.0,
        "Seconds to wait for replies in each SecAgg+ stage; local training runs inside one, "
        "so this bounds a hospital's round.",
        min=1.0,
    )

    @staticmethod
    def sparse_shares(hospitals: int) -> int:
        """Shares per key with ``hospitals`` sampled: 2 * ceil(log2 n) + 1, at most n.

        The degree SecAgg+ (Bell et al. 2020) needs to stay private and tolerate
        dropouts with high probability on a random graph; it is odd, as Flower's
        neighbour graph needs below n, and at least 3. It is also the fewest shares a
        hospital that allows a sparse graph accepts (``client/app/secagg_guard.py``).
        """
        return min(max(hospitals, 3), 2 * math.ceil(math.log2(max(hospitals, 2))) + 1)

    def resolve(self, hospitals: int) -> tuple[int, int]:
        """(num_shares, reconstruction_threshold) for ``hospitals``, or a ConfigError why not."""
        if hospitals < 3:
            raise ConfigError(
                f"secagg.enabled: SecAgg+ needs at least 3 hospitals per round, got {hospitals} "
                "(use 3 or more, or run without it: secagg.enabled=false)"
            )
        shares = self.num_shares or (self.sparse_shares(hospitals) if self.sparse else hospitals)
        if shares > hospitals:
            raise ConfigError(f"secagg.num-shares: {shares} shares for only {hospitals} hospitals")
        if shares < 3:
            raise ConfigError(f"secagg.num-shares: must be at least 3, got {shares}")
        if shares < hospitals and shares % 2 == 0:
            # Flower 1.42 tells the hospitals to make `shares` key shares, then builds the
            # neighbour graph with one more: every hospital fails with an IndexError.
            raise ConfigError(
                f"secagg.num-shares: {shares} is even; below the number of hospitals "
                f"({hospitals}) SecAgg+ needs an odd number of shares (use {shares + 1})"
            )
        threshold = self.reconstruction_threshold or max(2, -(-2 * shares // 3))
        if threshold >= shares:
            raise ConfigError(
                f"secagg.reconstruction-threshold: {threshold} must be below num-shares "
                f"{shares} (otherwise no hospital may drop out and keys leak nothing useful)"
            )
        if threshold < 2:
            raise ConfigError(
                f"secagg.reconstruction-threshold: {threshold} would let a single neighbour "
                "unmask a hospital; use at least 2"
            )
        if 2 * threshold <= shares:
            raise ConfigError(
                f"secagg.reconstruction-threshold: {threshold} is not above half of the "
                f"{shares} shares, so a server could gather both halves of one hospital's "
                f"secrets; hospitals refuse it (use at least {shares // 2 + 1})"
            )
        return shares, threshold


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, as the server and every hospital see it."""

    SECTIONS: ClassVar[tuple[str, ...]] = (
        "model",
        "train",
        "privacy",
        "secagg",
        "data",
        "server",
    )

    num_rounds: int = _opt(3, "Federated rounds (fedfusion simulate --rounds sets it).", min=1)
    output_dir: str = _opt(
        "runs/latest", "Where the server writes checkpoints and metrics (--out sets it)."
    )
    seed: int = _opt(0, "Seed of the data generation, partitioning and model init.")
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    data: DataConfig = field(default_factory=DataConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:
        if self.model.text_encoder == "lstm" and self.privacy.grad_sample_mode in {"ghost", "ew"}:
            raise ConfigError(
                f"privacy.grad-sample-mode {self.privacy.grad_sample_mode!r}: the lstm encoder "
                "reuses its layers at every time step, which only bk, hooks and functorch "
                "handle (Opacus refuses parameter reuse in ghost clipping)"
            )
        if self.data.min_studies > self.data.max_studies:
            raise ConfigError(
                f"data.min-studies {self.data.min_studies} is above data.max-studies "
                f"{self.data.max_studies}"
            )
        if self.server.strategy == "fedprox" and self.server.proximal_mu <= 0:
            raise ConfigError("server.proximal-mu: strategy 'fedprox' needs proximal-mu > 0")
        if self.server.aggregator != "mean" and self.secagg.enabled:
            raise ConfigError(
                f"server.aggregator {self.server.aggregator!r} needs each hospital's update, "
                "but with secagg.enabled = true the server only learns their sum; use "
                "aggregator 'mean' with SecAgg+, or secagg.enabled = false"
            )

    def secagg_plan(self, hospitals: int) -> tuple[int, int, int]:
        """(hospitals per round, num_shares, threshold) with ``hospitals`` connected.

        SecAgg+ samples at least 3 (Flower's minimum) but never more than are connected,
        so too few hospitals is refused here instead of waiting for ones that never come.
        """
        sampled = min(hospitals, max(3, int(hospitals * self.server.fraction_train)))
        return (sampled, *self.secagg.resolve(sampled))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's flat ``run_config`` (missing keys take their defaults)."""
        values: dict[str, dict[str, Any]] = {s: {} for s in cls.SECTIONS}
        top: dict[str, Any] = {}
        known = _known_run_keys()
        for key, raw in run_config.items():
            if key not in known:
                raise ConfigError(unknown_key_message(key, known))
            section, fld, owner = known[key]
            value = coerce(key, fld, owner, raw)
            (values[section] if section else top)[fld.name] = value
        sub = {s: construct(_SECTION_TYPES[s], values[s], prefix=s) for s in cls.SECTIONS}
        return construct(cls, {**top, **sub}, prefix="")

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten back to Flower's kebab-case mapping (the inverse of from_run_config)."""
        flat: dict[str, bool | int | float | str] = {}
        for key, (section, fld, _) in _known_run_keys().items():
            owner = getattr(self, section) if section else self
            value = getattr(owner, fld.name)
            flat[key] = "|".join(value) if isinstance(value, tuple) else value
        return flat


_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "train": TrainConfig,
    "privacy": PrivacyConfig,
    "secagg": SecAggConfig,
    "data": DataConfig,
    "server": ServerConfig,
}


_Key = tuple[str, dataclasses.Field[Any], type]  # (section or "", field, owning class)


def _known_run_keys() -> dict[str, _Key]:
    keys: dict[str, _Key] = {}
    for fld in dataclasses.fields(RunConfig):
        if fld.name in _SECTION_TYPES:
            owner = _SECTION_TYPES[fld.name]
            for sub in dataclasses.fields(owner):
                keys[f"{fld.name}.{sub.name.replace('_', '-')}"] = (fld.name, sub, owner)
        else:
            keys[fld.name.replace("_", "-")] = ("", fld, RunConfig)
    return keys


def describe_run_config() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every run key, for ``--help`` texts and the docs."""
    defaults = RunConfig().to_run_config()
    return [(k, defaults[k], f.metadata["help"]) for k, (_, f, _o) in _known_run_keys().items()]
