"""A model bundle: everything a hospital needs to apply a trained model, in one folder.

::

    BUNDLE/
      bundle.json          what the model is: settings, labels, preprocessing, tokenizer
                           identity, frozen-base hash, decision thresholds, calibration,
                           where it came from (run, round, how the round was chosen)
      weights.safetensors  the trained parameters (what the federation averaged)
      MODEL_CARD.md        the model card, for people

The frozen pretrained parts (a model with ``model.encoder-mode = frozen`` or ``lora``)
are not copied: every hospital already holds them, as it did for training. The bundle
names them and their SHA-256 (``frozen-base``); loading rebuilds them from the local
files and refuses a model whose hash differs, as the server refuses such a hospital.
The tokenizer is checked the same way. Weights are read with safetensors only, and their
own SHA-256 is checked first.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared_model.config import ConfigError, ModelConfig, RunConfig
from shared_model.data import FusionTensors

__all__ = [
    "BUNDLE_FILE",
    "CARD_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "LoadedModel",
    "file_sha256",
    "load_bundle",
    "model_settings",
    "write_bundle",
]

FORMAT = "fedfusion-model-bundle/1"
BUNDLE_FILE = "bundle.json"
WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "MODEL_CARD.md"


class BundleError(ValueError):
    """A bundle cannot be used here; the message says what is wrong and what to do."""


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_settings(model: ModelConfig) -> dict[str, Any]:
    """The model's ``model.*`` settings as run-config keys (labels as a list)."""
    flat = RunConfig(model=model).to_run_config()
    out: dict[str, Any] = {k: v for k, v in flat.items() if k.startswith("model.")}
    out["model.labels"] = list(model.labels)
    return out


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A bundle as read from ``bundle.json`` (the weights are loaded by :meth:`load_model`)."""

    root: Path
    info: dict[str, Any]  # bundle.json, whole
    model: ModelConfig
    threshold_logits: np.ndarray  # (K,): a label is positive when its logit >= this
    temperatures: np.ndarray  # (K,): probability = sigmoid(logit / T)

    @property
    def labels(self) -> tuple[str, ...]:
        """The finding labels, in the model's output order."""
        return self.model.labels

    @property
    def seed(self) -> int:
        """The run's seed (it initialised the parts no file holds)."""
        return int(self.info["seed"])

    def describe(self) -> str:
        """One line: which model this is."""
        source = self.info.get("source", {})
        recal = " (recalibrated locally)" if self.info["calibration"].get("fitted-on") else ""
        return (
            f"{self.root.name}: round {source.get('round')} ({source.get('selection')}) of run "
            f"{source.get('run', '?')}{recal}"
        )

    def load_model(
        self, *, text_model: str = "", image_weights: str = "", device: str = "cpu"
    ) -> LoadedModel:
        """The model ready to predict, after every check; BundleError says what failed.

        ``text_model`` / ``image_weights``: where this machine keeps the frozen
        pretrained files, when not where the bundle says (model.text-model,
        model.image-weights).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from shared_model.text import tokenizer_for, tokenizer_identity
        from shared_model.weights import base_fingerprint, initial_model, load_shared_state

        weights = self.root / WEIGHTS_FILE
        expected = self.info["weights"]["sha256"]
        if not weights.is_file():
            raise BundleError(f"{self.root}: {WEIGHTS_FILE} is missing")
        if file_sha256(weights) != expected:
            raise BundleError(
                f"{weights}: SHA-256 differs from the one in {BUNDLE_FILE} ({expected[:12]}): "
                "the file was changed or damaged; export the bundle again"
            )
        cfg = replace(
            self.model,
            text_model=text_model or self.model.text_model,
            image_weights=image_weights or self.model.image_weights,
        )
        try:
            model = initial_model(cfg, self.seed, load_trained_weights=False)
            state = load_file(str(weights))
            load_shared_state(model, state)
            tokenizer = tokenizer_for(cfg)
            identity = tokenizer_identity(cfg)
        except (ConfigError, ValueError, SafetensorError, OSError) as err:
            raise BundleError(f"{self.root}: cannot build its model here: {err}") from err
        base = self.info["frozen-base"]["sha256"]
        if base_fingerprint(model) != base:
            raise BundleError(
                f"{self.root}: the frozen pretrained weights on this machine differ from the "
                f"ones the model was trained with (SHA-256 {base[:12]}, here "
                f"{base_fingerprint(model)[:12]}); point --text-model / --image-weights at "
                "the files the federation used"
            )
        stored = self.info["preprocessing"]["text"]["tokenizer"]
        if identity != stored:
            raise BundleError(
                f"{self.root}: the tokenizer here differs from the one the model was trained "
                f"with ({_difference(stored, identity)}); install the same fedfusion version "
                "or point --text-model at the federation's text model"
            )
        return LoadedModel(
            bundle=self, model=model.to(device).eval(), tokenizer=tokenizer, device=device
        )


@dataclass(frozen=True, kw_only=True)
class LoadedModel:
    """A bundle's model, checked and ready: logits and probabilities for records."""

    bundle: Bundle
    model: torch.nn.Module
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
        from shared_model.inference.calibration import probabilities

        return probabilities(logits, self.bundle.temperatures)

    def decisions(self, logits: np.ndarray) -> np.ndarray:
        """(n, K) bool: positive where the logit reaches the label's threshold."""
        return np.asarray(logits) >= self.bundle.threshold_logits


