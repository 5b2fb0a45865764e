"""FusionModel: radiograph + report -> multi-label findings.

Every layer is one Opacus computes per-example gradients for (Conv2d, GroupNorm,
Linear, LayerNorm, Embedding): no BatchNorm, which mixes examples, and no
``nn.MultiheadAttention``, whose fused parameters get no per-example gradients.
Attention is built from ``nn.Linear``.

Shapes: B batch, S image side, P = (S/16)^2 image patches, L report tokens, D embed dim,
D_t report width (model.text-dim; D unless set), K labels. ``present`` is ``(B, 2)``:
is the image there, is the report there.
A missing modality's features are multiplied by zero before fusion, so its placeholder
input never reaches the output and its encoder gets no gradient from that example.

Pretrained encoders (an ImageNet EfficientNet-Lite0, a Hugging Face text encoder) are a
``backbone`` followed by a trained projection. A frozen backbone's output can be computed
once per record and cached (client/app/features.py): the encoders accept either raw input
or those cached features. Building a model with its weights, which parameters train and
travel, and the fingerprints of the frozen rest are in ``shared_model/weights.py``.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from shared_model.config import ConfigError, ModelConfig
from shared_model.text import PAD_ID, text_model_path

__all__ = [
    "FusionModel",
    "PretrainedImageEncoder",
    "PretrainedTextEncoder",
    "TrainingOutputs",
    "alignment_loss",
]

StateDict = dict[str, torch.Tensor]
# ImageNet statistics: EfficientNet-Lite0 was trained on inputs normalized with them.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageEncoder(nn.Module):
    """Small CNN with GroupNorm: (B, 1, S, S) -> patches (B, P, D) and pooled (B, D)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        widths = (1, 16, 32, 64, dim)

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                nn.GroupNorm(min(8, cout), cout),
                nn.GELU(),
            )

        self.stages = nn.Sequential(*(stage(a, b) for a, b in itertools.pairwise(widths)))
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.stages(image * 2.0 - 1.0)  # (B, D, S/16, S/16)
        patches = self.drop(self.proj(fmap.flatten(2).transpose(1, 2)))  # (B, P, D)
        return patches, patches.mean(dim=1)


