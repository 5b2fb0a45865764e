"""Book-keeping clipping: exactly each example's own clipped gradient, in one backward."""

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import TensorDataset

from client.dp.bookkeeping import BookKeeping, bookkeeping_unsupported
from client.dp.engine import make_private, resolve_grad_sample_mode
from shared_model.config import PRESETS, ModelConfig, RunConfig
from shared_model.engine import MultiLabelBCE, make_loss
from shared_model.model import FusionModel
from shared_model.weights import initial_model
from tests.support.dp import CFG, batch, one_dp_epoch, policy
from tests.support.tier import examples

warnings.filterwarnings("ignore", message="Full backward hook is firing")

MODELS = {
    "default (concat)": {},
    "concat": {"model.fusion": "concat"},
    "cross-attention": {"model.fusion": "cross_attention"},
    "cnn-lstm": {"model.text-encoder": "lstm", "model.fusion": "concat"},
    "late (each head's own loss too)": {"model.fusion": "late"},
    "pretrained frozen": dict(PRESETS["efficientnet-minilm-concat"]),
    "pretrained frozen, wide report": {
        **PRESETS["efficientnet-minilm-concat"],
        "model.text-dim": 0,
    },
    "pretrained lora": {**PRESETS["efficientnet-minilm-concat"], "model.encoder-mode": "lora"},
}


def small_model(overrides, seed=0):
    """A small model of the configuration; in eval mode, so that the pretrained text
    model's own dropout does not make each call differ (fedfusion's layers have none)."""
    model_cfg = RunConfig.from_run_config(overrides).model
    cfg = ModelConfig(**{**model_cfg.__dict__, **CFG})
    return initial_model(cfg, seed=seed).eval()


def reference(model, inputs, c, alignment):
    """Each example's gradient computed alone, clipped to c, summed; and the norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    loss_fn = MultiLabelBCE(None, "sum", alignment_weight=alignment)
    for i in range(inputs[0].shape[0]):
        one = tuple(t[i : i + 1] for t in inputs)
        grads = torch.autograd.grad(loss_fn(model(*one[:3]), one[3]), params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
        ]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        norms.append(norm)
        scale = min(1.0, c / (float(norm) + 1e-6))
        total = [t + scale * g for t, g in zip(total, grads, strict=True)]
    return total, torch.stack(norms)


@pytest.mark.parametrize("name", list(MODELS))
@settings(max_examples=examples(4), deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.2, 20.0), clip_quantile=st.floats(0.1, 1.0))
def test_clipped_sum_is_each_examples_own_clipped_gradient(name, seed, scale, clip_quantile):
    torch.manual_seed(seed)
    model = small_model(MODELS[name], seed)
    if model.late:
        model.train()  # late fusion's per-head losses are training outputs; no dropout here
    alignment = 0.5 if name == "default (concat)" else 0.0
    model.return_alignment = alignment > 0
    inputs = batch(model.cfg, 6, seed=seed, scale=scale)
    probe = copy.deepcopy(model)
    _, norms = reference(probe, inputs, 1e9, alignment)
    c = float(torch.quantile(norms, clip_quantile)) * 0.999  # some examples clipped, some not
    expected, expected_norms = reference(probe, inputs, c, alignment)

    bk = BookKeeping(model, c)
    loss = MultiLabelBCE(None, "none", alignment_weight=alignment)(model(*inputs[:3]), inputs[3])
    got_norms = bk.clipped_backward(loss)
    torch.testing.assert_close(got_norms, expected_norms, rtol=1e-4, atol=1e-6)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (n, p), e in zip(params, expected, strict=True):
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        # float32 sums in another order: agree to 5e-5 of the tensor's largest entry (2e-5
        # seen on frozen features of inputs scaled 15x; a wrong clip is off by far more)
        atol = 5e-5 * float(e.abs().max()) + 1e-7
        torch.testing.assert_close(got, e, rtol=1e-4, atol=atol, msg=n)
    clipped = torch.sqrt(sum((p.grad**2).sum() for _, p in params if p.grad is not None))
    assert clipped <= c * inputs[0].shape[0] * (1 + 1e-4)  # each example adds at most c


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_dp_epoch_with_bk_equals_opacus_with_the_same_noise(mode):
    """Same Poisson batches, same seeded noise: bk trains to the same weights as Opacus."""
    cfg = ModelConfig(**CFG)
    data = TensorDataset(*batch(cfg, 24))
    results = []
    for m in ("bk", mode):
        torch.manual_seed(0)
        model = FusionModel(cfg)
        private = make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.5),
            make_loss(None),
            data,
            6,
            policy(0.3, m, secure=False),  # seeded noise: tests only
            noise_multiplier=0.7,
            noise_generator=torch.Generator().manual_seed(1),
        )
        assert private.grad_sample_mode == m
        torch.manual_seed(5)  # the Poisson sampler's draws
        stats = one_dp_epoch(private)
        results.append((stats, dict(private.raw_model.named_parameters())))
    (bk_stats, bk), (op_stats, op) = results
    assert bk_stats.examples == op_stats.examples and bk_stats.steps == op_stats.steps == 4
    assert bk_stats.loss == pytest.approx(op_stats.loss, rel=1e-5)
    for name, p in op.items():
        torch.testing.assert_close(bk[name], p, rtol=1e-4, atol=2e-5, msg=name)


class Scaled(nn.Module):
    """A layer with a bare trainable parameter: no per-sample rule exists for it."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_auto_picks_bk_and_falls_back_to_opacus_for_a_layer_bk_cannot_clip():
    model = FusionModel(ModelConfig(**CFG))
    assert bookkeeping_unsupported(model) == []
    assert resolve_grad_sample_mode("auto", model) == "bk"
    model.head.append(Scaled())
    assert bookkeeping_unsupported(model) == ["head.4 (a Scaled layer with trainable parameters)"]
    assert resolve_grad_sample_mode("auto", model) == "hooks"
    assert resolve_grad_sample_mode("ghost", model) == "ghost"
    with pytest.raises(ValueError, match=r"'bk' cannot clip per example in: head\.4"):
        BookKeeping(model, 1.0)
    assert RunConfig.from_run_config({}).privacy.grad_sample_mode == "auto"


