"""The frozen-feature cache: a frozen pretrained backbone's output, computed once per record.

A frozen encoder gives the same features for a record in every round, so a hospital
computes them once and trains the projections, fusion and head on them: a frozen
all-MiniLM-L6-v2 costs about 30 ms per report on one core, every epoch, otherwise.

The cache lives in the hospital's own state directory (``hospital.feature-cache``) and
is never sent anywhere: features of patient data are patient data. It is keyed by
content, so it survives restarts, re-partitioning and new runs:

- a namespace per backbone: the SHA-256 of its weights, and whether token-level or
  pooled features are kept (cross-attention needs tokens);
- a key per record: the SHA-256 of that record's input tensor.

Shards are appended atomically (write, then rename), so hospitals of one simulation can
share a directory and a crash never leaves half a shard.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch

from shared_model.config import ModelConfig
from shared_model.data import FusionTensors
from shared_model.datasets import HospitalSplit
from shared_model.files import write_atomic
from shared_model.model import FusionModel, PretrainedImageEncoder, PretrainedTextEncoder
from shared_model.weights import base_fingerprint, hospital_model

__all__ = ["FeatureCache", "cacheable_encoders", "frozen_feature_split"]

log = logging.getLogger("fedfusion.hospital")


def _record_key(row: torch.Tensor) -> str:
    return hashlib.sha256(row.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()[:32]


class FeatureCache:
    """Per-record features of one frozen backbone, in ``root/namespace``."""

    def __init__(self, root: Path, namespace: str) -> None:
        self.dir = Path(root) / namespace
        self._known: dict[str, torch.Tensor] = {}
        self._shards: set[str] = set()

    def refresh(self) -> None:
        """Read the shards written since the last look (by this process or another)."""
        if not self.dir.is_dir():
            return
        for shard in sorted(self.dir.glob("*.pt")):
            if shard.name in self._shards:
                continue
            try:
                data = torch.load(shard, map_location="cpu", weights_only=True)
                keys, feats = data["keys"], data["features"]
            except Exception as err:  # a damaged shard: recompute its records, say so
                log.warning("feature cache: ignoring unreadable shard %s (%s)", shard, err)
                self._shards.add(shard.name)
                continue
            self._known.update(zip(keys, feats, strict=True))
            self._shards.add(shard.name)

    def features(
        self,
        inputs: torch.Tensor,
        compute: Callable[[torch.Tensor], torch.Tensor],
        *,
        what: str,
        batch_size: int = 64,
    ) -> torch.Tensor:
        """Features of every row of ``inputs``: cached ones read, the rest computed."""
        keys = [_record_key(row) for row in inputs]
        self.refresh()
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # one row per distinct record
        todo = sorted(i for k, i in first.items() if k not in self._known)
        if todo:
            started, done = time.monotonic(), []
            log.info("feature cache: encoding %d %s (%s)", len(todo), what, self.dir)
            for start in range(0, len(todo), batch_size):
                rows = todo[start : start + batch_size]
                with torch.no_grad():
                    done.append(compute(inputs[rows]).float().cpu())
                if time.monotonic() - started > 10 and start + batch_size < len(todo):
                    log.info("feature cache: %d/%d %s", start + batch_size, len(todo), what)
            feats = torch.cat(done)
            new_keys = [keys[i] for i in todo]
            self._write(new_keys, feats)
            self._known.update(zip(new_keys, feats, strict=True))
            log.info(
                "feature cache: %d %s encoded in %.1fs", len(todo), what, time.monotonic() - started
            )
        return torch.stack([self._known[k] for k in keys])

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor kept under ``key``, if any (as of the last :meth:`refresh`)."""
        return self._known.get(key)

    def put(self, keys: list[str], values: torch.Tensor) -> None:
        """Keep ``values`` (one row per key) in a new shard."""
        if keys:
            self._write(keys, values)
            self._known.update(zip(keys, values, strict=True))

    def _write(self, keys: list[str], feats: torch.Tensor) -> None:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:16] + ".pt"
        shard = {"keys": keys, "features": feats.contiguous()}
        write_atomic(self.dir / name, lambda tmp: torch.save(shard, tmp))
        self._shards.add(name)


def cacheable_encoders(model: FusionModel) -> dict[str, torch.nn.Module]:
    """The model's pretrained encoders whose backbone is frozen: ``image`` and/or ``text``."""
    found: dict[str, torch.nn.Module] = {}
    for kind, encoder, cls in (
        ("image", model.image_encoder, PretrainedImageEncoder),
        ("text", model.text_encoder, PretrainedTextEncoder),
    ):
        if isinstance(encoder, cls) and not any(
            p.requires_grad for p in encoder.backbone.parameters()
        ):
            found[kind] = encoder
    return found


def _namespace(kind: str, encoder: torch.nn.Module) -> str:
    level = "pooled" if encoder.pooled_only else "tokens"
    return f"{kind}-{base_fingerprint(encoder.backbone)[:16]}-{level}"


def _with_features(
    data: FusionTensors, encoders: dict[str, torch.nn.Module], root: Path, device: torch.device
) -> FusionTensors:
    images, report_ids = data.images, data.report_ids
    for kind, encoder in encoders.items():
        cache = FeatureCache(root, _namespace(kind, encoder))
        encoder.to(device).eval()

        def compute(x: torch.Tensor, enc: torch.nn.Module = encoder) -> torch.Tensor:
            return enc.backbone_features(x.to(device))

        if kind == "image":
            images = cache.features(images, compute, what="radiographs")
        else:
            report_ids = cache.features(report_ids, compute, what="reports")
    return FusionTensors(images, report_ids, data.present, data.labels, data.patient_ids)


@lru_cache(maxsize=256)  # one per hospital a simulation worker serves, as hospital_data
def frozen_feature_split(
    split: HospitalSplit,
    model: ModelConfig,
    seed: int,
    root: Path,
    device: torch.device,
) -> HospitalSplit:
    """``split`` with each frozen pretrained backbone's input replaced by its features.

    The model's forward accepts either, so training and evaluation skip the backbone.
    Unchanged when nothing is frozen and pretrained.
    """
    encoders = cacheable_encoders(hospital_model(model, seed))
    if not encoders:
        return split
    return HospitalSplit(
        train=_with_features(split.train, encoders, root, device),
        test=_with_features(split.test, encoders, root, device),
    )
