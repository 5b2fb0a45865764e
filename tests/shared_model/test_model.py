import pytest
import torch

from shared_model.config import FUSION_MODES, ModelConfig
from shared_model.model import FusionModel

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
    fused, weights = model.fuse(image, ids, present)
    assert fused.shape == (B, cfg.embed_dim) and weights.shape == (B, 2)
    assert model(image, ids, present).shape == (B, len(cfg.labels))


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
    model(image, ids, present).sum().backward()
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


@pytest.mark.parametrize("fusion", ["concat", "gated"])
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
