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
own SHA-256 is checked first (:mod:`shared_model.inference.loaded`). ``bundle.json`` ends
with a digest over all of it, checked on read; a hospital can pin the digest the
coordinator announced. No path written in a bundle is ever followed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from shared_model.config import ConfigError, ModelConfig, RunConfig

__all__ = [
    "BUNDLE_FILE",
    "CARD_FILE",
    "FORMAT",
    "WEIGHTS_FILE",
    "Bundle",
    "BundleError",
    "bundle_digest",
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
    """A bundle as read from ``bundle.json``.

    Its weights are read, checked and built into a model by
    :func:`shared_model.inference.loaded.load_model`.
    """

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

    @property
    def digest(self) -> str:
        """SHA-256 of bundle.json's content and so, through its hash, of the weights."""
        return str(self.info["digest"])

    @property
    def shareable(self) -> bool:
        """False for a bundle recalibrated on one hospital's records: it stays there."""
        return bool(self.info["calibration"].get("shareable", True))


# Every field a loader reads, and its JSON type: anything else is refused by name.
_SCHEMA: tuple[tuple[tuple[str, ...], type | tuple[type, ...]], ...] = (
    (("digest",), str),
    (("seed",), int),
    (("labels",), list),
    (("model",), dict),
    (("model", "model.labels"), list),
    (("source",), dict),
    (("weights",), dict),
    (("weights", "sha256"), str),
    (("frozen-base",), dict),
    (("frozen-base", "sha256"), str),
    (("preprocessing", "text", "tokenizer"), dict),
    (("decision",), dict),
    (("decision", "rule"), str),
    (("decision", "threshold-logits"), list),
    (("decision", "thresholds"), list),
    (("decision", "notes"), list),
    (("calibration",), dict),
    (("calibration", "temperatures"), list),
)
# Thresholds beyond this logit (probability 1 - 4e-44) decide nothing: a damaged bundle.
_MAX_THRESHOLD_LOGIT = 100.0
_TEMPERATURES = (0.01, 100.0)


def bundle_digest(info: Mapping[str, Any]) -> str:
    """SHA-256 of ``info`` (bundle.json without its digest) as canonical JSON.

    ``info`` holds the weights' SHA-256, so the digest names the whole bundle: the
    coordinator announces it, a hospital checks it (``--expect-digest``).
    """
    body = {k: v for k, v in info.items() if k != "digest"}
    text = json.dumps(_json_ready(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_schema(info: dict[str, Any], meta: Path) -> None:
    for keys, kind in _SCHEMA:
        node: Any = info
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                raise BundleError(f"{meta} is incomplete or damaged: no {'.'.join(keys)}")
            node = node[key]
        if not isinstance(node, kind) or isinstance(node, bool):
            raise BundleError(
                f"{meta} is damaged: {'.'.join(keys)} is a {type(node).__name__}, "
                f"not a {getattr(kind, '__name__', kind)}"
            )
    labels = info["model"]["model.labels"]
    if not labels or not all(isinstance(x, str) and x for x in labels) or labels != info["labels"]:
        raise BundleError(f"{meta} is damaged: model.labels must be the list of label names")


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
    _check_schema(info, meta)
    if bundle_digest(info) != info["digest"]:
        raise BundleError(
            f"{meta} was changed after export (its digest no longer matches): export the "
            "bundle again, or ask the coordinator for an unchanged copy"
        )
    try:
        settings = dict(info["model"])
        settings["model.labels"] = "|".join(settings["model.labels"])
        model = RunConfig.from_run_config(settings).model
        thresholds = np.asarray(info["decision"]["threshold-logits"], dtype=np.float64)
        temperatures = np.asarray(info["calibration"]["temperatures"], dtype=np.float64)
    except (TypeError, ValueError, ConfigError) as err:
        raise BundleError(f"{meta} is damaged ({type(err).__name__}: {err})") from err
    k = len(model.labels)
    if thresholds.shape != (k,) or temperatures.shape != (k,):
        raise BundleError(f"{meta}: thresholds and temperatures need one value per label ({k})")
    if not np.all(np.abs(thresholds) <= _MAX_THRESHOLD_LOGIT):
        raise BundleError(f"{meta}: thresholds must be finite logits within +-100")
    low, high = _TEMPERATURES
    if not np.all((temperatures >= low) & (temperatures <= high)):
        raise BundleError(f"{meta}: temperatures must lie in [{low}, {high}]")
    return Bundle(
        root=root, info=info, model=model, threshold_logits=thresholds, temperatures=temperatures
    )


def write_bundle(
    out: Path,
    info: dict[str, Any],
    weights: dict[str, torch.Tensor],
    card: str,
    *,
    private: bool = False,
) -> Path:
    """Write a bundle folder (refusing to overwrite one); ``info`` lacks only the weights' hash.

    The weights file is written first, its hash then goes into ``bundle.json``, and the
    digest of it all last. ``private``: the folder is readable by its owner only (a
    bundle holding statistics of one hospital's records).
    """
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty: choose a new --out")
    out.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
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
    info["digest"] = bundle_digest(info)
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
