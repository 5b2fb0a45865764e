"""Every setting of fedfusion, parsed in one place.

Flower hands the apps flat, kebab-case mappings: ``context.run_config`` (the run, the
same at every site) and ``context.node_config`` (the facts of one site). This module is
the only one that knows those keys. Everything else receives the frozen dataclasses
below.

A run key is ``<section>.<field-with-dashes>`` (``privacy.target-epsilon``) or, for the
top-level fields, just the field (``num-rounds``). Unknown keys and ill-typed values
raise :class:`ConfigError` naming the key, so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_origin, get_type_hints

from shared_model.errors import ExplainedError

__all__ = [
    "ConfigError",
    "ConnectionConfig",
    "DataConfig",
    "HospitalConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SecAggConfig",
    "ServerConfig",
    "ServerDeployConfig",
    "TrainConfig",
    "describe_run_config",
    "flatten_toml",
    "parse_overrides",
]

FUSION_MODES = ("concat", "gated", "cross_attention")
BRANCHES = ("fused", "image", "text")
TEXT_ENCODERS = ("transformer", "lstm", "pretrained")
IMAGE_ENCODERS = ("cnn", "efficientnet-lite0")
ENCODER_MODES = ("full", "frozen", "lora")
# The seed systems fedfusion reproduces, as named bundles of model settings
# (`fedfusion simulate --preset NAME`).
PRESETS: dict[str, dict[str, str]] = {
    "cnn-lstm-concat": {"model.text-encoder": "lstm", "model.fusion": "concat"},  # 000/002/004
    # Seed 001: a pretrained CNN (EfficientNet-Lite0 in place of ResNet50) and a pretrained
    # BERT (all-MiniLM-L6-v2), concatenated, with a linear fusion; encoders frozen.
    "pretrained-concat": {
        "model.image-encoder": "efficientnet-lite0",
        "model.text-encoder": "pretrained",
        "model.fusion": "concat",
        "model.encoder-mode": "frozen",
    },
    "cross-attention": {"model.text-encoder": "transformer", "model.fusion": "cross_attention"},
    "gated": {"model.text-encoder": "transformer", "model.fusion": "gated"},  # seed 001's sum
}
# Where `fedfusion simulate` tells its simulated hospitals to cache frozen features.
SIM_FEATURE_CACHE_ENV = "FEDFUSION_SIM_FEATURE_CACHE"
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("auto", "bk", "hooks", "ghost", "functorch", "ew")
STRATEGIES = ("fedavg", "fedprox")
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum")
OPTIMIZERS = ("sgd", "adamw")


class ConfigError(ExplainedError, ValueError):
    """A setting is unknown, of the wrong type or out of range. The message names it."""


def _opt(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
) -> Any:
    """Declare a config field with its documentation and validation rules."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "min": min,
            "max": max,
            "min_exclusive": min_exclusive,
        },
    )


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the shared fusion model; identical at every hospital."""

    labels: tuple[str, ...] = _opt(
        ("normal", "cardiomegaly", "opacity", "atelectasis", "effusion", "nodule", "other"),
        "Finding labels the head predicts, '|'-separated in the run config.",
    )
    fusion: str = _opt("gated", "How image and report are fused.", choices=FUSION_MODES)
    image_encoder: str = _opt(
        "cnn",
        "Radiograph encoder: cnn (small GroupNorm CNN, from scratch or image-weights) or "
        "efficientnet-lite0 (ImageNet-pretrained; it has BatchNorm, so it always stays "
        "frozen and outside DP-SGD, and a trained linear projection follows it).",
        choices=IMAGE_ENCODERS,
    )
    text_encoder: str = _opt(
        "transformer",
        "Report encoder: transformer (linear attention blocks) or lstm (bidirectional, "
        "built from linear layers as Opacus's DPLSTM is), both from scratch or "
        "text-weights; or pretrained (a Hugging Face encoder folder, model.text-model).",
        choices=TEXT_ENCODERS,
    )
    text_model: str = _opt(
        "",
        "Hugging Face encoder folder (config, weights, tokenizer) for text-encoder = "
        "pretrained, loaded offline; empty: the bundled all-MiniLM-L6-v2.",
    )
    image_weights: str = _opt(
        "",
        "Pretrained weights for the image encoder: a torch state_dict (.pt/.pth) or "
        "safetensors file, of the encoder or of a whole fedfusion model (e.g. a run's "
        "global_model.safetensors); for efficientnet-lite0, empty means the bundled "
        "ImageNet weights.",
    )
    text_weights: str = _opt(
        "", "Pretrained weights for a transformer or lstm report encoder (as image-weights)."
    )
    encoder_mode: str = _opt(
        "full",
        "full: train every parameter. frozen: the encoders stay fixed (their features are "
        "cached at each hospital); hospitals train the projections, fusion and head. lora: "
        "LoRA adapters on the pretrained text encoder's linear layers, trained with the "
        "rest under DP. Frozen weights never cross the network.",
        choices=ENCODER_MODES,
    )
    lora_rank: int = _opt(8, "Rank r of the LoRA adapters (encoder-mode = lora).", min=1)
    lora_alpha: float = _opt(
        16.0, "LoRA scaling alpha (the update is scaled by alpha / r).", min=0.0, min_exclusive=True
    )
    branches: str = _opt(
        "fused",
        "fused (image and report), or one branch alone: image or text. A single-branch "
        "model has no encoder for the other modality at all.",
        choices=BRANCHES,
    )
    image_size: int = _opt(64, "Radiographs are resized to image-size x image-size.", min=32)
    embed_dim: int = _opt(64, "Width of both encoders and the fusion block.", min=8)
    text_layers: int = _opt(1, "Transformer blocks in the report encoder.", min=1)
    text_heads: int = _opt(4, "Attention heads (embed-dim must divide by it).", min=1)
    text_vocab_buckets: int = _opt(
        4096, "Rows of the report embedding; WordPiece ids are hashed into them.", min=16
    )
    max_report_tokens: int = _opt(64, "Reports are truncated/padded to this many tokens.", min=8)
    dropout: float = _opt(0.0, "Dropout inside the encoders and fusion block.", min=0.0, max=0.9)

    def __post_init__(self) -> None:
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ConfigError(f"model.labels: need distinct, non-empty labels, got {self.labels}")
        if self.embed_dim % self.text_heads:
            raise ConfigError(
                f"model.text-heads: embed-dim {self.embed_dim} is not divisible by "
                f"text-heads {self.text_heads}"
            )
        if self.image_size % 16:
            raise ConfigError(
                f"model.image-size: must be a multiple of 16 (4 stride-2 stages), "
                f"got {self.image_size}"
            )
        if self.text_encoder == "lstm" and self.embed_dim % 2:
            raise ConfigError(
                f"model.embed-dim: the lstm encoder needs an even width, got {self.embed_dim}"
            )
        if (
            self.image_encoder == "efficientnet-lite0"
            and self.encoder_mode == "full"
            and self.branches != "text"
        ):
            raise ConfigError(
                "model.encoder-mode = 'full': efficientnet-lite0 has BatchNorm, which mixes "
                "the examples of a batch, so DP-SGD cannot train it per example; use "
                "encoder-mode = frozen or lora (the backbone stays frozen, its projection "
                "trains), or image-encoder = cnn"
            )
        if self.encoder_mode == "lora" and (
            self.text_encoder != "pretrained" or self.branches == "image"
        ):
            raise ConfigError(
                "model.encoder-mode = 'lora': LoRA adapts a pretrained transformer, and "
                "this model has none; set model.text-encoder = 'pretrained' (with a text "
                "branch), or use encoder-mode = frozen or full"
            )
        if self.text_encoder == "pretrained" and self.text_weights:
            raise ConfigError(
                "model.text-weights: only for the transformer and lstm encoders; a "
                "pretrained text encoder loads its weights from model.text-model"
            )
        if self.branches != "fused" and self.fusion == "cross_attention":
            raise ConfigError(
                f"model.branches = {self.branches!r}: cross_attention fuses report tokens "
                "with image patches and needs both branches; use model.fusion = concat or gated"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each hospital, per round."""

    local_epochs: int = _opt(2, "Passes over the hospital's training split per round.", min=1)
    batch_size: int = _opt(
        64, "Expected batch size; with Poisson sampling the rate is batch/N.", min=1
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
        "default run it reached a higher macro AUROC under DP noise than AdamW (README).",
        choices=OPTIMIZERS,
    )
    learning_rate: float = _opt(0.05, "Learning rate.", min=0.0, min_exclusive=True)
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

    max_reports: int = _opt(0, "Use at most this many reports (0: all 3,860 labelled).", min=0)
    dirichlet_alpha: float = _opt(
        1.0, "Label skew across hospitals; smaller is more non-IID.", min=0.0, min_exclusive=True
    )
    test_fraction: float = _opt(
        0.2, "Share of each hospital's records held out for evaluation.", min=0.05, max=0.5
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
    fraction_train: float = _opt(
        1.0, "Share of hospitals sampled to train per round.", min=0.0, max=1.0, min_exclusive=True
    )
    fraction_evaluate: float = _opt(
        1.0, "Share of hospitals sampled to evaluate per round.", min=0.0, max=1.0
    )
    min_hospitals: int = _opt(2, "Hospitals that must be connected before a round starts.", min=1)
    round_timeout: float = _opt(600.0, "Seconds to wait for replies in one round stage.", min=1.0)
    wait_for_hospitals_timeout: float = _opt(
        120.0, "Seconds to wait for min-hospitals to connect before failing the run.", min=1.0
    )
    min_update_fraction: float = _opt(
        0.66,
        "A round needs updates from at least this share of its sampled hospitals (the rest "
        "may fail, not answer or be refused); otherwise server.short-round decides.",
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
    num_shares: int = _opt(0, "Shares of each hospital's key; 0: all sampled hospitals.", min=0)
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
        "Bound on a hospital's training-set size (its weight); larger costs precision.",
        min=1.0,
    )
    stage_timeout: float = _opt(
        600.0,
        "Seconds to wait for replies in each SecAgg+ stage; local training runs inside one, "
        "so this bounds a hospital's round.",
        min=1.0,
    )

    def resolve(self, hospitals: int) -> tuple[int, int]:
        """(num_shares, reconstruction_threshold) for ``hospitals``, or a ConfigError why not."""
        if hospitals < 3:
            raise ConfigError(
                f"secagg.enabled: SecAgg+ needs at least 3 hospitals per round, got {hospitals} "
                "(use 3 or more, or run without it: secagg.enabled=false)"
            )
        shares = self.num_shares or hospitals
        if shares > hospitals:
            raise ConfigError(f"secagg.num-shares: {shares} shares for only {hospitals} hospitals")
        if shares < 3:
            raise ConfigError(f"secagg.num-shares: must be at least 3, got {shares}")
        if shares < hospitals and shares % 2 == 0:
            # Flower 1.41 tells the hospitals to make `shares` key shares, then builds the
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

    num_rounds: int = _opt(3, "Federated rounds.", min=1)
    output_dir: str = _opt("runs/latest", "Where the server writes checkpoints and metrics.")
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
                raise ConfigError(_unknown_key_message(key, known))
            section, fld, owner = known[key]
            value = _coerce(key, fld, owner, raw)
            (values[section] if section else top)[fld.name] = value
        sub = {s: _construct(_SECTION_TYPES[s], values[s], prefix=s) for s in cls.SECTIONS}
        return _construct(cls, {**top, **sub}, prefix="")

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flatten back to Flower's kebab-case mapping (the inverse of from_run_config)."""
        flat: dict[str, bool | int | float | str] = {}
        for key, (section, fld, _) in _known_run_keys().items():
            owner = getattr(self, section) if section else self
            value = getattr(owner, fld.name)
            flat[key] = "|".join(value) if isinstance(value, tuple) else value
        return flat


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
    max_epsilon: float = _opt(
        10.0, "Hard cap on cumulative epsilon at this hospital.", min=0.0, min_exclusive=True
    )
    delta: float = _opt(
        1e-5, "Largest delta this hospital accepts.", min=0.0, max=0.1, min_exclusive=True
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
        values = _parse_table(cls, merged, "", "node")
        cfg = _construct(cls, values, prefix="")
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
        if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", cfg.device):
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


@dataclass(frozen=True)
class ConnectionConfig:
    """How a hospital's SuperNode reaches the server: the ``[connection]`` table."""

    server: str = _opt("", "The SuperLink's address, host:port.")
    root_certificates: str = _opt("", "The CA certificate the server's TLS certificate chains to.")
    private_key: str = _opt("", "This hospital's OpenSSH EC private key (its registered identity).")
    port: int = _opt(9094, "Local port of the SuperNode's ClientApp API.", min=1, max=65535)
    insecure: bool = _opt(False, "Plaintext, no TLS: development only (prints a warning).")
    poll_interval: float = _opt(
        0.5,
        "Seconds between an idle SuperNode's requests for work (Flower's own: 3); each "
        "costs the server one small request per hospital.",
        min=0.05,
        max=60.0,
    )
    rejoin_timeout: float = _opt(
        120.0,
        "Seconds a restarted hospital retries joining while the server still counts its "
        "previous connection as online (Flower frees it 60 s after its last heartbeat); "
        "0 gives up at once.",
        min=0.0,
        max=3600.0,
    )

    @classmethod
    def from_file(cls, path: Path) -> ConnectionConfig:
        """Read and check the ``[connection]`` table of a hospital file."""
        path = Path(path).expanduser().resolve()
        table = _load_toml(path, "fedfusion hospital --config").get("connection")
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}: needs a [connection] table (server, root-certificates, private-key)"
            )
        values = _parse_table(cls, table, "connection", "hospital file")
        for key in ("root_certificates", "private_key"):  # relative to the file
            if values.get(key) and not Path(values[key]).is_absolute():
                values[key] = str(path.parent / values[key])
        cfg = _construct(cls, values, prefix="connection")
        cfg._check()
        return cfg

    def _check(self) -> None:
        if not re.match(r"^[^\s:]+:\d{1,5}$", self.server):
            raise ConfigError(f"connection.server: expected host:port, got {self.server!r}")
        if self.insecure and self.root_certificates:
            raise ConfigError(
                "connection.insecure = true contradicts connection.root-certificates:"
                " choose TLS (give the CA) or plaintext (development only)"
            )
        if not self.insecure and not self.root_certificates:
            raise ConfigError(
                "connection.root-certificates: the CA certificate is required "
                "(plaintext needs an explicit connection.insecure = true)"
            )
        for key, value in (
            ("root-certificates", self.root_certificates),
            ("private-key", self.private_key),
        ):
            if key == "root-certificates" and self.insecure:
                continue
            if not value:
                raise ConfigError(f"connection.{key}: missing")
            if not Path(value).is_file():
                raise ConfigError(f"connection.{key}: {value} does not exist")


