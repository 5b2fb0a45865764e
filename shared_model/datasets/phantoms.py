"""Synthetic chest radiograph phantoms whose visible findings follow a report's labels.

No paired image-report data can be had offline, so each real report is paired with a
phantom drawn from its labels: a wider heart silhouette for cardiomegaly, a fluid level
with a meniscus for effusion, patchy density for opacity, a plate-like band with volume
loss for atelectasis, small dense foci for nodules. Anatomy varies per patient, and each
finding is drawn only with probability ``visibility`` (an occult finding), so the image
carries real but imperfect signal and is never a copy of the label. Each hospital's
scanner adds its own contrast curve, noise and resolution (:class:`Acquisition`).

Images are float32 in [0, 1], shape ``(size, size)``, with bright meaning dense
(MONOCHROME2), as a decoded radiograph is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Acquisition", "hospital_acquisition", "render_phantom"]


@dataclass(frozen=True)
class Acquisition:
    """One hospital's scanner: contrast curve, brightness, noise and resolution."""

    gamma: float = 1.0
    brightness: float = 0.0
    noise_std: float = 0.02
    downsample: int = 1  # 2 halves the effective resolution


def hospital_acquisition(seed: int, hospital: int) -> Acquisition:
    """A deterministic, distinct acquisition shift for each simulated hospital."""
    rng = np.random.default_rng([seed, 7919, hospital])
    return Acquisition(
        gamma=float(rng.uniform(0.7, 1.4)),
        brightness=float(rng.uniform(-0.06, 0.06)),
        noise_std=float(rng.uniform(0.01, 0.06)),
        downsample=int(rng.choice([1, 1, 2])),
    )


def _ellipse(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    sharpness: float = 18.0,
) -> np.ndarray:
    """Soft (anti-aliased) ellipse mask in [0, 1]."""
    r = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
    return 1.0 / (1.0 + np.exp(np.clip((r - 1.0) * sharpness, -60.0, 60.0)))


def _blob(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sigma: float) -> np.ndarray:
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def render_phantom(
    labels: Sequence[str],
    rng: np.random.Generator,
    size: int = 64,
    acquisition: Acquisition | None = None,
    visibility: float = 0.85,
) -> np.ndarray:
    """Draw one frontal chest phantom showing (most of) ``labels``."""
    acq = acquisition or Acquisition()
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float64)
    y, x = np.meshgrid(lin, lin, indexing="ij")  # y grows downwards, as in an image
    shown = {label for label in labels if rng.random() < visibility}

    # Patient anatomy: body habitus and position vary.
    sx, sy = rng.uniform(0.9, 1.08), rng.uniform(0.92, 1.06)
    dx, dy = rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04)
    x, y = (x - dx) / sx, (y - dy) / sy

    img = 0.04 + 0.46 * _ellipse(x, y, 0.0, 0.05, 0.9, 0.98)  # soft tissue
    lung_ry = {side: rng.uniform(0.56, 0.64) for side in (-1, 1)}
    if "atelectasis" in shown:  # volume loss: one lung is shorter
        lung_ry[int(rng.choice([-1, 1]))] *= 0.85
    lungs = {
        side: _ellipse(x, y, side * 0.4, -0.08 + (0.62 - lung_ry[side]) * 0.5, 0.29, lung_ry[side])
        for side in (-1, 1)
    }
    lung = np.clip(lungs[-1] + lungs[1], 0.0, 1.0)
    img = img - 0.32 * lung  # air is dark
    # Ribs and vessel markings give texture that is not a finding.
    ribs = (np.sin(y * 26.0 + 2.5 * x**2 + rng.uniform(0, 6.28)) > 0.55).astype(np.float64)
    img = img + 0.05 * ribs * lung + 0.02 * np.cos(9 * x) * np.cos(11 * y) * lung
    img = img + 0.25 * _ellipse(x, y, 0.0, -0.1, 0.08, 0.95, sharpness=30)  # spine

    heart_w = rng.uniform(0.2, 0.26)
    if "cardiomegaly" in shown:
        heart_w = rng.uniform(0.34, 0.42)
    img = img + 0.42 * _ellipse(x, y, 0.08, 0.34, heart_w, 0.25)

    if "effusion" in shown:  # fluid level with a meniscus, in one or both bases
        sides = [int(rng.choice([-1, 1]))] if rng.random() < 0.7 else [-1, 1]
        for side in sides:
            level = rng.uniform(0.12, 0.35)
            meniscus = level - 0.18 * ((x - side * 0.4) / 0.29) ** 2
            fluid = 1.0 / (1.0 + np.exp(-(y - meniscus) * 25.0))
            img = img + 0.36 * fluid * lungs[side]
    if "opacity" in shown:  # patchy airspace density
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.choice([-1, 1]))
            cx, cy = side * rng.uniform(0.25, 0.55), rng.uniform(-0.45, 0.35)
            img = (
                img + rng.uniform(0.22, 0.35) * _blob(x, y, cx, cy, rng.uniform(0.08, 0.15)) * lung
            )
    if "atelectasis" in shown:  # plate-like band in a lower zone
        side = int(rng.choice([-1, 1]))
        angle = rng.uniform(-0.35, 0.35)
        cy = rng.uniform(0.05, 0.3)
        dist = np.abs((y - cy) * np.cos(angle) - (x - side * 0.4) * np.sin(angle))
        band = np.exp(-(dist**2) / (2 * rng.uniform(0.02, 0.035) ** 2))
        img = img + 0.33 * band * lungs[side]
    if "nodule" in shown:  # small dense foci (nodules, calcified granulomas)
        for _ in range(int(rng.integers(1, 3))):
            side = int(rng.choice([-1, 1]))
            cx, cy = side * rng.uniform(0.2, 0.55), rng.uniform(-0.5, 0.3)
            img = img + 0.45 * _blob(x, y, cx, cy, rng.uniform(0.025, 0.04)) * lung
    if "other" in shown and rng.random() < 0.5:  # e.g. a line or device
        t = rng.uniform(-0.3, 0.3)
        dist = np.abs(x - t - 0.25 * (y + 0.2) ** 2)
        img = img + 0.3 * np.exp(-(dist**2) / (2 * 0.012**2)) * (y > -0.6)

    return _acquire(img, acq, rng)


def _acquire(img: np.ndarray, acq: Acquisition, rng: np.random.Generator) -> np.ndarray:
    """Apply one scanner's resolution, contrast curve and noise."""
    img = np.clip(img, 0.0, 1.0)
    if acq.downsample > 1:
        n, f = img.shape[0], acq.downsample
        coarse = img.reshape(n // f, f, n // f, f).mean(axis=(1, 3))
        img = np.repeat(np.repeat(coarse, f, axis=0), f, axis=1)
    img = np.clip(img, 0.0, 1.0) ** acq.gamma + acq.brightness
    img = img + rng.normal(0.0, acq.noise_std, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)