def _difference(stored: Mapping[str, Any], here: Mapping[str, Any]) -> str:
    keys = sorted(k for k in stored.keys() | here.keys() if stored.get(k) != here.get(k))
    return ", ".join(f"{k}: {stored.get(k)} in the bundle, {here.get(k)} here" for k in keys)


_REQUIRED = (
    ("seed",),
    ("weights", "sha256"),
    ("frozen-base", "sha256"),
    ("preprocessing", "text", "tokenizer"),
)


def load_bundle(path: str | Path) -> Bundle:
    """Read and check a bundle's ``bundle.json``; BundleError names the problem."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BundleError(f"{root} is not a model bundle folder (`fedfusion export` makes one)")
    meta = root / BUNDLE_FILE
    try:
        info = json.loads(meta.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise BundleError(f"{root} has no {BUNDLE_FILE}: it is not a model bundle") from err
    except (OSError, ValueError) as err:
        raise BundleError(f"{meta} cannot be read: {err}") from err
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise BundleError(f"{meta}: format {found!r}, this fedfusion reads {FORMAT!r}")
    try:
        for keys in _REQUIRED:
            node = info
            for key in keys:
                node = node[key]
        settings = dict(info["model"])
        settings["model.labels"] = "|".join(settings["model.labels"])
        model = RunConfig.from_run_config(settings).model
        k = len(model.labels)
        thresholds = np.asarray(info["decision"]["threshold-logits"], dtype=np.float64)
        temperatures = np.asarray(info["calibration"]["temperatures"], dtype=np.float64)
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise BundleError(f"{meta} is incomplete or damaged ({type(err).__name__}: {err})") from err
    if thresholds.shape != (k,) or temperatures.shape != (k,):
        raise BundleError(f"{meta}: thresholds and temperatures need one value per label ({k})")
    if not (np.isfinite(thresholds).all() and np.isfinite(temperatures).all()):
        raise BundleError(f"{meta}: thresholds and temperatures must be finite numbers")
    if (temperatures <= 0).any():
        raise BundleError(f"{meta}: temperatures must be positive")
    return Bundle(
        root=root, info=info, model=model, threshold_logits=thresholds, temperatures=temperatures
    )


def write_bundle(
    out: Path,
    info: dict[str, Any],
    weights: dict[str, torch.Tensor],
    card: str,
) -> Path:
    """Write a bundle folder (refusing to overwrite one); ``info`` lacks only the weights' hash.

    The weights file is written first, its hash then goes into ``bundle.json``.
    """
    from safetensors.torch import save_file

    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty: choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(path))
    info = {
        **info,
        "format": FORMAT,
        "weights": {
            "file": WEIGHTS_FILE,
            "sha256": file_sha256(path),
            "parameters": int(sum(v.numel() for v in weights.values())),
        },
    }
    (out / BUNDLE_FILE).write_text(json.dumps(_json_ready(info), indent=2) + "\n", "utf-8")
    (out / CARD_FILE).write_text(card, encoding="utf-8")
    return out


def _json_ready(value: Any) -> Any:
    """NaN and infinities as null, numpy scalars and arrays as plain JSON."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
