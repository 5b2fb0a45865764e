"""The shared fusion model's settings (``model.*``): identical at every hospital."""

from __future__ import annotations

from dataclasses import dataclass

from shared_model.config.schema import ConfigError
from shared_model.config.schema import option as _opt

__all__ = [
    "BRANCHES",
    "ENCODER_MODES",
    "FUSION_MODES",
    "IMAGE_ENCODERS",
    "TEXT_ENCODERS",
    "ModelConfig",
]

FUSION_MODES = ("concat", "gated", "cross_attention", "late")
BRANCHES = ("fused", "image", "text")
TEXT_ENCODERS = ("transformer", "lstm", "pretrained")
IMAGE_ENCODERS = ("cnn", "efficientnet-lite0")
ENCODER_MODES = ("full", "frozen", "lora")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the shared fusion model; identical at every hospital."""

    labels: tuple[str, ...] = _opt(
        ("normal", "cardiomegaly", "opacity", "atelectasis", "effusion", "nodule", "other"),
        "Finding labels the head predicts, '|'-separated in the run config.",
    )
    fusion: str = _opt(
        "concat",
        "How image and report are fused: concat, gated (learned per-modality weights, "
        "Z = sum of w_i * phi(M_i)), cross_attention (report tokens attend to image "
        "patches) or late (a head per modality; with both, the image's logits plus a "
        "learned map of the report's that starts at zero; with one, its own head).",
        choices=FUSION_MODES,
    )
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
        "built from linear layers as Opacus's DPLSTM is; grad-sample-mode bk, hooks or "
        "functorch), both from scratch or text-weights; or pretrained (a Hugging Face "
        "encoder folder, model.text-model, followed by a trained projection).",
        choices=TEXT_ENCODERS,
    )
    text_model: str = _opt(
        "",
        "Hugging Face encoder folder (config, weights, tokenizer) for text-encoder = "
        "pretrained, loaded offline; empty: the bundled all-MiniLM-L6-v2. A clinical BERT "
        "folder works the same way.",
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
    lora_rank: int = _opt(8, "Rank r of the LoRA adapters (encoder-mode = lora).", min=1, max=1024)
    lora_alpha: float = _opt(
        16.0, "LoRA scaling alpha (the update is scaled by alpha / r).", min=0.0, min_exclusive=True
    )
    branches: str = _opt(
        "fused",
        "fused (image and report), or one branch alone: image or text. A single-branch "
        "model has no encoder for the other modality at all.",
        choices=BRANCHES,
    )
    image_size: int = _opt(
        64, "Radiographs are resized to image-size x image-size.", min=32, max=2048
    )
    embed_dim: int = _opt(64, "Width of both encoders and the fusion block.", min=8, max=4096)
    text_dim: int = _opt(
        0,
        "Width of the pretrained report encoder's projection (fusion concat, gated or "
        "late; cross_attention keeps embed-dim); 0: embed-dim. Narrower than embed-dim, "
        "the weaker report branch has "
        "fewer parameters to train, which under DP-SGD means less noise and a smaller "
        "share of each record's clipping norm.",
        min=0,
        max=4096,
    )
    text_layers: int = _opt(1, "Transformer blocks in the report encoder.", min=1, max=48)
    text_heads: int = _opt(4, "Attention heads (embed-dim must divide by it).", min=1, max=64)
    text_vocab_buckets: int = _opt(
        4096,
        "Rows of the report embedding; WordPiece ids are hashed into them.",
        min=16,
        max=1 << 20,
    )
    max_report_tokens: int = _opt(
        64, "Reports are truncated/padded to this many tokens.", min=8, max=4096
    )
    dropout: float = _opt(0.0, "Dropout inside the encoders and fusion block.", min=0.0, max=0.9)

    @property
    def report_dim(self) -> int:
        """Width of the pooled report features: text-dim, or embed-dim when it is 0.

        Cross-attention's report tokens must be as wide as the image's: embed-dim.
        """
        return (
            self.embed_dim if self.fusion == "cross_attention" else self.text_dim or self.embed_dim
        )

    def __post_init__(self) -> None:
        narrow_report = self.text_dim and self.text_dim != self.embed_dim
        if narrow_report and self.text_encoder != "pretrained":
            raise ConfigError(
                f"model.text-dim = {self.text_dim}: only the pretrained text encoder's "
                "projection can differ from embed-dim; set model.text-dim = 0 (embed-dim), "
                "or model.text-encoder = pretrained"
            )
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