@dataclass(frozen=True)
class ServerDeployConfig:
    """The coordinator's deployment: the ``[server]`` table of ``server.toml``."""

    address: str = _opt("0.0.0.0:9092", "host:port the SuperLink listens on.")
    state_dir: str = _opt("server-state", "SuperLink database, runs (checkpoints, metrics), logs.")
    root_certificates: str = _opt("", "The federation's CA certificate.")
    certificate: str = _opt("", "The SuperLink's TLS certificate (from `fedfusion certs`).")
    private_key: str = _opt("", "The SuperLink's TLS private key.")
    hospitals: str = _opt("", "Hospitals' public keys to register, '|'-separated paths.")
    insecure: bool = _opt(False, "Plaintext, no TLS, no hospital authentication: development only.")
    timeout: float = _opt(86400.0, "Stop the run after this many seconds.", min=1.0)

    @classmethod
    def from_file(cls, path: Path) -> tuple[ServerDeployConfig, RunConfig, dict[str, Any]]:
        """Read ``server.toml``: the ``[server]`` table, and ``[run]`` run settings."""
        path = Path(path).expanduser().resolve()
        data = _load_toml(path, "fedfusion server --config")
        table = data.get("server")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: needs a [server] table")
        if isinstance(table.get("hospitals"), list):
            table = {**table, "hospitals": "|".join(str(p) for p in table["hospitals"])}
        values = _parse_table(cls, table, "server", "server file")
        for key in ("state_dir", "root_certificates", "certificate", "private_key"):
            if values.get(key) and not Path(values[key]).is_absolute():
                values[key] = str(path.parent / values[key])
        if values.get("hospitals"):
            values["hospitals"] = "|".join(
                p if Path(p).is_absolute() else str(path.parent / p)
                for p in values["hospitals"].split("|")
            )
        cfg = _construct(cls, values, prefix="server")
        run_table = data.get("run", {})
        if not isinstance(run_table, dict):
            raise ConfigError(f"{path}: [run] must be a table of run settings")
        flat = flatten_toml(run_table)
        run = RunConfig.from_run_config(flat)
        cfg._check()
        return cfg, run, flat

    def _check(self) -> None:
        if not re.match(r"^[^\s:]+:\d{1,5}$", self.address):
            raise ConfigError(f"server.address: expected host:port, got {self.address!r}")
        if self.insecure:
            if self.root_certificates or self.certificate or self.private_key:
                raise ConfigError(
                    "server.insecure = true contradicts the TLS files given: "
                    "choose TLS or plaintext (development only)"
                )
            return
        for key, value in (
            ("root-certificates", self.root_certificates),
            ("certificate", self.certificate),
            ("private-key", self.private_key),
        ):
            if not value:
                raise ConfigError(
                    f"server.{key}: required for TLS (plaintext needs an "
                    "explicit server.insecure = true)"
                )
            if not Path(value).is_file():
                raise ConfigError(f"server.{key}: {value} does not exist")
        for pub in self.hospital_keys():
            if not Path(pub).is_file():
                raise ConfigError(f"server.hospitals: {pub} does not exist")

    def hospital_keys(self) -> list[str]:
        """Paths of the hospitals' public keys to register."""
        return [p for p in self.hospitals.split("|") if p]