class Attention(nn.Module):
    """Multi-head attention from Linear layers; queries attend to a (masked) context."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, lq, d = x.shape
        lk, h = context.shape[1], self.heads
        q = self.q(x).view(b, lq, h, d // h).transpose(1, 2)  # (B, H, Lq, D/H)
        k, v = self.kv(context).view(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)  # (B, H, Lq, Lk)
        if context_mask is not None:  # (B, Lk) True where attendable
            scores = scores.masked_fill(~context_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows -> 0
        mixed = (self.drop(weights) @ v).transpose(1, 2).reshape(b, lq, d)  # (B, Lq, D)
        return self.out(mixed)


class Block(nn.Module):
    """Pre-norm transformer block (nanoGPT style)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """Report ids (B, L) -> token states (B, L, D) and masked-mean pooled (B, D)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.tokens = nn.Embedding(cfg.text_vocab_buckets, d, padding_idx=PAD_ID)
        self.positions = nn.Embedding(cfg.max_report_tokens, d)
        self.blocks = nn.ModuleList(
            Block(d, cfg.text_heads, cfg.dropout) for _ in range(cfg.text_layers)
        )
        self.norm = nn.LayerNorm(d)

    def forward(self, report_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length = report_ids.shape
        # Explicit per-example position ids: Opacus needs the batch dimension on every
        # embedding input (a shared (1, L) index breaks per-sample gradients).
        pos = torch.arange(length, device=report_ids.device).expand(b, length).contiguous()
        mask = report_ids != PAD_ID  # (B, L)
        x = self.tokens(report_ids) + self.positions(pos)  # (B, L, D)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)
        weights = mask.unsqueeze(-1).float()
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return x, pooled, mask


class LinearLSTM(nn.Module):
    """One LSTM direction built from ``nn.Linear`` layers, as Opacus's ``DPLSTM`` is.

    ``nn.LSTM`` fuses its weights into one kernel, which per-example gradients cannot
    see into; linear layers called once per time step get per-example gradients that
    accumulate over the steps. (Written here because shared_model imports no Opacus.)
    """

    def __init__(self, d_in: int, d_hidden: int) -> None:
        super().__init__()
        self.hidden = d_hidden
        self.ih = nn.Linear(d_in, 4 * d_hidden)
        self.hh = nn.Linear(d_hidden, 4 * d_hidden, bias=False)

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """(B, L, D_in) -> hidden states (B, L, H), read right to left if ``reverse``."""
        b, length, _ = x.shape
        h = x.new_zeros(b, self.hidden)
        c = x.new_zeros(b, self.hidden)
        outputs: list[torch.Tensor] = [x.new_zeros(0)] * length
        steps = range(length - 1, -1, -1) if reverse else range(length)
        for t in steps:
            i, f, g, o = (self.ih(x[:, t]) + self.hh(h)).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs[t] = h
        return torch.stack(outputs, dim=1)


class LstmTextEncoder(nn.Module):
    """Report ids (B, L) -> bidirectional LSTM states (B, L, D), masked-mean pooled (B, D).

    CNN + LSTM fusion systems of the literature use this shape.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.embed_dim  # even: ModelConfig checks it
        self.tokens = nn.Embedding(cfg.text_vocab_buckets, d, padding_idx=PAD_ID)
        self.forward_lstm = LinearLSTM(d, d // 2)
        self.backward_lstm = LinearLSTM(d, d // 2)
        self.norm = nn.LayerNorm(d)

    def forward(self, report_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mask = report_ids != PAD_ID
        # Padding reaches the recurrence as exact zeros and sends no gradient back to the
        # embedding (Opacus's per-example embedding gradients ignore padding_idx).
        x = self.tokens(report_ids) * mask.unsqueeze(-1)
        states = torch.cat([self.forward_lstm(x), self.backward_lstm(x, reverse=True)], dim=-1)
        x = self.norm(states)
        weights = mask.unsqueeze(-1).float()
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return x, pooled, mask


class PretrainedImageEncoder(nn.Module):
    """ImageNet EfficientNet-Lite0, frozen, then a trained projection to the model width.

    The backbone has BatchNorm, which mixes examples and gets no per-example gradients,
    so it never trains (ModelConfig refuses encoder-mode = full) and always runs in eval
    mode. ``forward`` takes radiographs (B, 1, S, S) or their cached backbone features
    (B, P, 1280), as :meth:`backbone_features` returns them.
    """

    width = 1280

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet  # only this encoder needs it

        self.backbone = EfficientNet.from_name("efficientnet-lite0")
        self.backbone._fc = nn.Identity()  # the ImageNet classifier: never used
        self.backbone.requires_grad_(False).eval()  # BatchNorm statistics never change
        self.pooled_only = cfg.fusion != "cross_attention"
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), False)
        self.norm = nn.LayerNorm(self.width)
        self.proj = nn.Linear(self.width, cfg.embed_dim)

    def train(self, mode: bool = True) -> PretrainedImageEncoder:
        """Train the projection; the backbone's BatchNorm statistics stay fixed."""
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def backbone_features(self, image: torch.Tensor) -> torch.Tensor:
        """Radiographs (B, 1, S, S) in [0, 1] -> backbone features (B, P, 1280).

        Their mean (B, 1, 1280) unless the fusion attends to patches: the projection is
        linear, so the mean commutes with it and caching it loses nothing.
        """
        rgb = (image.expand(-1, 3, -1, -1) - self.mean) / self.std
        fmap = self.backbone.extract_features(rgb).flatten(2).transpose(1, 2)
        return fmap.mean(1, keepdim=True) if self.pooled_only else fmap

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Radiographs (B, 1, S, S), or their cached features: patches and pooled."""
        feats = image if image.dim() == 3 else self.backbone_features(image)
        patches = self.proj(self.norm(feats))
        return patches, patches.mean(dim=1)


def _load_hf_encoder(path: Path) -> nn.Module:
    """A Hugging Face encoder from a local folder, offline; ConfigError if it is not one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # transformers takes seconds to import: only a pretrained text encoder needs it, and
    # it must see HF_HUB_OFFLINE when it loads
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.text-model: {path} is not a Hugging Face model folder (no config.json); "
            "each hospital needs its own copy (hospital key text-model)"
        )
    hf_logging.disable_progress_bar()
    try:
        # never the folder's own Python code (a config's auto_map): weights and config only
        config = AutoConfig.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
        model = AutoModel.from_pretrained(
            str(path), config=config, local_files_only=True, trust_remote_code=False
        )
    except Exception as err:  # unreadable or incomplete folder: say which, and why
        raise ConfigError(
            f"model.text-model: cannot load {path}: {type(err).__name__}: {err}"
        ) from err
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused; its parameters would get no gradient
    return model


