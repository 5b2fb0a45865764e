"""Pretrained encoders (EfficientNet-Lite0, a Hugging Face text encoder), modes and the wire.

These load the bundled all-MiniLM-L6-v2 (22.7M parameters) and EfficientNet-Lite0
(3.4M without its classifier) from the installed packages, offline.
"""

import shutil

import pytest
import torch
from opacus import GradSampleModule

from shared_model.config import ConfigError, ModelConfig
from shared_model.text import text_model_path, tokenizer_for
from shared_model.weights import (
    base_fingerprint,
    hospital_model,
    initial_model,
    load_shared_state,
    shared_state,
)

PRETRAINED = dict(
    image_encoder="efficientnet-lite0",
    text_encoder="pretrained",
    fusion="concat",
    max_report_tokens=16,
    embed_dim=32,
)
REPORTS = ["Heart size is normal. No effusion.", "", "Mild cardiomegaly.", "Clear lungs."]


def batch(cfg: ModelConfig, n: int = 4):
    torch.manual_seed(7)
    ids, present = tokenizer_for(cfg).encode(REPORTS[:n])
    images = torch.rand(n, 1, cfg.image_size, cfg.image_size)
    return images, ids, torch.stack([torch.ones(n), present.float()], 1)


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_the_pretrained_tokenizer_gives_the_models_own_ids_and_marks_empty_reports():
    ids, present = tokenizer_for(ModelConfig(**PRETRAINED, encoder_mode="frozen")).encode(REPORTS)
    assert ids.shape == (4, 16) and ids.dtype == torch.int64
    assert present.tolist() == [True, False, True, True]
    assert ids[0, 0] == 101 and (ids[1] == 0).all()  # [CLS] first; an empty report: all pad
    vocab = (text_model_path(ModelConfig()) / "vocab.txt").read_text().split("\n")
    assert vocab[int(ids[0, 1])] == "heart"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"encoder_mode": "full"}, "efficientnet-lite0 has BatchNorm"),
        ({"image_encoder": "cnn", "text_encoder": "transformer", "encoder_mode": "lora"}, "LoRA"),
        ({"text_weights": "x.pt"}, "model.text-weights: only for"),
    ],
)
def test_impossible_combinations_are_refused_at_start(settings, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**{**PRETRAINED, "encoder_mode": "frozen", **settings})


def test_missing_or_broken_pretrained_files_fail_at_start_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model.text-model: .*\(no config.json\)"):
        initial_model(ModelConfig(**PRETRAINED, encoder_mode="frozen", text_model=str(tmp_path)), 0)
    broken = tmp_path / "broken"
    shutil.copytree(text_model_path(ModelConfig()), broken)
    (broken / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError, match=r"model.text-model: cannot load .*broken"):
        initial_model(ModelConfig(**PRETRAINED, encoder_mode="frozen", text_model=str(broken)), 0)
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ConfigError, match=r"model.image-weights: .* does not fit .*efficientnet"):
        initial_model(ModelConfig(**PRETRAINED, encoder_mode="frozen", image_weights=str(wrong)), 0)


def test_only_trainable_parameters_travel_and_the_rest_is_identified_by_hash():
    sizes = {}
    for mode in ("frozen", "lora"):
        cfg = ModelConfig(**PRETRAINED, encoder_mode=mode)
        server = initial_model(cfg, seed=0)
        sent = shared_state(server)
        sizes[mode] = sum(t.numel() for t in sent.values())
        assert not any(k.startswith("image_encoder.backbone.") for k in sent)
        backbone_sent = [k for k in sent if k.startswith("text_encoder.backbone.")]
        if mode == "frozen":
            assert backbone_sent == []
        else:  # the LoRA adapters, and nothing of the base weights
            assert backbone_sent and all(".lora_" in k for k in backbone_sent)
        hospital = hospital_model(cfg, 0, sent)
        assert base_fingerprint(hospital) == base_fingerprint(server)
        for name, value in shared_state(hospital).items():
            torch.testing.assert_close(value, sent[name])
        with pytest.raises(ValueError, match="does not fit this model's trainable"):
            load_shared_state(hospital, {k: v for k, v in list(sent.items())[1:]})
    total = sum(
        p.numel()
        for p in initial_model(ModelConfig(**PRETRAINED, encoder_mode="frozen"), 0).parameters()
    )
    assert sizes["frozen"] < sizes["lora"] < total / 20


