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

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

__all__ = ["secure_gaussian", "secure_normal", "secure_torch_generator", "use_secure_noise"]

_SAMPLES = 4  # sum of 4 samples / 2: Opacus's secure-mode mitigation (n = 2)


def secure_torch_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded with 64 bits from the OS CSPRNG."""
    return torch.Generator(device=device).manual_seed(int.from_bytes(os.urandom(8), "little"))


_zeros = bytearray()  # AES-CTR encrypts zeros into its keystream; kept between calls


def _uniform_open(count: int) -> torch.Tensor:
    """``count`` float64 values uniform on (0, 1), from 53-bit CSPRNG integers.

    The integers are AES-256-CTR keystream under a fresh key and nonce from the OS,
    written straight into the tensor's memory (no intermediate copies).
    """
    global _zeros
    nbytes = 8 * count
    if len(_zeros) < nbytes:
        _zeros = bytearray(nbytes)
    # update_into may write up to one AES block beyond the input: two spare int64s.
    raw = torch.empty(count + 2, dtype=torch.int64)
    encryptor = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()
    written = encryptor.update_into(memoryview(_zeros)[:nbytes], memoryview(raw.numpy()).cast("B"))
    if written != nbytes:  # CTR is a stream mode: it always returns what it was given
        raise RuntimeError(f"AES-CTR returned {written} bytes of keystream, not {nbytes}")
    bits = raw[:count].bitwise_right_shift_(11).bitwise_and_(2**53 - 1)  # 53 random bits
    return bits.to(torch.float64).add_(0.5).mul_(2.0**-53)


_CHUNK = 1 << 16  # values per Box-Muller pass: its float64 temporaries (~5 MB) stay in cache


def _gaussian_chunk(count: int) -> torch.Tensor:
    """``count`` float64 values N(0, 1): CSPRNG uniforms, Box-Muller, 4 samples each / 2."""
    pairs = (_SAMPLES * count + 1) // 2
    uniform = _uniform_open(2 * pairs)
    radius = uniform[:pairs].log_().mul_(-2.0).sqrt_()
    angle = uniform[pairs:].mul_(2.0 * math.pi)
    samples = torch.empty(2 * pairs, dtype=torch.float64)
    torch.mul(radius, torch.cos(angle), out=samples[:pairs])
    torch.mul(radius, angle.sin_(), out=samples[pairs:])
    return samples[: _SAMPLES * count].view(_SAMPLES, count).sum(0).div_(math.sqrt(_SAMPLES))


def _gaussian(count: int, std: float) -> torch.Tensor:
    """``count`` float32 values N(0, std^2), made in float64 a chunk at a time."""
    out = torch.empty(count, dtype=torch.float32)
    for start in range(0, count, _CHUNK):
        part = _gaussian_chunk(min(_CHUNK, count - start))
        out[start : start + part.numel()] = part.mul_(std)
    return out


def secure_gaussian(reference: torch.Tensor, std: float) -> torch.Tensor:
    """Noise N(0, std^2) shaped like ``reference``: CSPRNG uniforms, Box-Muller, 4 samples."""
    if std == 0:
        return torch.zeros_like(reference)
    noise = _gaussian(reference.numel(), std)
    return noise.to(device=reference.device, dtype=reference.dtype).view_as(reference)


def secure_normals(count: int) -> np.ndarray:
    """``count`` float64 values N(0, 1), from the OS CSPRNG (see :func:`secure_gaussian`)."""
    parts = [_gaussian_chunk(min(_CHUNK, count - s)) for s in range(0, count, _CHUNK)]
    return torch.cat(parts).numpy() if parts else np.zeros(0)


def secure_normal(std: float) -> float:
    """One value N(0, std^2), in float64, made as :func:`secure_gaussian` makes each."""
    return float(_gaussian_chunk(1)[0]) * std


def _secure_add_noise(self: Any) -> None:
    """Opacus's ``DPOptimizer.add_noise`` with the noise drawn by :func:`secure_gaussian`.

    One draw for all parameters of the step (in chunks): one key and keystream per chunk.
    """
    # Opacus loads when a DP optimizer steps: the noise draws above never need it
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    multiplier = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
    std = multiplier * self.max_grad_norm
    for p in self.params:
        _check_processed_flag(p.summed_grad)
    sizes = [p.summed_grad.numel() for p in self.params]
    flat = _gaussian(sum(sizes), std) if std != 0 else None
    offset = 0
    for p, size in zip(self.params, sizes, strict=True):
        grad = p.summed_grad
        if flat is None:
            grad = grad.clone()  # p.grad is scaled in place next; summed_grad must not be
        else:
            noise = flat[offset : offset + size].to(device=grad.device, dtype=grad.dtype)
            grad = grad + noise.view_as(grad)
        offset += size
        p.grad = grad.view_as(p)
        _mark_as_processed(p.summed_grad)


def use_secure_noise(optimizer: Any) -> None:
    """Make an Opacus DP optimizer draw its noise from the OS CSPRNG."""
    if not hasattr(optimizer, "add_noise") or not hasattr(optimizer, "noise_multiplier"):
        raise TypeError(f"{type(optimizer).__name__} is not an Opacus DP optimizer")
    optimizer.add_noise = types.MethodType(_secure_add_noise, optimizer)