@pytest.mark.parametrize("mode", ["none", "bk", "hooks"])
def test_physical_chunks_change_memory_not_results(mode):
    """train.max-physical-batch-size: the same steps, the same weights, the same loss."""
    from shared_model.engine import train_one_epoch

    cfg = ModelConfig(**CFG)
    data = TensorDataset(*batch(cfg, 24))
    results = []
    for chunk in (0, 5):
        torch.manual_seed(0)
        model = FusionModel(cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn, loader = make_loss(None), torch.utils.data.DataLoader(data, batch_size=12)
        if mode != "none":
            private = make_private(
                model,
                optimizer,
                loss_fn,
                data,
                12,
                policy(0.3, mode, secure=False),
                noise_multiplier=0.7,
                noise_generator=torch.Generator().manual_seed(1),
            )
            model, optimizer, loss_fn, loader = (
                private.model,
                private.optimizer,
                private.loss_fn,
                private.loader,
            )
        torch.manual_seed(5)
        stats = train_one_epoch(model, loader, optimizer, loss_fn, max_physical_batch=chunk)
        if mode != "none":
            assert private.engine.accountant.history[-1][2] == stats.steps  # steps counted
        results.append((stats, [p.detach().clone() for p in model.parameters()]))
    (whole, a), (split, b) = results
    assert whole.steps == split.steps == 2 and whole.examples == split.examples
    assert whole.loss == pytest.approx(split.loss, rel=1e-5)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=2e-5)


class LayerZoo(nn.Module):
    """Every convolution and linear case book-keeping handles on its own code paths."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # bounded: per-example norms
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.twice = nn.Conv2d(8, 8, 1)  # called twice: its calls add up before the norm
        self.wide = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # bounded: the ghost norm
        self.same = nn.Conv2d(16, 16, 3, padding="same")  # string padding: Opacus's rule
        self.tokens = nn.Linear(16, 16)  # 4 positions as tokens; bounded: the ghost norm
        self.out = nn.Linear(16, 1)  # bounded: per-example norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.grouped(torch.tanh(self.plain(x))))  # (B, 8, 4, 4)
        x = torch.tanh(self.wide(torch.tanh(self.twice(torch.tanh(self.twice(x))))))
        x = torch.tanh(self.same(x))  # (B, 16, 2, 2)
        x = torch.tanh(self.tokens(x.flatten(2).transpose(1, 2)))  # (B, 4, 16)
        return self.out(x).mean((1, 2))


def assert_clips_each_examples_own_gradient(model: nn.Module, x: torch.Tensor) -> None:
    """Book-keeping's norms and clipped sum (clip: the median norm) equal the
    example-by-example reference, for every trainable parameter of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_example = [torch.autograd.grad(model(x[i : i + 1]).sum(), params) for i in range(len(x))]
    norms = torch.stack([torch.sqrt(sum((g**2).sum() for g in gs)) for gs in per_example])
    c = float(norms.median())
    expected = [
        sum(
            min(1.0, c / (float(n) + 1e-6)) * gs[k]
            for n, gs in zip(norms, per_example, strict=True)
        )
        for k in range(len(params))
    ]
    got_norms = BookKeeping(model, c).clipped_backward(model(x))
    torch.testing.assert_close(got_norms, norms, rtol=1e-4, atol=1e-6)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (name, p), e in zip(named, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()), msg=name)


