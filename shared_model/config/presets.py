"""Named model settings (``fedfusion simulate --preset NAME``): the literature's systems."""

from __future__ import annotations

__all__ = ["PRESETS", "SIMULATE_DEFAULTS"]

PRESETS: dict[str, dict[str, str | int]] = {
    # a CNN and a bidirectional LSTM over the report, concatenated
    "cnn-lstm-concat": {"model.text-encoder": "lstm", "model.fusion": "concat"},
    # pretrained, frozen encoders (ImageNet EfficientNet-Lite0 and all-MiniLM-L6-v2, a
    # BERT-family encoder), concatenated; their projections, fusion and head train. The
    # report's projection is 8 wide: under DP-SGD the weaker branch then takes a smaller
    # share of each record's clipping norm and adds less noise (docs/models.md)
    "efficientnet-minilm-concat": {
        "model.image-encoder": "efficientnet-lite0",
        "model.text-encoder": "pretrained",
        "model.fusion": "concat",
        "model.encoder-mode": "frozen",
        "model.text-dim": 8,
    },
    # the same encoders, fused late: a head per modality, the report's logits mapped onto
    # the image's through a learned map that starts at zero; one modality missing, the
    # other's own head (each head is trained as a classifier of its own too)
    "efficientnet-minilm-late": {
        "model.image-encoder": "efficientnet-lite0",
        "model.text-encoder": "pretrained",
        "model.fusion": "late",
        "model.encoder-mode": "frozen",
    },
    # a CNN and a transformer, report tokens attending to image patches
    "cnn-transformer-cross-attention": {
        "model.text-encoder": "transformer",
        "model.fusion": "cross_attention",
    },
    # a CNN and a transformer, concatenated (the run config's default model)
    "cnn-transformer-concat": {"model.text-encoder": "transformer", "model.fusion": "concat"},
    # a CNN and a transformer, with learned modality weights (a gated multimodal unit)
    "cnn-transformer-gated": {"model.text-encoder": "transformer", "model.fusion": "gated"},
}

# What `fedfusion simulate` (and so `make simulate`) runs without --preset: the frozen
# pretrained encoders, whose cached features make a short DP run learn, at the learning
# rate and clipping norm `make bench-utility` chose for them with DP and SecAgg+. Only the
# simulation's default: a server's [run] table still starts from the run config defaults.
SIMULATE_DEFAULTS: dict[str, str | float] = {
    **PRESETS["efficientnet-minilm-concat"],
    "train.learning-rate": 0.1,
    "privacy.max-grad-norm": 2.0,
}
