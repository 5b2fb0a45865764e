import pytest
import torch

from shared_model.config import FUSION_MODES, ModelConfig
from shared_model.engine import MultiLabelBCE
from shared_model.model import FusionModel, TrainingOutputs

B, L = 5, 16


def inputs(cfg: ModelConfig, present: list[list[float]] | None = None):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(B, 1, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.randint(4, cfg.text_vocab_buckets, (B, cfg.max_report_tokens), generator=g)
    ids[:, L:] = 0  # padding
    mask = torch.tensor(present or [[1.0, 1.0]] * B)
    return image, ids, mask


@pytest.fixture(params=FUSION_MODES)
def cfg(request):
    return ModelConfig(fusion=request.param, max_report_tokens=32)


def test_shapes_every_mode(cfg):
    model = FusionModel(cfg)
    image, ids, present = inputs(cfg)
    patches, pooled = model.encode_image(image)
    assert patches.shape == (B, (cfg.image_size // 16) ** 2, cfg.embed_dim)
    assert pooled.shape == (B, cfg.embed_dim)
    tokens, pooled_text, mask = model.encode_text(ids)
    assert tokens.shape == (B, cfg.max_report_tokens, cfg.embed_dim)
    assert pooled_text.shape == (B, cfg.embed_dim) and mask.shape == ids.shape
    if cfg.fusion == "late":
        with pytest.raises(ValueError, match="combines logits"):
            model.fuse(image, ids, present)
        out = model(image, ids, present)
        assert isinstance(out, TrainingOutputs) and out.alignment is None
        assert out.branch_logits.shape == (B, 2, len(cfg.labels))
    else:
        fused, weights = model.fuse(image, ids, present)
        assert fused.shape == (B, cfg.embed_dim) and weights.shape == (B, 2)
    assert model.eval()(image, ids, present).shape == (B, len(cfg.labels))


def test_missing_modality_is_never_read(cfg):
    """The placeholder of an absent modality does not reach the output (no poisoning)."""
    model = FusionModel(cfg).eval()
    present = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]
    image, ids, mask = inputs(cfg, present)
    out = model(image, ids, mask)
    garbage_image = image.clone()
    garbage_image[mask[:, 0] == 0] = torch.randn_like(garbage_image[mask[:, 0] == 0]) * 100
    garbage_ids = ids.clone()
    garbage_ids[mask[:, 1] == 0] = torch.randint(
        4, 100, (int((mask[:, 1] == 0).sum()), ids.shape[1])
    )
    out2 = model(garbage_image, garbage_ids, mask)
    assert torch.allclose(out, out2, atol=1e-5)
    # ...whereas a present modality does matter
    changed = image.clone()
    changed[2] = 1 - changed[2]
    assert not torch.allclose(model(changed, ids, mask)[2], out[2])


def test_missing_modality_gets_no_gradient(cfg):
    model = FusionModel(cfg)
    image, ids, _ = inputs(cfg)
    present = torch.tensor([[0.0, 1.0]] * B)
    labels = torch.randint(0, 2, (B, len(cfg.labels))).float()
    MultiLabelBCE()(model(image, ids, present), labels).backward()  # the training loss
    image_grads = [p.grad for p in model.image_encoder.parameters()]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in image_grads)
    assert any(
        p.grad is not None and torch.count_nonzero(p.grad) > 0
        for p in model.text_encoder.parameters()
    )


def test_both_missing_is_finite_and_gated_weights_follow_presence():
    cfg = ModelConfig(fusion="gated", max_report_tokens=32)
    model = FusionModel(cfg)
    present = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]
    image, ids, mask = inputs(cfg, present)
    assert torch.isfinite(model(image, ids, mask)).all()
    _, weights = model.fuse(image, ids, mask)
    assert torch.allclose(weights[0], torch.zeros(2))
    assert torch.allclose(weights[1], torch.tensor([1.0, 0.0]))
    assert torch.allclose(weights[2], torch.tensor([0.0, 1.0]))
    assert torch.allclose(weights[3:].sum(-1), torch.ones(2), atol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "gated", "late"])
@pytest.mark.parametrize(
    ("branch", "unused"), [("image", "text_encoder"), ("text", "image_encoder")]
)
def test_a_single_branch_model_has_no_other_encoder_and_ignores_that_input(fusion, branch, unused):
    from opacus.validators import ModuleValidator

    from shared_model.config import ConfigError

    cfg = ModelConfig(fusion=fusion, branches=branch, max_report_tokens=32)
    model = FusionModel(cfg).eval()
    fused_model = FusionModel(ModelConfig(fusion=fusion, max_report_tokens=32))
    assert getattr(model, unused) is None
    assert not any(k.startswith(unused) for k in model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < sum(p.numel() for p in fused_model.parameters())
    image, ids, present = inputs(cfg)
    out = model(image, ids, present)
    if branch == "image":  # any report, or none, changes nothing
        other = model(image, torch.zeros_like(ids), present * torch.tensor([1.0, 0.0]))
    else:
        other = model(torch.rand_like(image), ids, present * torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out, other)
    assert ModuleValidator.validate(model.train(), strict=False) == []
    with pytest.raises(ConfigError, match="needs both branches"):
        ModelConfig(fusion="cross_attention", branches=branch)


def test_late_fusion_starts_as_the_image_model_and_each_head_stands_alone():
    """Both present: the image head's logits (the report's map starts at zero); one
    missing: the other's own head. Once the map has learned, the report moves the output."""
    cfg = ModelConfig(fusion="late", max_report_tokens=32)
    model = FusionModel(cfg).eval()
    present = [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    image, ids, mask = inputs(cfg, present)
    out = model(image, ids, mask)
    image_logits = model.head(model.encode_image(image)[1])
    report_logits = model.report_head(model.encode_text(ids)[1])
    torch.testing.assert_close(out[:2], image_logits[:2])
    torch.testing.assert_close(out[2], report_logits[2])
    assert torch.count_nonzero(out[4]) == 0  # nothing present, nothing predicted
    torch.nn.init.normal_(model.report_gate.weight)
    moved = model(image, ids, mask)
    assert not torch.allclose(moved[0], out[0]) and not torch.allclose(moved[3], out[3])
    torch.testing.assert_close(moved[1:3], out[1:3])  # one modality: no map involved


def test_late_fusion_trains_each_head_on_its_own_examples_only():
    """The training loss adds each present head's BCE; an absent modality's head adds
    nothing, so its placeholder never trains it."""
    cfg = ModelConfig(fusion="late", max_report_tokens=32)
    model = FusionModel(cfg)
    image, ids, mask = inputs(cfg, [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    labels = torch.randint(
        0, 2, (B, len(cfg.labels)), generator=torch.Generator().manual_seed(1)
    ).float()
    out = model(image, ids, mask)
    loss = MultiLabelBCE(reduction="none")
    fused_only = loss.per_example(out.logits, labels)
    expected = fused_only.clone()
    for i, (has_image, has_report) in enumerate(mask.tolist()):
        for branch, has in enumerate((has_image, has_report)):
            if has:
                expected[i] += loss.per_example(
                    out.branch_logits[i : i + 1, branch], labels[i : i + 1]
                )[0]
    torch.testing.assert_close(loss(out, labels), expected)
    assert (loss(out, labels) > fused_only).all()
    model.zero_grad()
    loss(out, labels)[[2, 4]].sum().backward()  # the examples without a radiograph
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.head.parameters())
