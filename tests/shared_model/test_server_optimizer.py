"""The server's step: FedAvg by default, FedAvgM with server.momentum."""

import pytest
import torch

from shared_model.server_optimizer import OptimizerStateError, ServerOptimizer


def test_the_default_is_fedavg_bit_for_bit():
    old = {"w": torch.randn(5)}
    averaged = {"w": torch.randn(5)}
    assert ServerOptimizer().step(old, averaged)["w"] is averaged["w"]


def test_momentum_and_learning_rate_follow_fedavgm():
    opt = ServerOptimizer(momentum=0.9, learning_rate=0.5)
    w = {"w": torch.zeros(3, dtype=torch.float64), "step": torch.tensor(3)}
    deltas = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 1.0])]
    v = torch.zeros(3, dtype=torch.float64)
    expected = torch.zeros(3, dtype=torch.float64)
    for d in deltas:
        d = d.to(torch.float64)
        w = opt.step(w, {"w": w["w"] + d, "step": torch.tensor(4)})
        v = 0.9 * v + d
        expected = expected + 0.5 * v
        torch.testing.assert_close(w["w"], expected)
    assert w["step"].item() == 4  # integer tensors are taken as averaged, never stepped


def test_a_velocity_that_does_not_fit_the_model_is_refused():
    opt = ServerOptimizer(momentum=0.5)
    with pytest.raises(OptimizerStateError, match="does not fit this model"):
        opt.restore({"w": torch.zeros(4)}, {"w": torch.zeros(3)})
