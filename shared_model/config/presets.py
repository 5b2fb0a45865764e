"""Named model settings (``fedfusion simulate --preset NAME``): the literature's systems."""

from __future__ import annotations

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, str]] = {
    # a CNN and a bidirectional LSTM over the report, concatenated
    "cnn-lstm-concat": {"model.text-encoder": "lstm", "model.fusion": "concat"},
    # pretrained, frozen encoders (ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2, a
    # BERT-family encoder), concatenated; their projections, fusion and head train
    "efficientnet-minilm-concat": {
        "model.image-encoder": "efficientnet-lite0",
        "model.text-encoder": "pretrained",
        "model.fusion": "concat",
        "model.encoder-mode": "frozen",
    },
    # a CNN and a transformer, report tokens attending to image patches
    "cnn-transformer-cross-attention": {
        "model.text-encoder": "transformer",
        "model.fusion": "cross_attention",
    },
    # a CNN and a transformer, concatenated (the default model)
    "cnn-transformer-concat": {"model.text-encoder": "transformer", "model.fusion": "concat"},
    # a CNN and a transformer, with learned modality weights (a gated multimodal unit)
    "cnn-transformer-gated": {"model.text-encoder": "transformer", "model.fusion": "gated"},
}