def flatten_toml(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as Flower's flat dotted keys (``{"a": {"b": 1}}`` -> ``a.b``)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten_toml(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# ------------------------------------------------------------------------- internals


def _parse_table(cls: type, table: Mapping[str, Any], prefix: str, kind: str) -> dict[str, Any]:
    """Check every key of a table against ``cls``'s fields and coerce its value."""
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            raise ConfigError(
                _unknown_key_message(dotted(key), {dotted(k): v for k, v in fields.items()}, kind)
            )
        values[fields[key].name] = _coerce(dotted(key), fields[key], cls, raw)
    return values


def _load_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{what}: cannot read {path} ({err})") from err
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: {path} is not valid TOML ({err})") from err


def _read_hospital_file(path_text: str) -> dict[str, Any]:
    path = Path(path_text).expanduser().resolve()
    data = _load_toml(path, "node config 'config-file'")
    table = data.get("hospital", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [hospital] must be a table")
    # relative to the file, not the cwd
    for key in ("data-manifest", "state-dir", "text-model", "image-weights", "feature-cache"):
        if isinstance(table.get(key), str) and table[key] and not Path(table[key]).is_absolute():
            table[key] = str(path.parent / table[key])
    return table


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


def _unknown_key_message(key: str, known: Mapping[str, Any], kind: str = "run") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} config key '{key}'.{hint} Known keys: {', '.join(sorted(known))}"


def _coerce(key: str, fld: dataclasses.Field[Any], owner: type, raw: Any) -> Any:
    typ = get_type_hints(owner)[fld.name]
    if get_origin(typ) is tuple:
        if not isinstance(raw, str):
            raise ConfigError(f"config key '{key}': expected a '|'-separated string, got {raw!r}")
        return tuple(part.strip() for part in raw.split("|") if part.strip())
    if typ is bool or typ == bool | None:  # None: a default that depends on the site
        if isinstance(raw, bool):
            return raw
        raise ConfigError(f"config key '{key}': expected true or false, got {raw!r}")
    if typ is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        raise ConfigError(f"config key '{key}': expected an integer, got {raw!r}")
    if typ is float:
        if isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw):
            return float(raw)
        raise ConfigError(f"config key '{key}': expected a finite number, got {raw!r}")
    if typ is str:
        if isinstance(raw, str):
            return raw
        raise ConfigError(f"config key '{key}': expected a string, got {raw!r}")
    raise TypeError(f"unsupported config field type {typ} for {key}")  # a bug, not user error


def _construct(cls: type, values: dict[str, Any], prefix: str) -> Any:
    for fld in dataclasses.fields(cls):
        if fld.name not in values:
            continue
        meta = fld.metadata
        value = values[fld.name]
        key = (f"{prefix}." if prefix else "") + fld.name.replace("_", "-")
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(
                f"config key '{key}': {value!r} is not one of {', '.join(meta['choices'])}"
            )
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"config key '{key}': must be {op} {lo}, got {value}")
        if hi is not None and value > hi:
            raise ConfigError(f"config key '{key}': must be <= {hi}, got {value}")
    return cls(**values)


def describe_run_config() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every run key, for ``--help`` texts and the README."""
    defaults = RunConfig().to_run_config()
    return [(k, defaults[k], f.metadata["help"]) for k, (_, f, _o) in _known_run_keys().items()]


def _toml_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``--run-config "k=v k2=v2"`` items (values in TOML syntax; bare words are text)."""
    out: dict[str, Any] = {}
    for item in items:
        for token in shlex.split(item):
            key, sep, value = token.partition("=")
            if not sep or not key:
                raise ConfigError(f"--run-config: expected key=value, got {token!r}")
            out[key.strip()] = _toml_value(value.strip())
    return out
