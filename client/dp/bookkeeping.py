"""Book-keeping DP-SGD: per-example clipping in a single backward pass (Bu et al. 2023).

Opacus's grad-sample modes pay for per-example clipping inside the backward pass:
``hooks`` materializes every example's gradient of every weight (B copies of the model's
gradient; for the report embedding alone B x 4096 x 64 floats), ``ghost`` runs the
backward pass twice. Book-keeping (BK) runs it once, and only for the gradients of each
layer's *output*:

1. A forward hook keeps each trainable layer's input ``a`` and output.
2. ``torch.autograd.grad`` of the summed per-example losses with respect to those
   outputs gives every layer's output gradient ``g``. The weight gradients autograd
   would otherwise compute are never computed.
3. Each example's gradient norm comes from its own ``(a_i, g_i)``. Where a layer's
   per-example gradients fit in ``_MATERIALIZE_LIMIT`` values, they are materialized
   (one batched matmul for a linear layer; for a convolution, one convolution with the
   batch as groups, a fast library kernel instead of ``unfold``); the norms are theirs,
   and the clipped sum ``sum_i c_i grad_i`` is their weighted sum. Otherwise the norm
   is the ghost norm ``sum_ts (a_t . a_s)(g_t . g_s)``, or the per-example gradient
   computed and dropped, whichever costs fewer flops (Bu et al.'s mixed rule; a
   convolution takes the ghost norm wherever it is cheaper, kept or not), and
4. the clipped sum is an ordinary weight gradient of ``a`` and the output gradients
   scaled per example by ``c_i``: one matmul, as in non-private training.

Layers (every trainable parameter must sit directly in one): ``Linear``, ``Embedding``
(``padding_idx`` rows get no gradient, as in PyTorch), ``Conv2d``, and every other layer
Opacus has a per-sample gradient function for (LayerNorm, GroupNorm, RMSNorm, grouped
convolutions, ...), whose per-example gradients are materialized with Opacus's function
(GroupNorm and LayerNorm take theirs from their outputs, in one pass). An embedding's
norm sums the output gradients per (example, id), found by sorting the ids.
A layer called several times in one forward pass (the LSTM encoder's time steps) has
its calls added up before the norm is taken, so its clipping stays exact.

Noise, Poisson sampling and accounting stay Opacus's: the optimizer is Opacus's
``DPOptimizerFastGradientClipping``, which noises an already clipped sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

__all__ = ["BookKeeping", "BookKeepingLoss", "ClippedLoss", "bookkeeping_unsupported"]


# Per-example gradients of one layer up to this many values (64 MiB in float32) are kept
# until the clipped sum is taken: that sum is then B scaled additions instead of a
# second pass over the layer's activations. Above it, the norms are computed without
# keeping them (the memory-bounded path).
_MATERIALIZE_LIMIT = 1 << 24


def _opacus_grad_samplers() -> dict[type, Callable[..., dict[nn.Parameter, torch.Tensor]]]:
    from opacus import GradSampleModule  # Opacus loads with the first model it clips

    return GradSampleModule.GRAD_SAMPLERS


def _trainable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            yield name, module


def _why_unsupported(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear | nn.Embedding) or type(module) in _opacus_grad_samplers():
        return None
    return f"a {type(module).__name__} layer with trainable parameters"


def bookkeeping_unsupported(model: nn.Module) -> list[str]:
    """The trainable layers book-keeping cannot clip, as ``"name (why)"``; [] if none."""
    return [
        f"{name or '<model>'} ({why})"
        for name, module in _trainable_layers(model)
        if (why := _why_unsupported(module)) is not None
    ]


@dataclass
class _Call:
    """One call of one layer in the forward pass."""

    module: nn.Module
    inputs: torch.Tensor  # detached
    output: torch.Tensor  # attached: its gradient is what the backward pass computes


def _flat(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, ..., F) -> (B, T, F): every leading position after the batch is a token."""
    return x.reshape(batch, -1, x.shape[-1])


