"""The fusion model under Opacus: validation, per-example gradients, clipping."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from torch.utils.data import TensorDataset

from client.dp.engine import make_private
from shared_model.config import FUSION_MODES, ModelConfig
from shared_model.engine import MultiLabelBCE, make_loss
from shared_model.model import FusionModel
from tests.support.dp import CFG, batch, one_dp_epoch, own_grads, per_sample_grads, policy
from tests.support.tier import examples

warnings.filterwarnings("ignore", message="Full backward hook is firing")


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_opacus_validator_accepts_the_model(fusion):
    assert ModuleValidator.validate(FusionModel(ModelConfig(fusion=fusion)), strict=False) == []


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_per_example_gradients_are_finite_and_independent(fusion):
    """Opacus's per-example gradient of example i equals the gradient of i alone:
    no layer mixes examples (which would break per-example clipping)."""
    cfg = ModelConfig(fusion=fusion, **CFG)
    torch.manual_seed(0)
    model = FusionModel(cfg)
    image, ids, present, labels = batch(cfg, 4)
    loss_fn = MultiLabelBCE(None, "sum")  # the training loss (late fusion: each head's too)
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss_fn(gsm(image, ids, present), labels).backward()
    for i in range(4):
        model.zero_grad()
        solo = FusionModel(cfg)
        solo.load_state_dict(model.state_dict())
        loss_fn(
            solo(image[i : i + 1], ids[i : i + 1], present[i : i + 1]), labels[i : i + 1]
        ).backward()
        for (name, p), q in zip(model.named_parameters(), solo.parameters(), strict=True):
            assert torch.isfinite(p.grad_sample[i]).all(), name
            expected = q.grad if q.grad is not None else torch.zeros_like(q)
            assert torch.allclose(p.grad_sample[i], expected, atol=1e-5), (name, i)


@settings(max_examples=examples(15), deadline=None)
@given(
    c=st.floats(0.01, 5.0),
    scale=st.floats(0.1, 50.0),
    seed=st.integers(0, 10_000),
    fusion=st.sampled_from(FUSION_MODES),
)
def test_clipped_per_example_gradient_norm_is_bounded(c, scale, seed, fusion):
    cfg = ModelConfig(fusion=fusion, **CFG)
    torch.manual_seed(seed)
    model = FusionModel(cfg)
    image, ids, present, labels = batch(cfg, 1, seed=seed, scale=scale)
    data = TensorDataset(image, ids, present, labels)
    loss_fn = make_loss(None)
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn,
        data,
        1,
        policy(c),
        noise_multiplier=0.0,
    )
    loss_fn(private.model(image, ids, present), labels).backward()
    raw = torch.sqrt(
        sum(
            (p.grad_sample**2).sum()
            for p in private.model.parameters()
            if p.grad_sample is not None
        )
    )
    private.optimizer.clip_and_accumulate()
    clipped = torch.sqrt(
        sum(
            (p.summed_grad**2).sum()
            for p in private.model.parameters()
            if getattr(p, "summed_grad", None) is not None
        )
    )
    assert clipped <= c * (1 + 1e-4)
    assert clipped == pytest.approx(min(float(raw), c), rel=1e-3)


def test_without_noise_and_clipping_dp_training_equals_plain_training():
    cfg = ModelConfig(**CFG)
    torch.manual_seed(0)
    plain = FusionModel(cfg)
    dp = FusionModel(cfg)
    dp.load_state_dict(plain.state_dict())
    image, ids, present, labels = batch(cfg, 8)
    loss_fn = make_loss(None)
    opt = torch.optim.SGD(plain.parameters(), lr=0.5)
    loss_fn(plain(image, ids, present), labels).backward()
    opt.step()
    data = TensorDataset(image, ids, present, labels)
    private = make_private(
        dp,
        torch.optim.SGD(dp.parameters(), lr=0.5),
        loss_fn,
        data,
        8,
        policy(1e6),
        noise_multiplier=0.0,
    )
    private.loss_fn(private.model(image, ids, present), labels).backward()
    private.optimizer.step()
    for (name, a), b in zip(plain.named_parameters(), dp.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch", "ew"])
def test_every_grad_sample_mode_trains_through_empty_poisson_batches(mode):

    cfg = ModelConfig(**CFG)
    model = FusionModel(cfg)
    data = TensorDataset(*batch(cfg, 12))
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        make_loss(None),
        data,
        1,
        policy(1.0, mode, secure=False),  # a seeded generator: tests only
        noise_multiplier=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    before = [p.detach().clone() for p in private.raw_model.parameters()]
    torch.manual_seed(3)  # Poisson sampling at q = 1/12: some batches are empty
    stats = one_dp_epoch(private)
    assert stats.steps == 12 and stats.examples < 12 * 3
    assert all(torch.isfinite(p).all() for p in private.raw_model.parameters())
    assert any(
        not torch.equal(a, b) for a, b in zip(before, private.raw_model.parameters(), strict=True)
    )
    assert not any(k.startswith("_module.") for k in private.raw_model.state_dict())


@pytest.mark.parametrize(
    ("preset", "mode", "extra"),
    [
        ("cnn-lstm-concat", "hooks", {}),
        ("cnn-lstm-concat", "functorch", {}),  # ghost refuses layers reused per time step
        ("efficientnet-minilm-concat", "hooks", {}),
        ("efficientnet-minilm-concat", "ghost", {}),
        ("efficientnet-minilm-concat", "hooks", {"model.encoder-mode": "lora"}),
        ("efficientnet-minilm-concat", "ghost", {"model.encoder-mode": "lora"}),
        ("efficientnet-minilm-concat", "functorch", {"model.encoder-mode": "lora"}),
        ("cnn-transformer-cross-attention", "hooks", {}),
        ("cnn-transformer-cross-attention", "ghost", {}),
        ("cnn-transformer-gated", "hooks", {}),
        ("cnn-transformer-gated", "ghost", {}),
    ],
)
def test_every_preset_trains_under_dp(preset, mode, extra):
    from shared_model.config import PRESETS, RunConfig
    from shared_model.weights import initial_model

    model_cfg = RunConfig.from_run_config({**PRESETS[preset], **extra}).model
    cfg = ModelConfig(**{**model_cfg.__dict__, **CFG})
    model = initial_model(cfg, seed=0)  # pretrained weights, frozen parts, LoRA adapters
    assert ModuleValidator.validate(model, strict=False) == []
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    private = make_private(
        model,
        torch.optim.SGD(trainable, lr=0.1),
        make_loss(None),
        TensorDataset(*batch(cfg, 16)),
        8,
        policy(1.0, mode),
        noise_multiplier=1.0,
    )
    stats = one_dp_epoch(private)
    assert stats.steps == 2
    after = [p for p in private.raw_model.parameters() if p.requires_grad]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_lstm_per_sample_gradients_are_each_examples_own_and_ghost_is_refused():
    from shared_model.config import ConfigError, RunConfig
    from shared_model.engine import MultiLabelBCE

    def loss(model, inputs):
        return MultiLabelBCE(None, "sum")(model(*inputs[:3]), inputs[3])

    torch.manual_seed(0)
    model = FusionModel(ModelConfig(**CFG, text_encoder="lstm", fusion="concat")).train()
    inputs = batch(model.cfg, 4)
    grads = per_sample_grads(model, loss, inputs)
    assert any(name.startswith("text_encoder.forward_lstm.hh") for name in grads)
    for i in range(4):  # each step's linear layers accumulate per-example gradients
        for name, g in own_grads(model, loss, inputs, i).items():
            torch.testing.assert_close(grads[name][i], g, atol=1e-5, rtol=1e-3, msg=name)
    with pytest.raises(ConfigError, match="only bk, hooks and functorch"):
        RunConfig.from_run_config(
            {"model.text-encoder": "lstm", "privacy.grad-sample-mode": "ghost"}
        )
