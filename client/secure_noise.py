"""DP-SGD noise and Poisson sampling from the operating system's cryptographic RNG.

Opacus's ``secure_mode`` needs ``torchcsprng``, which has no build for this torch, so
fedfusion supplies the two things secure mode means:

- **Unpredictable noise.** Gaussian noise is made by the Box-Muller transform, in
  float64, from uniform bytes of a CSPRNG: AES-256 in counter mode (the construction of
  NIST's CTR_DRBG) under a fresh key and nonce from ``os.urandom`` for every call. No
  seed exists that an attacker could guess or recover from earlier outputs. (AES-CTR
  runs at several GB/s with AES-NI, three times faster than ``os.urandom`` for the
  megabytes one DP step needs.)
- **The floating-point attack mitigation.** A single floating-point Gaussian sample
  leaks through its representation (Mironov 2012; Jin et al. 2021). As Opacus does in
  secure mode, each noise value is the sum of 4 independent samples divided by 2, which
  has the same standard deviation.

The Poisson sampler takes a torch generator seeded with 64 fresh bits from ``os.urandom``
for each round, so which records were sampled cannot be predicted either.
"""

from __future__ import annotations

import math
import os
import types
from typing import Any

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["secure_gaussian", "secure_torch_generator", "use_secure_noise"]

_SAMPLES = 4  # sum of 4 samples / 2: Opacus's secure-mode mitigation (n = 2)


def secure_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS CSPRNG."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


def _csprng_bytes(count: int) -> bytes:
    """``count`` bytes of AES-256-CTR keystream under a fresh key and nonce from the OS."""
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    return encryptor.update(bytes(count)) + encryptor.finalize()


def _uniform_open(count: int) -> torch.Tensor:
    """``count`` float64 values uniform on (0, 1), from 53-bit CSPRNG integers."""
    raw = torch.frombuffer(bytearray(_csprng_bytes(8 * count)), dtype=torch.int64)
    return ((raw & (2**63 - 1)) >> 10).to(torch.float64).add_(0.5).mul_(2.0**-53)


def secure_gaussian(reference: torch.Tensor, std: float) -> torch.Tensor:
    """Noise N(0, std^2) shaped like ``reference``: CSPRNG uniforms, Box-Muller, 4 samples."""
    if std == 0:
        return torch.zeros_like(reference)
    n = reference.numel()
    pairs = (_SAMPLES * n + 1) // 2
    uniform = _uniform_open(2 * pairs)
    radius = uniform[:pairs].log_().mul_(-2.0).sqrt_()
    angle = uniform[pairs:].mul_(2.0 * math.pi)
    samples = torch.cat([radius * angle.cos(), radius * angle.sin()])[: _SAMPLES * n]
    noise = samples.view(_SAMPLES, n).sum(dim=0).mul_(std / math.sqrt(_SAMPLES))
    return noise.to(device=reference.device, dtype=reference.dtype).view_as(reference)


def _secure_add_noise(self: Any) -> None:
    """Opacus's ``DPOptimizer.add_noise`` with the noise drawn by :func:`secure_gaussian`."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        noise = secure_gaussian(p.summed_grad, multiplier * self.max_grad_norm)
        p.grad = (p.summed_grad + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


def use_secure_noise(optimizer: Any) -> None:
    """Make an Opacus DP optimizer draw its noise from the OS CSPRNG."""
    if not hasattr(optimizer, "add_noise") or not hasattr(optimizer, "noise_multiplier"):
        raise TypeError(f"{type(optimizer).__name__} is not an Opacus DP optimizer")
    optimizer.add_noise = types.MethodType(_secure_add_noise, optimizer)
