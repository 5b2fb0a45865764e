"""Every patch of Flower internals the ClientApp makes, written for Flower 1.42.

Each entry of :data:`PATCHED` is a Flower symbol fedfusion replaces, with the parameter
names it had in that version; ``tests/test_flwr_compat.py`` fails when one disappears or
changes its parameters.

- :func:`install_secagg_primitives`: ``secaggplus_mod``'s key agreement, mask generator,
  secret sharing and in-place mask arithmetic (``shared_model/secagg_primitives.py``).

The module imports no torch: it serves the SecAgg+ key stages, a process each.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from shared_model import secagg_primitives

__all__ = ["FLOWER_VERSION", "PATCHED", "install_secagg_primitives"]

FLOWER_VERSION = "1.42"
_MOD = "flwr.client.mod.secure_aggregation.secaggplus_mod"
_PAIR = ("parameters1", "parameters2")
PATCHED: dict[str, tuple[str, ...]] = {
    f"{_MOD}:generate_key_pairs": (),
    f"{_MOD}:private_key_to_bytes": ("private_key",),
    f"{_MOD}:public_key_to_bytes": ("public_key",),
    f"{_MOD}:bytes_to_private_key": ("private_key_bytes",),
    f"{_MOD}:bytes_to_public_key": ("public_key_bytes",),
    f"{_MOD}:generate_shared_key": ("private_key", "public_key"),
    f"{_MOD}:pseudo_rand_gen": ("seed", "num_range", "dimensions_list"),
    f"{_MOD}:create_shares": ("secret", "threshold", "num"),
    f"{_MOD}:parameters_addition": _PAIR,
    f"{_MOD}:parameters_subtraction": _PAIR,
}


def install_secagg_primitives(shared_key: Callable[..., bytes]) -> None:
    """Make Flower's SecAgg+ mod use fedfusion's primitives at this hospital.

    ``shared_key`` derives the pairwise mask keys (bound to the instruction received).
    """
    mod = importlib.import_module(_MOD)  # the module, not the package's function
    mod.generate_key_pairs = secagg_primitives.generate_key_pairs  # type: ignore[attr-defined]
    mod.private_key_to_bytes = secagg_primitives.private_key_to_bytes  # type: ignore[attr-defined]
    mod.public_key_to_bytes = secagg_primitives.public_key_to_bytes  # type: ignore[attr-defined]
    mod.bytes_to_private_key = secagg_primitives.bytes_to_private_key  # type: ignore[attr-defined]
    mod.bytes_to_public_key = secagg_primitives.bytes_to_public_key  # type: ignore[attr-defined]
    mod.generate_shared_key = shared_key  # type: ignore[attr-defined]
    mod.pseudo_rand_gen = secagg_primitives.pseudo_rand_gen  # type: ignore[attr-defined]
    mod.create_shares = secagg_primitives.create_shares  # type: ignore[attr-defined]
    # The mod adds n - 1 pairwise masks into a vector it owns: in place, not a copy each.
    mod.parameters_addition = secagg_primitives.add_masks  # type: ignore[attr-defined]
    mod.parameters_subtraction = secagg_primitives.subtract_masks  # type: ignore[attr-defined]