def _tokens(parts: list[torch.Tensor], batch: int) -> torch.Tensor:
    """The calls' tensors as one (B, T, F), their tokens side by side (no copy for one)."""
    flat = [_flat(x, batch) for x in parts]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)


class BookKeeping:
    """Per-example clipped gradient sums of ``model``'s trainable parameters.

    ``clipped_backward(per_example_losses)`` leaves ``p.grad`` = sum over the examples
    of each example's gradient clipped to ``max_grad_norm`` (the norm taken over every
    trainable parameter at once), and returns the per-example norms before clipping.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float) -> None:
        unsupported = bookkeeping_unsupported(model)
        if unsupported:
            raise ValueError(
                "privacy.grad-sample-mode 'bk' cannot clip per example in: "
                + ", ".join(unsupported)
            )
        self.max_grad_norm = float(max_grad_norm)
        self._calls: list[_Call] = []
        for _, module in _trainable_layers(model):  # the hooks live as long as the model
            module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor):
            return
        if not args or not isinstance(args[0], torch.Tensor):
            raise TypeError(
                f"book-keeping: {type(module).__name__} was called without a positional "
                "input tensor; its per-example gradients cannot be computed"
            )
        self._calls.append(_Call(module, args[0].detach(), output))

    # ------------------------------------------------------------------ the backward
    def clipped_backward(self, per_example_loss: torch.Tensor) -> torch.Tensor:
        """Set ``p.grad`` to the clipped sum; returns the (B,) norms before clipping."""
        calls, self._calls = self._calls, []
        if per_example_loss.dim() != 1:
            raise ValueError(
                f"book-keeping needs one loss per example, got shape "
                f"{tuple(per_example_loss.shape)}"
            )
        if not calls:
            raise RuntimeError("book-keeping: no layer was recorded in the forward pass")
        batch = per_example_loss.shape[0]
        grads = torch.autograd.grad(
            per_example_loss.sum(), [c.output for c in calls], allow_unused=True
        )
        by_layer: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for call, g in zip(calls, grads, strict=True):
            g = torch.zeros_like(call.output) if g is None else g.detach()
            kept = call.output.detach() if _from_output(call.module) else call.inputs
            by_layer.setdefault(call.module, []).append((kept, g))
        norm2 = per_example_loss.new_zeros(batch, dtype=torch.float32)
        pending = []
        for module, layer_calls in by_layer.items():
            sq, finish = _layer(module, layer_calls, batch)
            norm2 += sq
            pending.append(finish)
        norms = norm2.clamp_min(0).sqrt()
        scale = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for finish in pending:
            for p, grad in finish(scale):
                p.grad = grad if p.grad is None else p.grad + grad
        return norms


Finish = Callable[[torch.Tensor], list[tuple[nn.Parameter, torch.Tensor]]]


def _layer(
    module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
) -> tuple[torch.Tensor, Finish]:
    """(squared per-example norms (B,), how to get the clipped sum from the scales)."""
    if _from_output(module):  # GroupNorm and LayerNorm: calls hold outputs, not inputs
        return _normalization(module, calls, batch)
    if isinstance(module, nn.Linear):
        return _linear(module, calls, batch)
    if isinstance(module, nn.Embedding):
        return _embedding(module, calls, batch)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros":
        explicit = not isinstance(module.padding, str)
        single = len(calls) == 1 and module.groups == 1 and explicit
        if single and _conv2d_ghost_cheaper(module, calls[0][1]):
            return _conv2d_bounded(module, *calls[0], batch)
        if explicit and _fits(module.weight, batch):
            return _conv2d_per_example(module, calls, batch)
        if single:
            return _conv2d_bounded(module, *calls[0], batch)
    return _materialized(module, calls, batch)


def _conv2d_ghost_cheaper(m: nn.Conv2d, g: torch.Tensor) -> bool:
    """Whether the ghost norm costs fewer flops than each example's weight gradient.

    Per example, the ghost norm takes T^2 (K + O) flops for T output positions, K patch
    values and O channels; the gradient itself T K O (Bu et al.'s mixed rule). Deep,
    small feature maps (few positions, many channels) favour the ghost norm.
    """
    positions = g[0, 0].numel()
    k = m.in_channels // m.groups * math.prod(m.kernel_size)
    return positions * (k + m.out_channels) < k * m.out_channels


def _fits(weight: torch.Tensor, batch: int) -> bool:
    """Whether ``batch`` per-example gradients of ``weight`` may be kept."""
    return batch * weight.numel() <= _MATERIALIZE_LIMIT


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Each example's squared norm of ``x`` (B, ...): one fused reduction, no squares kept."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


def _weighted(scale: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    """``sum_i scale_i per_example_i``: the clipped sum of materialized gradients."""
    return torch.einsum("b,b...->...", scale, per_example)


def _kept(
    m: nn.Module, weight: torch.Tensor | None, bias: torch.Tensor | None, batch: int
) -> tuple[torch.Tensor, Finish]:
    """Norms and clipped sum of a layer whose per-example gradients are kept (B, ...)."""
    parts = [(p, grad) for p, grad in ((m.weight, weight), (m.bias, bias)) if grad is not None]
    sq = parts[0][1].new_zeros(batch) if parts else torch.zeros(batch)
    for _, grad in parts:
        sq = sq + _sq_norms(grad)

    def finish(scale: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, _weighted(scale, grad).to(p.dtype)) for p, grad in parts]

    return sq, finish


def _linear(
    m: nn.Linear, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
) -> tuple[torch.Tensor, Finish]:
    a = _tokens([x for x, _ in calls], batch).to(calls[0][1].dtype)  # (B, T, I)
    g = _tokens([y for _, y in calls], batch)  # (B, T, O)
    tokens, d_in, d_out = a.shape[1], a.shape[2], g.shape[2]
    bias = m.bias is not None and m.bias.requires_grad
    g_sum = g.sum(1) if bias else None  # (B, O): each example's bias gradient
    if m.weight.requires_grad and tokens > 1 and _fits(m.weight, batch):
        # kept for the clipped sum: T I O flops, then B scaled additions
        return _kept(m, torch.bmm(g.transpose(1, 2), a), g_sum, batch)  # (B, O, I)
    sq = g.new_zeros(batch)
    if m.weight.requires_grad:
        if tokens == 1:
            sq = sq + _sq_norms(g[:, 0]) * _sq_norms(a[:, 0])
        elif tokens * (d_in + d_out) < d_in * d_out:  # ghost norm: T^2 (I + O) flops
            sq = sq + (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(
                (1, 2)
            )
        else:  # the per-example gradient, dropped: T I O flops
            sq = sq + _sq_norms(torch.bmm(g.transpose(1, 2), a))
    if g_sum is not None:
        sq = sq + _sq_norms(g_sum)

    def finish(scale: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        if m.weight.requires_grad:
            gc = (g * scale[:, None, None]).reshape(-1, d_out)
            out.append((m.weight, (gc.T @ a.reshape(-1, d_in)).to(m.weight.dtype)))
        if g_sum is not None:
            out.append((m.bias, (scale @ g_sum).to(m.bias.dtype)))
        return out

    return sq, finish


def _embedding(
    m: nn.Embedding, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
) -> tuple[torch.Tensor, Finish]:
    ids = _tokens([x.reshape(batch, -1, 1) for x, _ in calls], batch)[..., 0]  # (B, T)
    g = _tokens([y for _, y in calls], batch)  # (B, T, D)
    valid = ids != m.padding_idx if m.padding_idx is not None else torch.ones_like(ids).bool()
    sq = _embedding_sq_norms(ids, valid, g)

    def finish(scale: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        weights = (scale[:, None] * valid).unsqueeze(-1)
        rows = (g * weights).reshape(-1, g.shape[-1]).to(m.weight.dtype)
        return [(m.weight, torch.zeros_like(m.weight).index_add_(0, ids.reshape(-1), rows))]

    return sq, finish


def _embedding_sq_norms(ids: torch.Tensor, valid: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Each example's squared gradient norm of an embedding, exactly, in O(T D).

    Positions holding the same id add to the same row of the example's gradient: the
    output gradients are summed per (example, id), found by sorting each example's ids,
    and the norm is taken over those sums (the ghost norm's T x T comparison, without
    its T^2 D cost). Padding positions add nothing.
    """
    batch, tokens = ids.shape
    sorted_ids, order = ids.sort(dim=1)
    first = torch.ones_like(sorted_ids, dtype=torch.bool)
    first[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    group = first.cumsum(1).sub_(1)  # (B, T): the id's rank among the example's ids
    group = torch.empty_like(group).scatter_(1, order, group)  # back in token order
    rows = group + torch.arange(batch, device=ids.device)[:, None] * tokens
    summed = g.new_zeros(batch * tokens, g.shape[-1])
    summed.index_add_(0, rows.reshape(-1), (g * valid.unsqueeze(-1)).reshape(-1, g.shape[-1]))
    return _sq_norms(summed.view(batch, -1))


def _conv2d_per_example(
    m: nn.Conv2d, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
) -> tuple[torch.Tensor, Finish]:
    """Per-example convolution gradients: one weight gradient with the batch as groups.

    Example ``b``'s input channels and output channels become group ``b`` of a single
    grouped convolution over a batch of one, so the library's convolution kernel
    computes all B gradients at once (grouped layers: B x groups groups).
    """
    weight = m.weight.requires_grad
    bias = m.bias is not None and m.bias.requires_grad
    per_example: torch.Tensor | None = None
    g_sum: torch.Tensor | None = None
    for a, g in calls:
        if weight:
            a = a.to(g.dtype)
            d_in, d_out = a.shape[1], g.shape[1]
            shape = (batch * d_out, d_in // m.groups, *m.kernel_size)
            w = torch.ops.aten.convolution_backward(
                g.reshape(1, batch * d_out, *g.shape[2:]),
                a.reshape(1, batch * d_in, *a.shape[2:]),
                a.new_empty(shape),  # only its shape is read
                None,
                m.stride,
                m.padding,
                m.dilation,
                False,
                [0, 0],
                batch * m.groups,
                [False, True, False],
            )[1].view(batch, *m.weight.shape)
            per_example = w if per_example is None else per_example + w
        if bias:
            s = g.sum((2, 3))  # (B, O)
            g_sum = s if g_sum is None else g_sum + s
    return _kept(m, per_example, g_sum, batch)


def _conv2d_bounded(
    m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, batch: int
) -> tuple[torch.Tensor, Finish]:
    """A convolution too large to keep its per-example gradients: norms from patches."""
    a = a.to(g.dtype)
    patches = F.unfold(a, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, K, T)
    g2 = g.reshape(batch, g.shape[1], -1)  # (B, O, T)
    k, positions, d_out = patches.shape[1], patches.shape[2], g2.shape[1]
    sq = g.new_zeros(batch)
    if m.weight.requires_grad:
        if positions * (k + d_out) < k * d_out:  # ghost norm
            gram_a = torch.bmm(patches.transpose(1, 2), patches)
            gram_g = torch.bmm(g2.transpose(1, 2), g2)
            sq = sq + (gram_a * gram_g).sum((1, 2))
        else:  # the per-example gradient, dropped
            sq = sq + _sq_norms(torch.bmm(g2, patches.transpose(1, 2)))
    g_sum = g2.sum(2) if m.bias is not None and m.bias.requires_grad else None  # (B, O)
    if g_sum is not None:
        sq = sq + _sq_norms(g_sum)

    def finish(scale: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        if m.weight.requires_grad:
            w = torch.nn.grad.conv2d_weight(
                a, m.weight.shape, g * scale[:, None, None, None], m.stride, m.padding, m.dilation
            )
            out.append((m.weight, w.to(m.weight.dtype)))
        if g_sum is not None:
            out.append((m.bias, (scale @ g_sum).to(m.bias.dtype)))
        return out

    return sq, finish


def _from_output(m: nn.Module) -> bool:
    """Whether a normalization layer's per-example gradients come from its output.

    For y = w * x_hat + b, each example's weight gradient sum(x_hat * g) is
    (sum(y * g) - b * sum(g)) / w: one pass over the output and its gradient, instead of
    normalizing the input again (Opacus's functions). The division loses precision where
    |w| is small against |b|; such a layer takes Opacus's path. The clipping stays exact
    either way: the vectors whose norms are taken are the ones summed.
    """
    if not isinstance(m, nn.GroupNorm | nn.LayerNorm):
        return False
    w, b = m.weight, m.bias
    if w is None or b is None or not (w.requires_grad and b.requires_grad):
        return False
    with torch.no_grad():
        return bool((w.abs() >= 1e-2 * b.abs().clamp_min(1e-4)).all())


def _normalization(
    m: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
) -> tuple[torch.Tensor, Finish]:
    """Per-example gradients of a GroupNorm or LayerNorm from its outputs (B, ...)."""
    w, b = m.weight.detach(), m.bias.detach()
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    for y, g in calls:
        if isinstance(m, nn.GroupNorm):  # (B, C, *spatial): per channel
            dims = tuple(range(2, y.dim()))
            shape = (1, -1) + (1,) * len(dims)
        else:  # (B, ..., *normalized_shape): per normalized element
            dims = tuple(range(1, y.dim() - w.dim()))
            shape = (1, *w.shape)
        g_sum = g.sum(dims) if dims else g
        yg = (y * g).sum(dims) if dims else y * g
        gw = (yg - b.view(shape[: yg.dim()]) * g_sum) / w.view(shape[: yg.dim()])
        weight = gw if weight is None else weight + gw
        bias = g_sum if bias is None else bias + g_sum
    return _kept(m, weight, bias, batch)


def _materialized(
    module: nn.Module, calls: list[tuple[torch.Tensor, torch.Tensor]], batch: int
) -> tuple[torch.Tensor, Finish]:
    """Small layers (norms, multi-call convolutions): per-example gradients, summed."""
    samplers = _opacus_grad_samplers()
    per_example: dict[nn.Parameter, torch.Tensor] = {}
    for a, g in calls:
        for p, grad in samplers[type(module)](module, [a], g).items():
            per_example[p] = per_example[p] + grad if p in per_example else grad
    sq = sum(
        (_sq_norms(grad) for grad in per_example.values()),
        start=calls[0][1].new_zeros(batch),
    )

    def finish(scale: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        return [(p, _weighted(scale, grad).to(p.dtype)) for p, grad in per_example.items()]

    return sq, finish


class ClippedLoss:
    """A batch's per-example losses; ``backward()`` leaves the clipped gradient sum."""

    def __init__(self, per_example: torch.Tensor, bookkeeping: BookKeeping) -> None:
        self.per_example = per_example
        self.bookkeeping = bookkeeping

    def backward(self) -> None:
        """Per-example clipping by book-keeping: ``p.grad`` holds the clipped sum."""
        self.bookkeeping.clipped_backward(self.per_example)

    def detach(self) -> torch.Tensor:
        """The batch's mean loss, detached (what the training loop reports)."""
        return self.per_example.detach().mean()


class BookKeepingLoss(nn.Module):
    """Wraps a criterion that has a ``reduction`` attribute: per-example losses, clipped."""

    def __init__(self, criterion: nn.Module, bookkeeping: BookKeeping) -> None:
        super().__init__()
        if not hasattr(criterion, "reduction"):
            raise TypeError(f"{type(criterion).__name__} has no reduction to set to 'none'")
        self.criterion = criterion
        self.bookkeeping = bookkeeping

    def forward(self, outputs: Any, targets: torch.Tensor) -> ClippedLoss:
        """Per-example losses of the batch, packaged for the clipped backward."""
        saved = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            per_example = self.criterion(outputs, targets)
        finally:
            self.criterion.reduction = saved
        return ClippedLoss(per_example, self.bookkeeping)