@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_hospital_copies_share_frozen_weights_and_nothing_that_trains(mode):
    """Copies share the frozen tensors (no copy of the encoder per round); a training
    step on one copy moves neither the other copy nor the frozen weights."""
    cfg = ModelConfig(**PRETRAINED, encoder_mode=mode)
    one, two = hospital_model(cfg, 0), hospital_model(cfg, 0)
    fingerprint = base_fingerprint(two)
    frozen = [n for n, p in one.named_parameters() if not p.requires_grad]
    assert frozen, "a pretrained encoder has frozen weights"
    params_two = dict(two.named_parameters())
    assert all(p is params_two[n] for n, p in one.named_parameters() if not p.requires_grad)
    assert not any(p is params_two[n] for n, p in one.named_parameters() if p.requires_grad)
    before = {n: v.clone() for n, v in shared_state(two).items()}
    one.train()
    images, ids, present = batch(cfg)
    torch.optim.SGD([p for p in one.parameters() if p.requires_grad], lr=1.0).zero_grad()
    one(images, ids, present).sum().backward()
    for p in one.parameters():
        if p.requires_grad and p.grad is not None:
            p.data.add_(p.grad, alpha=-1.0)
    assert any(not torch.equal(v, before[n]) for n, v in shared_state(one).items()), (
        "the step moved the first copy"
    )
    for name, value in shared_state(two).items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert base_fingerprint(one) == base_fingerprint(two) == fingerprint


def test_changed_frozen_weights_change_the_fingerprint(tmp_path):
    cfg = ModelConfig(**PRETRAINED, encoder_mode="frozen")
    copy = tmp_path / "minilm"
    shutil.copytree(text_model_path(cfg), copy)
    model = initial_model(cfg, 0)
    other = initial_model(ModelConfig(**PRETRAINED, encoder_mode="frozen", text_model=str(copy)), 0)
    assert base_fingerprint(other) == base_fingerprint(model)  # a copy is the same model
    with torch.no_grad():
        other.text_encoder.backbone.embeddings.word_embeddings.weight[5, 0] += 1e-3
    assert base_fingerprint(other) != base_fingerprint(model)


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_cached_backbone_features_give_the_same_output_as_the_backbone(fusion):
    cfg = ModelConfig(**{**PRETRAINED, "fusion": fusion}, encoder_mode="frozen")
    model = initial_model(cfg, 0).eval()
    images, ids, present = batch(cfg)
    with torch.no_grad():
        live = model(images, ids, present)
        image_feats = model.image_encoder.backbone_features(images)
        text_feats = model.text_encoder.backbone_features(ids)
        cached = model(image_feats, text_feats, present)
    pooled = fusion != "cross_attention"
    assert image_feats.shape[1] == 1 if pooled else image_feats.shape[1] > 1
    assert text_feats.shape[1] == (1 if pooled else cfg.max_report_tokens)
    torch.testing.assert_close(cached, live, rtol=1e-4, atol=1e-5)


def test_lora_per_example_gradients_are_each_examples_own():
    """Under Opacus (hooks), each example's LoRA gradient is what it alone would give."""
    cfg = ModelConfig(**PRETRAINED, encoder_mode="lora")
    model = no_dropout(initial_model(cfg, 0))
    with torch.no_grad():  # LoRA B starts at zero: give the adapters something to pass on
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    images, ids, present = batch(cfg)
    labels = torch.randint(0, 2, (4, len(cfg.labels))).float()
    dp = GradSampleModule(model, loss_reduction="sum")
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        dp(images, ids, present), labels, reduction="sum"
    )
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    per_example = {n: p.grad_sample.clone() for n, p in lora.items()}
    assert lora and all(g.shape[0] == 4 for g in per_example.values())
    dp.disable_hooks()
    for i in (0, 1):  # example 1 has no report: its text adapters get nothing
        model.zero_grad()
        single = torch.nn.functional.binary_cross_entropy_with_logits(
            model(images[i : i + 1], ids[i : i + 1], present[i : i + 1]),
            labels[i : i + 1],
            reduction="sum",
        )
        grads = torch.autograd.grad(single, list(lora.values()), allow_unused=True)
        for (name, p), g in zip(lora.items(), grads, strict=True):
            expected = torch.zeros_like(p) if g is None else g
            torch.testing.assert_close(per_example[name][i], expected, atol=1e-6, rtol=1e-4)


def _own_hf_folder(tmp_path, kind: str):
    """A user's own encoder folder: a small BERT or DistilBERT with MiniLM's vocabulary."""
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    folder = tmp_path / kind
    torch.manual_seed(3)
    if kind == "bert":
        model = BertModel(
            BertConfig(
                hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
            )
        )
    else:  # no position or token-type ids in its forward
        model = DistilBertModel(DistilBertConfig(dim=48, n_layers=1, n_heads=2, hidden_dim=64))
    model.save_pretrained(folder)
    minilm = text_model_path(ModelConfig())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("mode", ["frozen", "lora"])
