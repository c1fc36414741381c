"""Unmerged dense weight deltas with per-batch-row weights (no ComfyUI imports).

For adapter formats without a cheap low-rank forward (LoHa, LoKr, DoRA, OFT, …) the caller
materialises each adapter's exact weight delta ``ΔW_a`` (the base weight's shape, scale folded
in) and this module adds, per batch row ``n``::

    delta[n] = Σ_a  w[n, a] · (ΔW_a ⋆ x[n])

with ``⋆`` = ``F.linear`` (linear ``[out, in]``) or ``F.conv2d`` with the base conv's
:class:`~kernels.lowrank.ConvSpec` (conv ``[out, in, kh, kw]``); no bias. Each ``ΔW_a`` runs only
on the rows with ``w[n, a] != 0`` (``index_select`` → GEMM → ``index_add_``), so routed rows pay
for one full-size GEMM each. Computed in ``x``'s dtype on ``x``'s device; pass the deltas already in
that dtype/device to avoid a full-size cast on every call.

:func:`dense_delta` goes through :mod:`kernels.dispatch` (op ``"dense_delta"``); the pure torch
implementation, backend ``"torch"``, is :func:`dense_delta_torch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .lowrank import (
    ConvSpec,
    _check_out,
    _check_row_weights,
    _check_x,
    _conv_kwargs,
    _output_shape,
    _row_selector,
    _rows,
    _shape,
)

__all__ = ["dense_delta", "dense_delta_torch"]


def _check_deltas(
    deltas: Sequence[Tensor], x: Tensor, conv: ConvSpec | None
) -> list[Tensor]:
    """Non-empty, same-shape, floating tensors whose ``in`` dim matches ``x``."""
    in_dim = _check_x(x, conv)
    if isinstance(deltas, Tensor):
        raise ValueError("deltas must be a list of tensors (one per adapter), got a single tensor")
    deltas = list(deltas)
    if not deltas:
        raise ValueError("deltas must contain at least one tensor, got an empty list")
    want = 2 if conv is None else 4
    for i, d in enumerate(deltas):
        if not isinstance(d, Tensor):
            raise ValueError(f"deltas[{i}] must be a torch.Tensor, got {type(d).__name__}")
        if not d.is_floating_point():
            raise ValueError(f"deltas[{i}] must be floating-point, got dtype {d.dtype}")
        if d.ndim != want:
            kind = "linear [out, in]; pass conv= for a conv layer" if conv is None else (
                "conv [out, in, kh, kw]"
            )
            raise ValueError(f"deltas[{i}] must be {want}-D ({kind}), got shape {_shape(d)}")
        if d.shape != deltas[0].shape:
            raise ValueError(
                f"deltas[{i}] has shape {_shape(d)}, but all deltas must share the shape of "
                f"deltas[0], {_shape(deltas[0])}"
            )
    if deltas[0].shape[1] != in_dim:
        raise ValueError(
            f"deltas[0] expects {deltas[0].shape[1]} input features, but x has {in_dim} "
            f"({'dim 1' if conv else 'last dim'} of shape {_shape(x)})"
        )
    return deltas


def _apply(x: Tensor, delta: Tensor, conv: ConvSpec | None) -> Tensor:
    return F.linear(x, delta) if conv is None else F.conv2d(x, delta, **_conv_kwargs(conv))


def dense_delta_torch(
    x: Tensor,
    deltas: Sequence[Tensor],
    row_weights: Tensor | Sequence,
    conv: ConvSpec | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The ``"torch"`` backend of :func:`dense_delta` (same arguments and result)."""
    deltas = _check_deltas(deltas, x, conv)
    w = _check_row_weights(row_weights, x.shape[0], len(deltas))
    d0 = deltas[0]
    kernel = None if conv is None else (int(d0.shape[2]), int(d0.shape[3]))
    shape = _output_shape(x, int(d0.shape[0]), kernel, conv)
    _check_out(out, x, shape)
    used = w.cpu() != 0
    coef = w.to(device=x.device, dtype=x.dtype)
    n = x.shape[0]

    for a, dw in enumerate(deltas):
        sel = _row_selector(used[:, a])
        if sel is None:
            continue
        dw = dw.to(device=x.device, dtype=x.dtype)  # no-op when the caller pre-cast
        if isinstance(sel, slice):  # contiguous rows: views, no gather/scatter copies
            y = _apply(x[sel], dw, conv)
            y = y * _rows(coef[sel, a], y, conv)
            if out is None and sel == slice(0, n):
                out = y
                continue
            if out is None:
                out = x.new_zeros(shape)
            out[sel].add_(y)
            continue
        idx = sel.to(x.device, non_blocking=True)
        y = _apply(x.index_select(0, idx), dw, conv)
        y = y * _rows(coef.index_select(0, idx)[:, a], y, conv)
        if out is None:
            out = x.new_zeros(shape)
        # Unique indices within one adapter: one term per element, no order-dependent rounding.
        out.index_add_(0, idx, y)
    if out is None:  # every weight is zero
        out = x.new_zeros(shape)
    return out


def dense_delta(
    x: Tensor,
    deltas: Sequence[Tensor],
    row_weights: Tensor | Sequence,
    conv: ConvSpec | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``Σ_a w[:, a] ⊙ (ΔW_a ⋆ x)``, each term computed only on rows with ``w[n, a] != 0``.

    Args:
        x: the layer input, batch first: linear ``[N, ..., in]``, conv ``[N, in, H, W]``.
        deltas: ``k >= 1`` exact weight deltas ``ΔW_a`` shaped like the base weight, scales
            folded in.
        row_weights: ``[N, k]`` real weights (tensor or nested list), best kept on the CPU.
        conv: the base conv's :class:`~kernels.lowrank.ConvSpec`; ``None`` for a linear layer.
        out: optional layer output to accumulate into, in place (``out += delta``, returned);
            the delta's shape, ``x``'s dtype and device.

    Returns:
        The delta (or ``out`` plus it) in ``x``'s dtype on ``x``'s device, shaped like the
        layer output (no bias).

    The implementation comes from :func:`kernels.dispatch.select` (op ``"dense_delta"``).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _, fn = dispatch.select("dense_delta", x.device)
    return fn(x, deltas, row_weights, conv=conv, out=out)


dispatch.register_backend(
    "dense_delta",
    "torch",
    dense_delta_torch,
    priority=0,
    available=lambda: (True, "pure torch (row-grouped F.linear / F.conv2d); always available"),
)
