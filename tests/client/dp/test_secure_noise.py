"""Secure noise: the right Gaussian, from the OS CSPRNG, in every DP step, on by default."""

import logging

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn
from torch.utils.data import TensorDataset

from client.dp.engine import make_private
from client.dp.policy import PrivacyPolicy, effective_policy
from client.dp.secure_noise import secure_gaussian
from shared_model.config import HospitalConfig, PrivacyConfig, RunConfig

N_PARAMS = 200_000


def policy(secure: bool) -> PrivacyPolicy:
    return PrivacyPolicy(True, 8.0, 8.0, 1e-5, 1.0, "rdp", "hooks", secure_noise=secure)


def private_sgd(model: nn.Module, data: TensorDataset, batch: int, secure: bool, **kwargs):
    """make_private with plain SGD and MSE; seeded torch noise unless ``secure``."""
    generator = None if secure else torch.Generator().manual_seed(7)
    return make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        nn.MSELoss(),
        data,
        batch,
        policy(secure),
        noise_generator=generator,
        **kwargs,
    )


def test_secure_gaussian_is_the_gaussian_asked_for():
    noise = secure_gaussian(torch.zeros(N_PARAMS), std=2.0).numpy()
    assert noise.dtype == np.float32
    assert abs(noise.mean()) < 0.02 and noise.std() == pytest.approx(2.0, rel=0.01)
    assert stats.kstest(noise[:20_000] / 2.0, "norm").pvalue > 1e-4
    assert secure_gaussian(torch.zeros(3, 4), std=0.0).abs().sum() == 0


def test_seeding_torch_does_not_make_the_noise_repeat():
    torch.manual_seed(0)
    a = secure_gaussian(torch.zeros(1000), 1.0)
    torch.manual_seed(0)
    b = secure_gaussian(torch.zeros(1000), 1.0)
    assert not torch.equal(a, b)


def noise_only_step(secure: bool, seed_torch: int = 0) -> torch.Tensor:
    """The parameter change of one empty-batch DP step: lr * noise / expected batch size."""
    torch.manual_seed(seed_torch)
    model = nn.Linear(N_PARAMS // 10, 10, bias=False)
    nn.init.zeros_(model.weight)
    data = TensorDataset(torch.zeros(100, N_PARAMS // 10), torch.zeros(100, 10))
    private = private_sgd(model, data, 10, secure, noise_multiplier=1.5)
    private.empty_batch_step()
    return private.raw_model.weight.detach().clone()


def test_dp_steps_use_the_secure_noise_with_the_planned_scale():
    step = noise_only_step(secure=True)
    # std = noise multiplier * C / expected batch size (10 of 100 records, q = 0.1)
    assert step.std().item() == pytest.approx(1.5 * 1.0 / 10, rel=0.02)
    assert not torch.equal(step, noise_only_step(secure=True))  # same torch seed, new noise


def test_seeded_noise_needs_secure_noise_off_and_warns(caplog):
    with pytest.raises(ValueError, match="secure-noise"):
        make_private(
            nn.Linear(2, 1),
            torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1.0),
            nn.MSELoss(),
            TensorDataset(torch.zeros(10, 2), torch.zeros(10, 1)),
            2,
            policy(True),
            noise_multiplier=1.0,
            noise_generator=torch.Generator().manual_seed(0),
        )
    with caplog.at_level(logging.WARNING, logger="fedfusion.hospital"):
        a, b = noise_only_step(secure=False), noise_only_step(secure=False)
    assert torch.equal(a, b)  # reproducible, as tests want
    assert "never with patient data" in caplog.text


def test_secure_noise_is_the_default_and_reaches_the_hospital():
    assert RunConfig().privacy.secure_noise is True
    hospital = HospitalConfig(partition_id=0, num_partitions=1)
    assert effective_policy(PrivacyConfig(), hospital).secure_noise is True
    off = RunConfig.from_run_config({"privacy.secure-noise": False}).privacy
    assert effective_policy(off, hospital).secure_noise is False  # simulated: follows
    real = HospitalConfig(data_manifest="/data/manifest.csv")
    assert effective_policy(off, real).secure_noise is True  # the server cannot turn it off
    agreed = HospitalConfig(data_manifest="/data/manifest.csv", secure_noise=False)
    assert effective_policy(off, agreed).secure_noise is False


def test_poisson_sampling_is_not_predictable_from_torchs_seed():
    """Which records a step samples must not follow from torch's global seed."""

    def first_batches(secure: bool) -> list[int]:
        torch.manual_seed(0)
        data = TensorDataset(torch.arange(200).float().unsqueeze(1), torch.zeros(200, 1))
        private = private_sgd(nn.Linear(1, 1), data, 20, secure, noise_multiplier=1.0)
        torch.manual_seed(0)  # as if an attacker knew the process's torch seed
        return [int(x.sum()) for x, _ in list(private.loader)[:3]]

    assert first_batches(secure=False) == first_batches(secure=False)  # the global generator
    assert first_batches(secure=True) != first_batches(secure=True)


def test_one_draw_per_step_gives_every_parameter_its_own_noise():
    """The step's noise is drawn once for all parameters and split: no two parameters
    share values, and each has the planned scale."""
    model = nn.Sequential(nn.Linear(300, 100, bias=True), nn.Linear(100, 300, bias=False))
    for p in model.parameters():
        nn.init.zeros_(p)
    data = TensorDataset(torch.zeros(100, 300), torch.zeros(100, 300))
    private = private_sgd(model, data, 10, True, noise_multiplier=2.0)
    private.empty_batch_step()
    first, bias, second = (p.detach().flatten() for p in private.raw_model.parameters())
    for p in (first, second):
        assert p.std().item() == pytest.approx(2.0 / 10, rel=0.03)
    assert bias.abs().min() > 0
    assert stats.pearsonr(first.numpy(), second.numpy()).statistic == pytest.approx(0, abs=0.02)
    assert not torch.equal(first, second)


def test_noise_drawn_in_chunks_fills_every_value_at_the_right_scale(monkeypatch):
    """Large models draw their noise a chunk at a time: every value, none repeated."""
    import client.dp.secure_noise as secure_noise

    monkeypatch.setattr(secure_noise, "_CHUNK", 1000)
    noise = secure_noise.secure_gaussian(torch.zeros(20_500), std=3.0)
    assert noise.std().item() == pytest.approx(3.0, rel=0.03)
    assert (noise != 0).all()  # the last, partial chunk too
    chunks = noise[:20_000].view(20, 1000)
    assert not any(torch.equal(chunks[0], chunks[i]) for i in range(1, 20))
