"""A bundle's model, built and checked at the hospital, ready to predict.

The checks, in order: the weights file's SHA-256 against bundle.json (the bytes are
read once, hashed, then parsed, so what is checked is what is used); every weight
finite; the model built from the bundle's settings with the frozen pretrained parts of
*this* machine (their paths come from the hospital, never from the bundle: a path in a
bundle could point anywhere); their SHA-256 against the bundle's; the tokenizer's
identity against the bundle's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes

from shared_model.config import ConfigError
from shared_model.data import FusionTensors
from shared_model.inference.bundle import BUNDLE_FILE, WEIGHTS_FILE, Bundle, BundleError
from shared_model.inference.calibration import probabilities
from shared_model.text import tokenizer_for, tokenizer_identity
from shared_model.weights import base_fingerprint, initial_model, load_shared_state

__all__ = ["LoadedModel", "load_model"]

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A bundle's model, checked and ready: logits and probabilities for records."""

    bundle: Bundle
    model: torch.nn.Module
    weights: StateDict  # the trained parameters, as checked (a recalibrated copy reuses them)
    tokenizer: Any  # shared_model.text.Tokenizer
    device: str = "cpu"
    batch_size: int = field(default=64)

    @torch.no_grad()
    def logits(
        self, records: FusionTensors, progress: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """(n, K) logits: the model's forward pass, exactly as held-out evaluation runs it."""
        out = []
        for start in range(0, len(records), self.batch_size):
            stop = min(start + self.batch_size, len(records))
            batch = [
                t[start:stop].to(self.device)
                for t in (records.images, records.report_ids, records.present)
            ]
            out.append(self.model(*batch).double().cpu())
            if progress is not None:
                progress(stop - start)
        return torch.cat(out).numpy() if out else np.zeros((0, len(self.bundle.labels)))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Calibrated probabilities: sigmoid(logit / T) per label."""
        return probabilities(logits, self.bundle.temperatures)

    def decisions(self, logits: np.ndarray) -> np.ndarray:
        """(n, K) bool: positive where the logit reaches the label's threshold."""
        return np.asarray(logits) >= self.bundle.threshold_logits


def _read_weights(bundle: Bundle) -> StateDict:
    """The weights, from bytes read once and checked against bundle.json's SHA-256."""
    path = bundle.root / WEIGHTS_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BundleError(f"{bundle.root}: {WEIGHTS_FILE} cannot be read ({err})") from err
    expected = bundle.info["weights"]["sha256"]
    if hashlib.sha256(data).hexdigest() != expected:
        raise BundleError(
            f"{path}: SHA-256 differs from the one in {BUNDLE_FILE} ({expected[:12]}): "
            "the file was changed or damaged; export the bundle again"
        )
    try:
        state = load_bytes(data)
    except (SafetensorError, ValueError) as err:
        raise BundleError(f"{path} is not a safetensors weights file ({err})") from err
    bad = sorted(k for k, v in state.items() if not torch.isfinite(v).all())
    if bad:
        raise BundleError(f"{path}: weights {bad[:3]} hold NaN or infinite values")
    return state


def load_model(
    bundle: Bundle, *, text_model: str = "", image_weights: str = "", device: str = "cpu"
) -> LoadedModel:
    """Build and check ``bundle``'s model here; BundleError says what failed and what to do.

    ``text_model`` / ``image_weights``: this machine's copies of the frozen pretrained
    files (default: the ones fedfusion installs). Paths written in the bundle are never
    followed.
    """
    state = _read_weights(bundle)
    cfg = replace(bundle.model, text_model=text_model, image_weights=image_weights, text_weights="")
    try:
        model = initial_model(cfg, bundle.seed, load_trained_weights=False)
        load_shared_state(model, state)
        tokenizer = tokenizer_for(cfg)
        identity = tokenizer_identity(cfg)
    except (ConfigError, ValueError, OSError) as err:
        raise BundleError(f"{bundle.root}: cannot build its model here: {err}") from err
    base, here = bundle.info["frozen-base"]["sha256"], base_fingerprint(model)
    if here != base:
        raise BundleError(
            f"{bundle.root}: the frozen pretrained weights on this machine differ from the "
            f"ones the model was trained with (SHA-256 {base[:12]}, here {here[:12]}); point "
            "--text-model / --image-weights at the files the federation used"
        )
    stored = bundle.info["preprocessing"]["text"]["tokenizer"]
    if identity != stored:
        raise BundleError(
            f"{bundle.root}: the tokenizer here differs from the one the model was trained "
            f"with ({_difference(stored, identity)}); install the same fedfusion version "
            "or point --text-model at the federation's text model"
        )
    return LoadedModel(
        bundle=bundle,
        model=model.to(device).eval(),
        weights=state,
        tokenizer=tokenizer,
        device=device,
    )


def _difference(stored: Mapping[str, Any], here: Mapping[str, Any]) -> str:
    keys = sorted(k for k in stored.keys() | here.keys() if stored.get(k) != here.get(k))
    return ", ".join(f"{k}: {stored.get(k)} in the bundle, {here.get(k)} here" for k in keys)
