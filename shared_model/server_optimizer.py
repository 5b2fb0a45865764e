"""The server's step: FedAvg, or FedAvg with server momentum (FedAvgM).

FedAvgM (Hsu, Qi and Brown, 2019) treats the averaged update of a round as a
pseudo-gradient and steps along its momentum: ``v = beta * v + delta``, ``w += lr * v``.
Under DP, hospitals' updates are noisy; momentum averages that noise over rounds, which
is why DP federated training uses it. It acts on the aggregate alone (under SecAgg+, the
unmasked sum), so it costs no hospital any privacy. Written here rather than taken from
Flower, whose FedAvgM is a strategy of its own and cannot sit behind the SecAgg+ round
driver; this is the three lines of its update.

The velocity is part of the run's state: it is saved with every round's checkpoint and
restored on resume, so a killed run continues exactly as an uninterrupted one would.
Shared with the in-process federation of the hospital-side privacy audit, which steps
the global model as the ServerApp does. A checkpoint whose velocity does not fit is an
OptimizerStateError here; the server reports it as a run directory it cannot continue
(``restore_optimizer`` in ``server/app/store.py``).
"""

from __future__ import annotations

import torch

__all__ = ["OptimizerStateError", "ServerOptimizer"]

StateDict = dict[str, torch.Tensor]


class OptimizerStateError(RuntimeError):
    """A checkpoint's server-optimizer state does not fit the model it would step."""


class ServerOptimizer:
    """Moves the global model from the averaged update of each round."""

    def __init__(
        self, momentum: float = 0.0, learning_rate: float = 1.0, velocity: StateDict | None = None
    ) -> None:
        self.momentum = momentum
        self.learning_rate = learning_rate
        self.velocity: StateDict = dict(velocity or {})

    @property
    def is_fedavg(self) -> bool:
        """True when the step is plain averaging (the new model is the average)."""
        return self.momentum == 0.0 and self.learning_rate == 1.0

    def step(self, old: StateDict, averaged: StateDict) -> StateDict:
        """The new global model from the last one and this round's averaged model."""
        if self.is_fedavg:
            return averaged
        new = dict(averaged)
        for name, before in old.items():
            if not before.is_floating_point():
                continue
            delta = averaged[name].to(torch.float64) - before.to(torch.float64)
            velocity = self.velocity.get(name)
            if velocity is not None:
                delta += self.momentum * velocity.to(torch.float64)
            # kept in the weights' dtype, as the checkpoint keeps it: a resumed run steps on
            # exactly as an uninterrupted one
            self.velocity[name] = delta.to(before.dtype)
            new[name] = (before.to(torch.float64) + self.learning_rate * delta).to(before.dtype)
        return new

    def restore(self, saved: StateDict, state: StateDict) -> None:
        """Take the velocity a checkpoint kept; OptimizerStateError if it does not fit ``state``."""
        wrong = [k for k, v in saved.items() if k not in state or v.shape != state[k].shape]
        if wrong:
            raise OptimizerStateError(
                f"the server optimizer's checkpoint does not fit this model ({len(wrong)} "
                f"tensors differ, e.g. {wrong[0]})"
            )
        self.velocity = {k: v.to(state[k].dtype) for k, v in saved.items()}

    def state(self) -> StateDict:
        """What a checkpoint keeps so that a resumed run steps on identically."""
        return {name: v.contiguous() for name, v in self.velocity.items()}