class PretrainedTextEncoder(nn.Module):
    """A Hugging Face encoder (e.g. all-MiniLM-L6-v2, a clinical BERT), then a projection.

    ``forward`` takes token ids (B, L) of the model's own tokenizer, or cached backbone
    features (B, L', H + 1) whose last channel is the token mask. Position and
    token-type ids are passed explicitly, per example: Opacus needs the batch dimension
    on every embedding input.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = _load_hf_encoder(text_model_path(cfg))
        self.pad_id = int(getattr(self.backbone.config, "pad_token_id", None) or 0)
        # BERT-style models take position and token-type ids; some (DistilBERT) do not.
        accepts = inspect.signature(self.backbone.forward).parameters
        self._explicit_ids = {k for k in ("position_ids", "token_type_ids") if k in accepts}
        width = int(self.backbone.config.hidden_size)
        self.pooled_only = cfg.fusion != "cross_attention"
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, cfg.report_dim)  # model.text-dim, or embed-dim

    def backbone_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, L) -> states (B, L, H + 1) whose last channel is the token mask.

        Their masked mean (B, 1, H + 1) unless the fusion attends to tokens.
        """
        b, length = ids.shape
        mask = ids != self.pad_id
        extra = {}
        if "position_ids" in self._explicit_ids:
            positions = torch.arange(length, device=ids.device).expand(b, length).contiguous()
            extra["position_ids"] = positions
        if "token_type_ids" in self._explicit_ids:
            extra["token_type_ids"] = torch.zeros_like(ids)
        states = self.backbone(input_ids=ids, attention_mask=mask.long(), **extra).last_hidden_state
        w = mask.unsqueeze(-1).to(states.dtype)
        if self.pooled_only:
            pooled = (states * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1.0)
            return torch.cat([pooled, w.amax(1, keepdim=True)], dim=-1)
        return torch.cat([states * w, w], dim=-1)

    def forward(self, report: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids (B, L), or their cached features: tokens, pooled and the token mask."""
        feats = report if report.is_floating_point() else self.backbone_features(report)
        mask = feats[..., -1] > 0.5
        tokens = self.proj(self.norm(feats[..., :-1]))
        w = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)
        return tokens, pooled, mask


class Fusion(nn.Module):
    """Combine image and report features; one of three modes, chosen by config.

    - ``concat``: Linear over [image; report].
    - ``gated``: Z = sum_i w_i * phi_i(M_i), with per-example modality weights w from a
      softmax over the present modalities (a gated multimodal unit).
    - ``cross_attention``: report tokens attend to image patches; the attended report
      and the image are then combined.
    """

    def __init__(
        self, mode: str, dim: int, heads: int, dropout: float, report_dim: int | None = None
    ) -> None:
        super().__init__()
        self.mode = mode
        report_dim = report_dim or dim  # D_t; cross_attention needs D (ModelConfig checks)
        if mode == "gated":
            self.phi_image = nn.Linear(dim, dim)
            self.phi_report = nn.Linear(report_dim, dim)
            self.gate = nn.Linear(dim + report_dim, 2)
        elif mode == "cross_attention":
            self.cross_norm = nn.LayerNorm(dim)
            self.cross = Attention(dim, heads, dropout)
            self.mix = nn.Linear(2 * dim, dim)
        else:
            self.mix = nn.Linear(dim + report_dim, dim)

    def forward(
        self,
        patches: torch.Tensor,  # (B, P, D)
        image: torch.Tensor,  # (B, D)
        tokens: torch.Tensor,  # (B, L, D_t)
        report: torch.Tensor,  # (B, D_t)
        token_mask: torch.Tensor,  # (B, L)
        present: torch.Tensor,  # (B, 2)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return fused features (B, D) and the modality weights used (B, 2)."""
        m_img, m_rep = present[:, :1], present[:, 1:]
        image, report = image * m_img, report * m_rep
        if self.mode == "gated":
            logits = self.gate(torch.cat([image, report], dim=-1))  # (B, 2)
            logits = logits.masked_fill(present <= 0, float("-inf"))
            weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # none present -> 0
            fused = weights[:, :1] * torch.tanh(self.phi_image(image)) + weights[
                :, 1:
            ] * torch.tanh(self.phi_report(report))
            return fused, weights
        if self.mode == "cross_attention":
            attended = self.cross(self.cross_norm(tokens), patches, None)  # (B, L, D)
            tokens = tokens + attended * m_img[:, :, None]  # no image: nothing to attend to
            w = token_mask.unsqueeze(-1).float()
            report = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0) * m_rep
        fused = F.gelu(self.mix(torch.cat([image, report], dim=-1)))
        return fused, present / present.sum(-1, keepdim=True).clamp_min(1.0)


