"""The training loss a private round reports, released under the round's own DP noise.

The exact mean training loss is a function of every record: from two neighbouring
datasets it gives one record's loss exactly. So each DP-SGD step releases, together with
the clipped gradient sum, the sum of the batch's per-example losses clipped to
[0, LOSS_CLIP], scaled to LOSS_SHARE of the clipping norm, as one more coordinate of the
same Gaussian mechanism. Per example the joint vector has norm at most
C * sqrt(1 + LOSS_SHARE^2), so the ledger charges the step at the noise multiplier
sigma / sqrt(1 + LOSS_SHARE^2), and the loss coordinate gets noise of standard deviation
sigma * LOSS_CLIP / LOSS_SHARE (in loss units). The reported train loss is the sum of
these noisy sums over the round divided by the public expected number of examples:
post-processing, at no further cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from client.dp.policy import LOSS_CLIP, LOSS_SHARE

__all__ = ["LossRelease"]

Outputs = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class LossRelease:
    """Clipped per-example losses, summed per step and noised at every step.

    ``per_example(outputs, targets)`` gives each example's training loss;
    ``gradient_noise_multiplier`` is the sigma of the step's gradient noise (in units
    of the clipping norm); ``expected_examples_per_step`` is q * N̂ (public).
    ``normal(std)`` draws one noise value (the OS CSPRNG in production).
    """

    def __init__(
        self,
        per_example: Callable[[Outputs, torch.Tensor], torch.Tensor],
        gradient_noise_multiplier: float,
        expected_examples_per_step: float,
        normal: Callable[[float], float],
    ) -> None:
        self.per_example = per_example
        self.noise_std = gradient_noise_multiplier * LOSS_CLIP / LOSS_SHARE
        self.expected = expected_examples_per_step
        self.normal = normal
        self.steps = 0
        self._step_sum = 0.0
        self._released = 0.0

    @torch.no_grad()
    def add(self, outputs: Outputs, targets: torch.Tensor) -> None:
        """Add a (chunk of a) batch: its per-example losses, each clipped."""
        losses = self.per_example(outputs, targets)
        self._step_sum += float(losses.clamp(0.0, LOSS_CLIP).sum())

    def end_step(self) -> None:
        """Noise this step's sum (also for an empty batch: every step is released)."""
        self._released += self._step_sum + self.normal(self.noise_std)
        self._step_sum = 0.0
        self.steps += 1

    def value(self) -> float:
        """The released mean training loss of the round (noisy; may fall outside [0, clip])."""
        if self.steps == 0:
            return float("nan")
        return self._released / (self.steps * self.expected)