@pytest.mark.parametrize("limit", ["default", "bounded"])
def test_every_layer_path_clips_each_examples_own_gradient(limit, monkeypatch):
    """Materialized per-example gradients (the batch as convolution groups) and the
    memory-bounded paths (ghost norm, patches) both give each example's clipped sum."""
    if limit == "bounded":
        monkeypatch.setattr("client.dp.bookkeeping._MATERIALIZE_LIMIT", 0)
    torch.manual_seed(3)
    model = LayerZoo()
    x = torch.randn(5, 3, 8, 8) * torch.tensor([0.1, 1.0, 3.0, 0.5, 8.0])[:, None, None, None]
    assert_clips_each_examples_own_gradient(model, x)


class Tokens(nn.Module):
    """An embedding whose examples repeat ids and hold padding, read by a token mixer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.mix = nn.Linear(4, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weights = torch.linspace(-1.0, 2.0, ids.shape[1])[None, :, None]
        return self.mix(torch.tanh(self.embed(ids) * weights)).sum((1, 2))


def test_embedding_norms_add_repeated_ids_before_the_norm():
    """An id used at several positions is one row of the gradient: its positions' output
    gradients add up before the norm is taken (taken per position, the norms differ)."""
    torch.manual_seed(4)
    model = Tokens()
    ids = torch.tensor(
        [
            [3, 3, 3, 3, 3, 3],  # one id everywhere: a single row
            [1, 2, 3, 4, 5, 6],  # all distinct
            [5, 0, 5, 0, 2, 5],  # repeats around padding
            [0, 0, 0, 0, 0, 0],  # only padding: no embedding gradient at all
            [6, 1, 6, 1, 6, 1],
        ]
    )
    assert_clips_each_examples_own_gradient(model, ids)
    assert model.embed.weight.grad[0].abs().sum() == 0  # the padding row never moves


def test_mixed_rule_takes_the_ghost_norm_only_where_it_costs_less():
    """The default CNN's last stage (4 x 4 positions, 576 patch values, 64 channels) takes
    the ghost norm; its earlier, larger feature maps keep per-example gradients."""
    from client.dp.bookkeeping import _conv2d_ghost_cheaper

    cfg = ModelConfig()
    model = FusionModel(cfg)
    size, cheaper = cfg.image_size, []
    for stage in model.image_encoder.stages:
        size //= 2
        conv = stage[0]
        cheaper.append(_conv2d_ghost_cheaper(conv, torch.zeros(1, conv.out_channels, size, size)))
    assert cheaper == [False, False, False, True]


class Norms(nn.Module):
    """GroupNorm and LayerNorm with trained-looking affine parameters, one called twice."""

    def __init__(self, tiny_weight: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.group = nn.GroupNorm(2, 4)
        self.layer = nn.LayerNorm(4)
        self.out = nn.Linear(4, 1)
        with torch.no_grad():
            for norm in (self.group, self.layer):
                norm.weight.uniform_(-2.0, 2.0)
                norm.bias.uniform_(-3.0, 3.0)
            if tiny_weight:  # |w| far below |b|: this layer must take Opacus's path
                self.group.weight[1] = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.group(self.conv(x)))  # (B, 4, 3, 3)
        tokens = h.flatten(2).transpose(1, 2)  # (B, 9, 4)
        tokens = self.layer(torch.tanh(self.layer(tokens)) * 2.0)  # called twice
        return self.out(tokens).sum((1, 2))


@pytest.mark.parametrize("tiny_weight", [False, True])
def test_normalization_layers_from_their_outputs_clip_each_examples_own_gradient(tiny_weight):
    """Normalization gradients taken from the layer's output (weights and biases far
    from their initial 1 and 0, a layer used twice) equal the example-by-example ones."""
    from client.dp.bookkeeping import _from_output

    torch.manual_seed(7)
    model = Norms(tiny_weight)
    assert _from_output(model.group) is not tiny_weight and _from_output(model.layer)
    x = torch.randn(6, 2, 3, 3) * torch.tensor([0.1, 1.0, 5.0, 0.5, 20.0, 2.0])[:, None, None, None]
    assert_clips_each_examples_own_gradient(model, x)
