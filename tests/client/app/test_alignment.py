"""The alignment loss is per example: DP-SGD's per-record clipping stays valid.

An in-batch contrastive loss, shown for contrast, couples the records of a batch.
"""

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from shared_model.config import ModelConfig, RunConfig
from shared_model.engine import MultiLabelBCE
from shared_model.model import FusionModel, alignment_loss
from tests.support.dp import CFG, batch, own_grads, per_sample_grads

N = 6


def fused_model():
    torch.manual_seed(0)
    model = FusionModel(ModelConfig(**CFG, fusion="gated")).train()
    model.return_alignment = True
    return model


def bce_plus_alignment(model, inputs):
    image, ids, present, labels = inputs
    return MultiLabelBCE(None, "sum", alignment_weight=1.0)(model(image, ids, present), labels)


def in_batch_contrastive(model, inputs):
    """InfoNCE over the batch: each image against every example's report."""
    image, ids, _present, _ = inputs
    inner = getattr(model, "_module", model)  # Opacus's wrapper hooks the same submodules
    _, pooled_image = inner.encode_image(image)
    _, pooled_report, _ = inner.encode_text(ids)
    sims = F.normalize(pooled_image, dim=-1) @ F.normalize(pooled_report, dim=-1).T / 0.1
    return F.cross_entropy(sims, torch.arange(len(image)), reduction="sum")


def test_alignment_per_sample_gradients_are_each_examples_own():
    model = fused_model()
    inputs = batch(model.cfg, N)
    grads = per_sample_grads(model, bce_plus_alignment, inputs)
    for i in range(N):
        alone = own_grads(model, bce_plus_alignment, inputs, i)
        for name, g in alone.items():
            torch.testing.assert_close(grads[name][i], g, atol=1e-5, rtol=1e-4, msg=name)


def test_an_in_batch_contrastive_loss_couples_the_examples():
    model = fused_model()
    inputs = batch(model.cfg, N)
    grads = per_sample_grads(model, in_batch_contrastive, inputs)
    alone = own_grads(model, in_batch_contrastive, inputs, 0)  # a batch of one: no negatives
    name = (
        "image_encoder.proj.weight" if "image_encoder.proj.weight" in alone else next(iter(alone))
    )
    assert not torch.allclose(grads[name][0], alone[name], atol=1e-4)


def test_alignment_is_zero_without_both_modalities_and_off_in_evaluation():
    image, report = torch.randn(3, 8), torch.randn(3, 8)
    present = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    loss = alignment_loss(image, report, present)
    assert loss[0] > 0 and loss[1] == 0 and loss[2] == 0
    assert alignment_loss(image, image, torch.ones(3, 2)).abs().max() < 1e-5
    model = fused_model().eval()
    image, ids, present, _ = batch(model.cfg, 2)
    assert isinstance(model(image, ids, present), torch.Tensor)  # evaluation: logits only


def test_training_with_alignment_brings_image_and_report_together():
    model = fused_model()
    inputs = batch(model.cfg, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = MultiLabelBCE(None, alignment_weight=1.0)
    image, ids, present, labels = inputs

    def mean_alignment():
        with torch.no_grad():
            return float(model(image, ids, present)[1].mean())

    before = mean_alignment()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(model(image, ids, present), labels).backward()
        opt.step()
    assert mean_alignment() < 0.5 * before


def test_alignment_weight_is_a_run_setting():
    assert RunConfig().train.alignment_weight == 0.0
    assert RunConfig.from_run_config({"train.alignment-weight": 0.5}).train.alignment_weight == 0.5
    with pytest.raises(Exception, match="alignment-weight"):
        RunConfig.from_run_config({"train.alignment-weight": -1.0})
