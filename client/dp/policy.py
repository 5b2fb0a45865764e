"""A hospital's privacy policy: what the server asks, capped by what the hospital allows.

The hospital decides. The server's run config is a request: the hospital's own config
(its node config or file) caps epsilon and delta, keeps DP on unless the hospital itself
allows training without it, and can refuse any update outside secure aggregation.

Which request keys the server may choose, and why each is safe:

- ``privacy.target-epsilon``, ``privacy.delta``: capped by the hospital's ``max-epsilon``
  and ``delta``; a round past ``max-epsilon`` is declined.
- ``privacy.max-grad-norm``: the noise is scaled to the clipping norm, so any value gives
  the same epsilon (it only changes utility).
- ``privacy.accountant``: RDP and PRV both give upper bounds on epsilon for the same
  history; the ledger keeps the history, so either recomputes it.
- ``privacy.grad-sample-mode``: every mode clips each example's gradient exactly (tested
  against a per-example loop); it only changes speed.
- ``train.batch-size``, ``train.local-epochs``, ``num-rounds``: they set the sample rate
  and the steps, which the ledger charges in full; the cap holds whatever they are.
- ``privacy.enabled`` and ``privacy.secure-noise``: honoured only where the hospital's
  own config allows (``allow-non-private``, ``secure-noise``).
- The train-loss clip, its share of the release and the record-count noise are not the
  server's to choose: they are fixed here.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared_model.config import HospitalConfig, PrivacyConfig

__all__ = [
    "LOSS_CLIP",
    "LOSS_SHARE",
    "RECORD_COUNT_NOISE",
    "PrivacyPolicy",
    "effective_policy",
]

# Each example's training loss is clipped to [0, LOSS_CLIP] before it is summed.
LOSS_CLIP = 2.0
# The loss sum rides in the same Gaussian release as the clipped gradient sum, scaled to
# LOSS_SHARE of the clipping norm: the joint sensitivity is C * sqrt(1 + LOSS_SHARE^2),
# so the gradient noise grows by that factor (3% at 0.25) for the same epsilon.
LOSS_SHARE = 0.25
# Standard deviation of the Gaussian noise on the hospital's record count (sensitivity 1
# under add/remove-one), released once, on its first private round.
RECORD_COUNT_NOISE = 20.0


@dataclass(frozen=True)
class PrivacyPolicy:
    """The privacy settings in force at one hospital, after its own caps."""

    enabled: bool  # what the server asked; see refusal()
    target_epsilon: float  # to spend over the planned rounds
    max_epsilon: float  # hard cap, never exceeded
    delta: float
    max_grad_norm: float
    accountant: str
    grad_sample_mode: str
    secure_noise: bool = True  # noise and sampling from the OS CSPRNG (secure_noise.py)
    allow_non_private: bool = False  # the hospital's own word; the server's cannot set it
    require_secagg: bool = True
    share_evaluation: bool = False
    max_held_out_epsilon: float | None = None  # the held-out part's cap (None: max_epsilon)
    held_out_releases: int = 4  # evaluations released over a run's planned rounds
    held_out_noise: bool = True  # held-out statistics through the Gaussian mechanism

    @property
    def held_out_cap(self) -> float:
        """The cap on the held-out part's epsilon."""
        return self.max_epsilon if self.max_held_out_epsilon is None else self.max_held_out_epsilon

    def refusal(self, *, secure_aggregation: bool) -> str:
        """Why this hospital declines a training request, or "" if it may train.

        ``secure_aggregation``: whether the request came inside SecAgg+.
        """
        if not self.enabled and not self.allow_non_private:
            return (
                "declined: the server asked to train without differential privacy "
                "(privacy.enabled = false), which this hospital's allow-non-private = false "
                "forbids"
            )
        if not secure_aggregation and self.require_secagg:
            return (
                "declined: the server asked for an update outside secure aggregation "
                "(secagg.enabled = false), which this hospital's require-secagg = true "
                "forbids"
            )
        return ""


def effective_policy(requested: PrivacyConfig, hospital: HospitalConfig) -> PrivacyPolicy:
    """The server's request, capped by the hospital's own policy (the hospital wins)."""
    return PrivacyPolicy(
        enabled=requested.enabled,
        target_epsilon=min(requested.target_epsilon, hospital.max_epsilon),
        max_epsilon=hospital.max_epsilon,
        delta=min(requested.delta, hospital.delta),
        max_grad_norm=requested.max_grad_norm,
        accountant=requested.accountant,
        grad_sample_mode=requested.grad_sample_mode,
        # Secure noise is the hospital's to give up, not the server's: a hospital with
        # its own data keeps it unless its own file also says secure-noise = false.
        secure_noise=requested.secure_noise or (hospital.secure_noise and not hospital.simulated),
        allow_non_private=hospital.non_private_allowed,
        require_secagg=hospital.secagg_required,
        share_evaluation=hospital.evaluation_shared,
        max_held_out_epsilon=hospital.max_held_out_epsilon or None,
        held_out_releases=hospital.held_out_releases,
        held_out_noise=hospital.held_out_noised,
    )
