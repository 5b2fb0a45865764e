"""The trainable weights as one flat array on the wire, and back.

Flower stores and transfers every array of a message as objects of their own, each one
HTTP request per hop (SuperLink to SuperNode, SuperNode to ClientApp, and back). The
default model's ~50 trainable tensors made ~100 objects per message, and on loopback
with three hospitals on two cores moving them took seconds per message, while the
bytes themselves (1.5 MB) took milliseconds. So the weights travel as one flat array.

Both sides know the layout (names, shapes and dtype, in :func:`shared_state` order):
the server from its model, a hospital from its own copy built from the same settings.
Each request carries the layout's digest, and a hospital whose layout differs refuses
it, naming what differs. Packing copies values exactly: FedAvg's element-wise mean and
the SecAgg+ masking see the same numbers as they did array by array.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from shared_model.errors import ExplainedError

__all__ = ["PACKED_KEY", "LayoutError", "WeightLayout"]

PACKED_KEY = "weights"  # the one entry of a packed ArrayRecord


class LayoutError(ExplainedError, ValueError):
    """Weights that do not fit the expected layout: names, shapes, dtype or size."""


@dataclass(frozen=True)
class WeightLayout:
    """Names and shapes of the tensors that travel, and their common dtype."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> WeightLayout:
        """The layout of a state dict, in its order; its tensors must share one float dtype."""
        dtypes = {t.dtype for t in state.values()}
        if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
            found = sorted(map(str, dtypes))
            raise LayoutError(f"weights must share one floating-point dtype, got {found}")
        return cls(
            tuple(state),
            tuple(tuple(t.shape) for t in state.values()),
            dtypes.pop() if dtypes else torch.float32,
        )

    @cached_property
    def size(self) -> int:
        """Number of values in the flat array."""
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @cached_property
    def numpy_dtype(self) -> np.dtype:
        """The flat array's NumPy dtype."""
        return _numpy_dtype(self.dtype)

    @cached_property
    def digest(self) -> str:
        """A short SHA-256 of the layout, sent with each request and checked on arrival."""
        text = "\n".join(f"{n}:{list(s)}" for n, s in zip(self.names, self.shapes, strict=True))
        return hashlib.sha256(f"{self.dtype}\n{text}".encode()).hexdigest()[:16]

    def pack(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The tensors of ``state``, in layout order, as one contiguous 1-D array."""
        if tuple(state) != self.names:
            missing = sorted(set(self.names) - set(state))[:3]
            unexpected = sorted(set(state) - set(self.names))[:3]
            raise LayoutError(
                f"weights do not match the layout (missing {missing}, unexpected {unexpected}, "
                "or in another order)"
            )
        if not state:
            return np.zeros(0, dtype=self.numpy_dtype)
        flat = torch.cat([state[n].detach().reshape(-1).to(self.dtype).cpu() for n in self.names])
        return flat.numpy()

    def unpack_record(self, record: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The weights a packed record holds (one ``PACKED_KEY`` array, read by ``.numpy()``).

        LayoutError if the record holds anything else, or an array that does not fit.
        """
        if list(record) != [PACKED_KEY]:
            raise LayoutError(f"expected one packed {PACKED_KEY!r} array, got {list(record)[:3]}")
        return self.unpack(record[PACKED_KEY].numpy())

    def unpack(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """The state dict a flat array holds; LayoutError if its size or dtype is wrong."""
        if flat.ndim != 1 or flat.size != self.size:
            raise LayoutError(
                f"the weights array has shape {list(flat.shape)}; this model's "
                f"{len(self.names)} trainable tensors need [{self.size}]"
            )
        if flat.dtype != self.numpy_dtype:
            raise LayoutError(f"the weights array is {flat.dtype}, this model's are {self.dtype}")
        values = torch.from_numpy(flat)
        out, start = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = values[start : start + count].view(shape).clone()  # no shared storage
            start += count
        return out


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty(0, dtype=dtype).numpy().dtype
