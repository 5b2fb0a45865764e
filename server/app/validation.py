"""What the server accepts as a hospital's update when SecAgg+ is off.

Without SecAgg+ the server sees each hospital's weights, so it checks them before they
are averaged: a broken or malicious hospital must not be able to poison the global
model with one reply. :func:`update_problem` returns why an update is refused, or None:

- the reply must hold exactly the one packed array of the agreed layout
  (``shared_model/packing.py``): the right dtype and the right number of values;
- every value must be finite (no NaN, no Inf);
- the update (new weights minus the global weights the server sent) must have an L2
  norm of at most ``server.max-update-norm``: a hospital cannot move the model
  arbitrarily far in one round;
- the reply must say it trained on this round's model: a reply for another round is
  stale (it was computed from another global model);
- its released record count N̂, the update's weight in the mean, must be a number
  from 1 to ``secagg.max-weight`` (the trainer releases a positive integer; the bound,
  the same as under SecAgg+, keeps one hospital from outweighing the rest unboundedly
  or overflowing the weighted sum).

A refused update is set aside, like a failure, and the server logs the hospital and
the reason. Within these bounds a hospital still pulls the mean with its full weight;
``server.aggregator`` offers Flower's robust aggregators (median, trimmed mean, Krum)
for that. With SecAgg+ on the server cannot see one update: each hospital runs the same
finiteness and layout checks on its own update before masking it
(``client/app/secagg.py``), and SecAgg+'s clipping range bounds every value it adds.
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord

from shared_model.packing import PACKED_KEY, WeightLayout

__all__ = ["update_problem"]


def update_problem(
    arrays: ArrayRecord | None,
    layout: WeightLayout,
    sent: np.ndarray,
    *,
    server_round: int,
    reply_round: object,
    num_examples: object,
    max_examples: float,
    max_norm: float,
) -> str | None:
    """Why this trained reply's weights are refused, or None if they are accepted.

    ``sent`` is the packed global weights of this round's request; ``reply_round`` the
    round the hospital says it trained (the ``round`` of its ``hospital`` record);
    ``num_examples`` the record count it released (its weight in the mean), at most
    ``max_examples``.
    """
    if isinstance(reply_round, bool) or not isinstance(reply_round, int | float):
        return "the reply does not say which round it trained"
    if int(reply_round) != server_round:
        return f"stale update: trained for round {int(reply_round)}, this is round {server_round}"
    if (
        isinstance(num_examples, bool)
        or not isinstance(num_examples, int | float)
        or not num_examples >= 1  # NaN fails this too
    ):
        return f"a record count (num-examples) of {num_examples!r}: the update has no weight"
    if num_examples > max_examples:
        return (
            f"a record count (num-examples) of {num_examples:g} exceeds secagg.max-weight "
            f"{max_examples:g}, the largest weight a hospital may have"
        )
    if arrays is None:
        return "the reply holds no weights"
    keys = list(arrays)
    if keys != [PACKED_KEY]:
        return f"expected one packed {PACKED_KEY!r} array, got {keys[:5]}"
    array = arrays[PACKED_KEY]
    expected = layout.numpy_dtype
    if np.dtype(array.dtype) != expected:
        return f"weights of dtype {array.dtype}, expected {expected}"
    if tuple(array.shape) != (layout.size,):
        return f"weights of shape {tuple(array.shape)}, expected ({layout.size},)"
    values = array.numpy()
    nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
    if nan or inf:
        return f"{nan} NaN and {inf} infinite values in the weights"
    norm = float(np.linalg.norm(values.astype(np.float64) - sent.astype(np.float64)))
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.4g} exceeds server.max-update-norm {max_norm:g}"
    return None