def test_a_users_own_hugging_face_folder_trains_under_dp(tmp_path, kind, mode):
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    folder = _own_hf_folder(tmp_path, kind)
    cfg = ModelConfig(
        **{**PRETRAINED, "image_encoder": "cnn"}, encoder_mode=mode, text_model=str(folder)
    )
    model = initial_model(cfg, 0)
    assert model.text_encoder.norm.normalized_shape == (32 if kind == "bert" else 48,)
    images, ids, present = batch(cfg)
    labels = torch.randint(0, 2, (4, len(cfg.labels))).float()
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    private, optimizer, loader = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(trainable, lr=0.1),
        data_loader=DataLoader(TensorDataset(images, ids, present, labels), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    for x, r, m, y in loader:
        torch.nn.functional.binary_cross_entropy_with_logits(private(x, r, m), y).backward()
        optimizer.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, trainable, strict=True))


def test_cross_attention_keeps_report_tokens_as_wide_as_the_image():
    """The documented `-c model.fusion="cross_attention"` on simulate's preset (text-dim 8)."""
    cfg = ModelConfig(**{**PRETRAINED, "encoder_mode": "frozen", "text_dim": 8})
    assert cfg.report_dim == 8
    cross = ModelConfig(
        **{**PRETRAINED, "encoder_mode": "frozen", "text_dim": 8, "fusion": "cross_attention"}
    )
    assert cross.report_dim == PRETRAINED["embed_dim"]


@pytest.mark.parametrize(
    "settings",
    [
        {"image_encoder": "cnn", "text_encoder": "transformer"},
        {"image_encoder": "cnn", "text_encoder": "lstm"},
    ],
)
def test_a_narrower_report_projection_is_refused_where_nothing_uses_it(settings):
    with pytest.raises(ConfigError, match=r"model\.text-dim = 8: only the pretrained"):
        ModelConfig(**{**PRETRAINED, "encoder_mode": "frozen", "text_dim": 8, **settings})
    # the model's own width, or 0, is the default model wherever it is set
    for width in (0, PRETRAINED["embed_dim"]):
        ModelConfig(**{**PRETRAINED, "encoder_mode": "frozen", "text_dim": width, **settings})


@pytest.mark.parametrize(
    ("fusion", "branches"),
    [
        ("concat", "fused"),
        ("concat", "image"),
        ("concat", "text"),
        ("gated", "fused"),
        ("late", "fused"),
        ("late", "text"),
    ],
)
def test_a_narrower_report_projection_feeds_the_fusion(fusion, branches):
    settings = {**PRETRAINED, "fusion": fusion, "encoder_mode": "frozen", "branches": branches}
    cfg = ModelConfig(**settings, text_dim=8)
    model = initial_model(cfg, 0).eval()
    images, ids, present = batch(cfg)
    tokens, pooled, _ = model.encode_text(ids)
    assert pooled.shape == (4, 8) and tokens.shape[-1] == 8
    if fusion == "concat":
        assert model.fusion.mix.in_features == 32 + 8 and model.fusion.mix.out_features == 32
    if branches != "image":
        assert model.text_encoder.proj.weight.shape == (8, 384)
    trained = sum(t.numel() for t in shared_state(model).values())
    wide = shared_state(initial_model(ModelConfig(**settings), 0))
    fewer = {  # (32 - 8) x (384 + 1) fewer in the projection, and 24 inputs of a layer
        "concat": 24 * 385 + 24 * 32,  # the mix: 32 outputs
        "gated": 24 * 385 + 24 * 32 + 24 * 2,  # phi_report (32 outputs), the gate (2)
        # the report head: its LayerNorm, its 32 -> 32 layer now 8 -> 8, and 7 labels
        "late": 24 * 385 + 2 * 24 + (32 * 33 - 8 * 9) + 24 * 7,
    }[fusion]
    if branches == "fused":
        assert sum(t.numel() for t in wide.values()) - trained == fewer
    with torch.no_grad():
        logits = model(images, ids, present)
        no_report = model(images, ids, present * torch.tensor([1.0, 0.0]))
        changed = model(images, torch.flip(ids, [0]), present * torch.tensor([1.0, 0.0]))
    assert logits.shape == (4, len(cfg.labels)) and torch.isfinite(logits).all()
    torch.testing.assert_close(no_report, changed)  # a missing report never reaches the output


def test_a_narrower_report_projection_has_no_alignment_term():
    cfg = ModelConfig(**PRETRAINED, encoder_mode="frozen", text_dim=8)
    model = initial_model(cfg, 0).train()
    model.return_alignment = True
    with pytest.raises(ConfigError, match=r"train\.alignment-weight: .* differ in width"):
        model(*batch(cfg))