class TrainingOutputs(NamedTuple):
    """A training forward's outputs when the loss needs more than the fused logits.

    Every field is per example, so DP-SGD's per-record clipping stays valid.
    """

    logits: torch.Tensor  # (B, K)
    alignment: torch.Tensor | None = None  # (B,), see alignment_loss
    branch_logits: torch.Tensor | None = None  # (B, 2, K): late fusion's image, report heads
    present: torch.Tensor | None = None  # (B, 2): which of branch_logits each example has


def _head(dim: int, labels: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, labels))


class FusionModel(nn.Module):
    """Image encoder + report encoder + fusion + multi-label head.

    With ``fusion = late`` each modality has its own head instead: with both present the
    logits are the image head's plus a learned K x K map of the report head's, which
    starts at zero (the model starts as the image classifier, the stronger branch, and
    the report moves it only as far as training finds it helps); with one modality
    missing they are that modality's own head. In training each head is also fitted as
    a classifier of its own (``TrainingOutputs.branch_logits``), so either stands alone.
    A single-branch model is its branch's head.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        # A single-branch model has no encoder for the other modality: no parameters to
        # train, noise or send.
        self.image_encoder: nn.Module | None = None
        if cfg.branches != "text":
            pretrained_image = cfg.image_encoder == "efficientnet-lite0"
            self.image_encoder = (
                PretrainedImageEncoder(cfg) if pretrained_image else ImageEncoder(d, cfg.dropout)
            )
        self.text_encoder: nn.Module | None = None
        if cfg.branches != "image":
            self.text_encoder = {
                "lstm": LstmTextEncoder,
                "pretrained": PretrainedTextEncoder,
                "transformer": TextEncoder,
            }[cfg.text_encoder](cfg)
        # Set by the trainer when train.alignment-weight > 0: in training mode, forward
        # then also returns each example's alignment loss (see alignment_loss).
        self.return_alignment = False
        self.register_buffer(
            "branch_mask",
            torch.tensor([cfg.branches != "text", cfg.branches != "image"], dtype=torch.float32),
            persistent=False,
        )
        k = len(cfg.labels)
        self.late = cfg.fusion == "late"
        self.head = _head(d, k)  # late fusion: the image's head
        if self.late:
            self.report_head = _head(cfg.report_dim, k)
            self.report_gate = nn.Linear(k, k)
            nn.init.zeros_(self.report_gate.weight)
            nn.init.zeros_(self.report_gate.bias)
        else:
            self.fusion = Fusion(cfg.fusion, d, cfg.text_heads, cfg.dropout, cfg.report_dim)

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, S, S) or cached features -> patches (B, P, D), pooled (B, D).

        Zeros without an image branch.
        """
        if self.image_encoder is None:
            b, d = image.shape[0], self.cfg.embed_dim
            return image.new_zeros(b, 1, d), image.new_zeros(b, d)
        return self.image_encoder(image)

    def encode_text(
        self, report_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L), or cached features -> token states (B, L, D_t), pooled (B, D_t), mask (B, L).

        D_t is model.text-dim (embed-dim unless set). Zeros without a text branch.
        """
        if self.text_encoder is None:
            b, d = report_ids.shape[0], self.cfg.report_dim
            zeros = self.branch_mask.new_zeros
            return zeros(b, 1, d), zeros(b, d), report_ids.new_zeros(b, 1, dtype=torch.bool)
        return self.text_encoder(report_ids)

    def _features(
        self, image: torch.Tensor, report_ids: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused (B, D), modality weights (B, 2), pooled image and report, presence."""
        if self.late:
            raise ValueError("model.fusion = 'late' combines logits, not features")
        patches, pooled_image = self.encode_image(image)
        tokens, pooled_report, token_mask = self.encode_text(report_ids)
        present = present * self.branch_mask  # a missing branch is a missing modality
        fused, weights = self.fusion(
            patches, pooled_image, tokens, pooled_report, token_mask, present
        )
        return fused, weights, pooled_image, pooled_report, present

    def fuse(
        self, image: torch.Tensor, report_ids: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused features (B, D) and per-example modality weights (B, 2)."""
        fused, weights, *_ = self._features(image, report_ids, present)
        return fused, weights

    def forward(
        self, image: torch.Tensor, report_ids: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor | TrainingOutputs:
        """Logits (B, K); in training, TrainingOutputs where the loss needs more.

        That is with ``return_alignment`` (the alignment term) and with late fusion
        (each head's own logits).
        """
        if self.late:
            return self._late(image, report_ids, present)
        fused, _, pooled_image, pooled_report, present = self._features(image, report_ids, present)
        logits = self.head(fused)
        if self.return_alignment and self.training:
            return TrainingOutputs(logits, alignment_loss(pooled_image, pooled_report, present))
        return logits

    def _late(
        self, image: torch.Tensor, report_ids: torch.Tensor, present: torch.Tensor
    ) -> torch.Tensor | TrainingOutputs:
        """Late fusion: see the class docstring."""
        _, pooled_image = self.encode_image(image)
        _, pooled_report, _ = self.encode_text(report_ids)
        present = present * self.branch_mask
        m_img, m_rep = present[:, :1], present[:, 1:]
        image_logits, report_logits = self.head(pooled_image), self.report_head(pooled_report)
        both = image_logits + self.report_gate(report_logits) * m_rep
        logits = m_img * both + (1 - m_img) * m_rep * report_logits
        if not self.training or self.cfg.branches != "fused":  # one branch: its own head
            return logits
        alignment = None
        if self.return_alignment:
            alignment = alignment_loss(pooled_image, pooled_report, present)
        return TrainingOutputs(
            logits, alignment, torch.stack([image_logits, report_logits], dim=1), present
        )


def alignment_loss(
    image: torch.Tensor, report: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """Per-example 1 - cos(image_i, report_i), 0 where either modality is missing.

    Each example's term depends on its own embeddings only. The usual in-batch
    contrastive (InfoNCE) loss compares every image with every other example's report,
    which couples the examples of a batch: one record's gradient then depends on the
    others, and DP-SGD's per-example clipping no longer bounds any one record's
    influence. This aligns each radiograph with its own report instead (a joint
    embedding, made DP-compatible). Both embeddings need the same width: a narrower
    report projection (model.text-dim) has no alignment term.
    """
    if image.shape[-1] != report.shape[-1]:
        raise ConfigError(
            f"train.alignment-weight: the image ({image.shape[-1]}) and report "
            f"({report.shape[-1]}) embeddings differ in width; set model.text-dim = 0"
        )
    both = present[:, 0] * present[:, 1]
    return (1.0 - F.cosine_similarity(image, report, dim=-1, eps=1e-6)) * both
