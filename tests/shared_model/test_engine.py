import itertools
import math
import platform
import resource
import sys

import pytest
import torch

from shared_model.config import RunConfig, TrainConfig
from shared_model.engine import (
    _drop_modalities,
    make_optimizer,
    pos_weight_from_config,
    reuse_freed_memory,
    round_learning_rate,
    train_one_epoch,
)

LABELS = ("normal", "cardiomegaly", "effusion")


def test_pos_weight_public_prior_and_explicit():
    w = pos_weight_from_config(TrainConfig(), LABELS)
    assert w is not None and w[1] > w[0] >= 1.0  # the rarer finding weighs more
    assert pos_weight_from_config(TrainConfig(pos_weight="none"), LABELS) is None
    assert pos_weight_from_config(TrainConfig(pos_weight="2"), LABELS).tolist() == [2.0] * 3
    with pytest.raises(ValueError, match=r"train\.pos-weight"):
        pos_weight_from_config(TrainConfig(pos_weight="1,2"), LABELS)
    with pytest.raises(ValueError, match="public-prior"):
        pos_weight_from_config(TrainConfig(), ("pneumothorax",))


def test_modality_dropout_never_hides_both():
    present = torch.tensor([[1.0, 1.0]] * 500 + [[1.0, 0.0]] * 100 + [[0.0, 1.0]] * 100)
    dropped = _drop_modalities(present, 0.5, torch.Generator().manual_seed(0))
    assert (dropped.sum(1) >= 1).all()
    assert torch.equal(dropped[500:], present[500:])  # single-modality rows untouched
    assert 150 < int((dropped[:500].sum(1) == 1).sum()) < 350


def test_fedprox_step_pulls_towards_the_global_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    global_params = [p.detach().clone() for p in model.parameters()]
    batch = (torch.randn(8, 4), None, torch.ones(8, 2), torch.randint(0, 2, (8, 3)).float())

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, image, ids, present):
            return self.inner(image)

    def drift(mu: float) -> float:
        with torch.no_grad():
            for p, g in zip(model.parameters(), global_params, strict=True):
                p.copy_(g)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(5):
            train_one_epoch(
                Wrap(),
                [batch],
                opt,
                torch.nn.BCEWithLogitsLoss(),
                proximal_mu=mu,
                global_params=global_params,
            )
        return sum(
            float((p - g).detach().norm())
            for p, g in zip(model.parameters(), global_params, strict=True)
        )

    assert drift(1.0) < drift(0.0)


def test_optimizer_choice():
    model = torch.nn.Linear(2, 2)
    assert isinstance(make_optimizer(model, RunConfig()), torch.optim.SGD)
    adamw = RunConfig.from_run_config({"train.optimizer": "adamw"})
    assert isinstance(make_optimizer(model, adamw), torch.optim.AdamW)


def test_round_learning_rate_warms_up_then_decays_to_the_plan():
    run = RunConfig.from_run_config({"train.learning-rate": 0.2, "train.warmup-rounds": 2})
    rates = [round_learning_rate(run.train, r, 30) for r in range(1, 31)]
    assert rates[0] == pytest.approx(0.2 / 3) and rates[0] < rates[1] < rates[2]
    assert rates[2] == pytest.approx(0.1 * (1 + math.cos(2 * math.pi / 30)))
    assert all(a > b for a, b in itertools.pairwise(rates[2:]))
    assert 0 < rates[-1] < 0.001
    assert round_learning_rate(run.train, 31, 30) == rates[-1]  # past the plan: the last
    no_warmup = RunConfig.from_run_config({"train.warmup-rounds": 0}).train
    assert round_learning_rate(no_warmup, 1, 30) == no_warmup.learning_rate
    constant = RunConfig.from_run_config({"train.lr-schedule": "constant"}).train
    assert {round_learning_rate(constant, r, 30) for r in (1, 15, 30)} == {0.2}


def test_loss_is_per_example_and_matches_bce():
    from shared_model.engine import MultiLabelBCE

    logits, y = torch.randn(6, 3), torch.randint(0, 2, (6, 3)).float()
    w = torch.tensor([1.0, 3.0, 2.0])
    loss = MultiLabelBCE(w)
    expected = torch.nn.BCEWithLogitsLoss(pos_weight=w)(logits, y)
    assert torch.allclose(loss(logits, y), expected)
    loss.reduction = "none"
    per = loss(logits, y)
    assert per.shape == (6,)
    # example i's loss depends on example i only
    logits2 = logits.clone()
    logits2[0] += 5
    assert torch.equal(loss(logits2, y)[1:], per[1:])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)
def test_freed_tensor_memory_is_reused_instead_of_returned_to_the_kernel():
    """A training step's large temporaries come back from the heap, not as fresh pages."""
    assert reuse_freed_memory() is True  # glibc accepted both settings
    values = 9 << 18  # 9 MiB of float32, like a per-example convolution gradient
    for _ in range(2):  # the first ones may grow the heap
        torch.empty(values).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(values).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 20 * (values * 4 // 4096) // 10  # returned each time: ~2,300 per step
