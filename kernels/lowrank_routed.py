"""Low-rank adapters applied with per-row weights, prepared once and run with the fewest operations
(no ComfyUI imports).

:func:`kernels.lowrank.lowrank_delta` validates, casts and picks a strategy on every call: right for
a one-off call, but a sampler's forward pass hooks a couple of hundred layers, and that per-call work
(≈ 0.1 ms per layer, measured on a CPU) costs more than the adapters' arithmetic on small layers. This
module splits the work by how often it changes:

* once per sampling run and layer — :class:`PreparedLowRank`: the factors cast to the compute dtype
  and device, each adapter's scale folded into its ``up`` factor, and the rank-stacked factors;
* once per model call — :func:`plan_rows`: the rows grouped by their weight vector into
  :class:`RowSegment` s (ComfyUI batches each cond's rows together, so a group is usually one
  contiguous slice and the layer works on views);
* per layer and call — :func:`add_routed` (dispatch op ``"lowrank_routed"``, backend ``"torch"``):
  two GEMMs per segment accumulated into the layer's output, nothing else.

A batch made of equal consecutive blocks of rows, block ``i`` using adapter ``a0 + i`` alone (LoRA
Composite's layout: component-major rows), becomes one *block* segment: on a linear layer whose
adapters share one rank it runs as one batched GEMM pair (``bmm`` / ``baddbmm_``) over all blocks, so
the number of kernel launches per layer does not grow with the number of LoRAs (on a GPU each launch
costs several microseconds, which on small layers outweighs the arithmetic). A pointwise conv (1×1,
stride 1, unpadded: SD1.5's ``proj_in`` / ``proj_out``) is a matrix over channels and takes the same
pair on ``[rows, C, H·W]`` views; other convs run block by block. Segments on every row or a row slice
of a linear layer run ``mm`` + ``addmm_`` on 2-D views of the activations (no ``F.linear`` reshapes).

Per row ``n`` it adds ``Σ_a w[n, a] · s_a · B_a(A_a(x[n]))``, as ``lowrank_delta`` does. A segment
whose rows use one adapter runs that adapter's factors only (routing: no FLOPs on other adapters'
rank columns); rows using several adapters run the stacked factors, their weights applied to the rank
columns. The only rounding difference from ``lowrank_delta`` is where ``s_a`` is applied (folded into
``up`` once instead of into the per-row coefficient), which stays within fp32's 1e-5 relative.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import dispatch
from .lowrank import (
    ConvSpec,
    LowRankAdapter,
    _check_adapters,
    _check_row_weights,
    _concat_valid,
    _down,
    _up,
    _up_into,
)

__all__ = ["PreparedLowRank", "RowSegment", "add_routed", "add_routed_torch", "plan_rows"]

POINTWISE_ROWS_BYTES = 1 << 20  # per layer: the per-row factor copies a pointwise conv's batched GEMMs may keep


def _widest(*dtypes: torch.dtype) -> torch.dtype:
    wide = torch.float32
    for d in dtypes:
        wide = torch.promote_types(wide, d)
    return wide


class PreparedLowRank:
    """One layer's adapters, ready to run in ``dtype`` on ``device``.

    ``downs[a]`` / ``mids[a]`` / ``ups[a]`` are adapter ``a``'s factors with ``s_a`` folded into
    ``ups[a]`` (views into ``down_cat`` / ``up_cat`` when the adapters can be rank-stacked: plain,
    non-Tucker, one ``down`` shape). ``ranks[a]`` is ``r_a``; pass ``ranks`` to :func:`plan_rows`.
    ``down_blocks`` (``[k, in, r]``) / ``up_blocks`` (``[k, r, out]``): the same factors as one batch
    per adapter for block segments — views of the same storage, set for linear layers with two or more
    stackable adapters of one rank, ``None`` otherwise.
    """

    def __init__(self, adapters: Sequence[LowRankAdapter], conv: ConvSpec | None,
                 dtype: torch.dtype, device: torch.device | str):
        adapters = _check_adapters(adapters)
        if adapters[0].is_conv != (conv is not None):
            raise ValueError("conv must be a ConvSpec exactly when the adapters are conv (4-D factors)")
        self.conv = conv
        self.dtype = dtype
        self.ranks = tuple(a.rank for a in adapters)
        # The scale is folded in at least fp32 (wider when the factor or the compute dtype is), then cast once.
        ups = [(a.up.to(device=device, dtype=_widest(a.up.dtype, dtype)) * a.scale).to(dtype) for a in adapters]
        downs = [a.down.to(device=device, dtype=dtype) for a in adapters]
        self.mids = [None if a.mid is None else a.mid.to(device=device, dtype=dtype) for a in adapters]
        self.down_cat: Tensor | None = None
        self.up_cat: Tensor | None = None
        self.down_blocks: Tensor | None = None
        self.up_blocks: Tensor | None = None
        if len(adapters) == 1 and adapters[0].mid is None:
            self.down_cat, self.up_cat = downs[0], ups[0]
        elif _concat_valid(adapters):
            self.down_cat = torch.cat(downs, dim=0)
            if conv is None:
                # Linear ups are stored transposed ([Σr, out], row blocks contiguous) so that one adapter's up
                # is also a contiguous [r, out] matrix of the batched form; every other use takes a view.
                self.up_cat = torch.cat([u.t() for u in ups], dim=0).t()
            else:
                self.up_cat = torch.cat(ups, dim=1)
            bounds = [0]
            for r in self.ranks:
                bounds.append(bounds[-1] + r)
            downs = [self.down_cat[b:e] for b, e in zip(bounds, bounds[1:])]  # views: no second copy
            ups = [self.up_cat[:, b:e] for b, e in zip(bounds, bounds[1:])]
            if conv is None and len(set(self.ranks)) == 1:
                k, r = len(adapters), self.ranks[0]
                self.down_blocks = self.down_cat.view(k, r, -1).transpose(1, 2)
                self.up_blocks = self.up_cat.t().view(k, r, -1)
        self.downs, self.ups = downs, ups
        # Views a forward needs again and again, made once: each slice or transpose is a dispatcher call (≈ 1 µs of
        # host time), and a hooked layer runs a few hundred times per step (bench/bench_hooks.py).
        self.ups_t = [None if conv is not None else u.t() for u in ups]
        self.up_cat_t = None if conv is not None or self.up_cat is None else self.up_cat.t()
        self.downs_t = [None if conv is not None else d.t() for d in downs]
        self.down_cat_t = None if conv is not None or self.down_cat is None else self.down_cat.t()
        self._block_views: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}
        # A pointwise (1×1, stride 1, unpadded) conv adapter is a matrix over channels: per row n,
        # out[n] += up · (down · x[n]) on [C, H·W] views, two batched GEMMs for any number of blocks where cuDNN
        # ran two convolutions per block plus a slice and an add (SD1.5's proj_in / proj_out).
        self.pointwise: tuple[list[Tensor], list[Tensor]] | None = None
        if conv is not None and _is_pointwise(adapters, conv):
            self.pointwise = ([d.view(d.shape[0], d.shape[1]) for d in downs],
                              [u.view(u.shape[0], u.shape[1]) for u in ups])
        self._pointwise_rows: dict[tuple[int, int, int], tuple[Tensor, Tensor] | None] = {}

    def pointwise_rows(self, first: int, m: int, rows: int) -> tuple[Tensor, Tensor] | None:
        """For a pointwise conv: adapters ``first`` … ``first + m − 1`` as one ``[r, C]`` down and ``[O, r]`` up per
        batch row (block i's factors repeated for its ``rows`` rows), contiguous for ``bmm`` (made once per run);
        None where that copy would exceed ``POINTWISE_ROWS_BYTES`` (large batches run as convolutions)."""
        key = (first, m, rows)
        if key not in self._pointwise_rows:
            downs, ups = self.pointwise[0][first:first + m], self.pointwise[1][first:first + m]
            size = rows * sum(d.numel() + u.numel() for d, u in zip(downs, ups)) * downs[0].element_size()
            self._pointwise_rows[key] = None if size > POINTWISE_ROWS_BYTES else (
                torch.stack(downs).repeat_interleave(rows, dim=0), torch.stack(ups).repeat_interleave(rows, dim=0))
        return self._pointwise_rows[key]

    def blocks(self, first: int, m: int) -> tuple[Tensor, Tensor]:
        """``(down_blocks, up_blocks)`` of adapters ``first`` … ``first + m − 1`` (views, made once per range)."""
        hit = self._block_views.get((first, m))
        if hit is None:
            hit = self._block_views[(first, m)] = (self.down_blocks[first:first + m], self.up_blocks[first:first + m])
        return hit


def _is_pointwise(adapters: Sequence[LowRankAdapter], conv: ConvSpec) -> bool:
    unpadded = conv.padding in ("valid", "same") or tuple(conv.padding) == (0, 0)
    return (unpadded and tuple(conv.stride) == (1, 1) and conv.groups == 1
            and all(a.mid is None and tuple(a.down.shape[2:]) == (1, 1) for a in adapters))


@dataclass(frozen=True)
class RowSegment:
    """Rows that share one weight vector, and how to run them.

    ``rows``: ``None`` (every row), a slice (contiguous rows: views) or int64 indices on the compute device.
    ``weights``: the rows' weight of every adapter.
    ``adapter``: the one adapter these rows use, or ``None`` for the stacked factors of all adapters.
    ``weight``: the scalar weight of ``adapter``, or of every adapter when ``columns`` is ``None``.
    ``columns``: for stacked rows with unequal adapter weights, the weight of every rank column
    (``[Σ r_a]``, compute dtype and device); ``None`` otherwise.
    ``blocks``: for a *block* segment (``rows`` ``None``, ``weights`` empty), the one-adapter segments of
    its equal consecutive row blocks, block ``i`` using adapter ``blocks[0].adapter + i``; ``weight``
    is then every block's weight, or 1 with the per-block weights in ``block_weights`` (``[m, 1, 1]``).
    """

    rows: slice | Tensor | None
    weights: tuple[float, ...]
    adapter: int | None
    weight: float
    columns: Tensor | None = None
    blocks: tuple["RowSegment", ...] = ()
    block_weights: Tensor | None = None


def _rows_of(indices: list[int], total: int, device) -> slice | Tensor | None:
    if len(indices) == total:
        return None
    if indices[-1] - indices[0] + 1 == len(indices):
        return slice(indices[0], indices[-1] + 1)
    return torch.tensor(indices, dtype=torch.int64).to(device)


def plan_rows(row_weights: Tensor | Sequence, ranks: Sequence[int], dtype: torch.dtype,
              device: torch.device | str) -> tuple[RowSegment, ...]:
    """Group the rows of ``row_weights`` (``[N, k]``, read on the host) into segments.

    Rows whose weights are all zero get no segment (their output is left untouched). Segments are
    in order of each group's first row; rows within a segment are ascending and unique, so every
    output element receives exactly one term per segment.
    """
    w = _check_row_weights(row_weights, None, len(ranks)).cpu()
    groups: dict[tuple[float, ...], list[int]] = {}
    for n, vector in enumerate(w.tolist()):
        if any(vector):
            groups.setdefault(tuple(vector), []).append(n)
    segments = []
    for vector, indices in groups.items():
        rows = _rows_of(indices, w.shape[0], device)
        used = [a for a, v in enumerate(vector) if v != 0]
        if len(used) == 1:
            segments.append(RowSegment(rows, vector, used[0], vector[used[0]]))
        elif len(set(vector)) == 1:
            segments.append(RowSegment(rows, vector, None, vector[0]))
        else:
            columns = torch.repeat_interleave(torch.tensor(vector, dtype=torch.float64), torch.tensor(ranks))
            segments.append(RowSegment(rows, vector, None, 1.0, columns.to(device=device, dtype=dtype)))
    block = _as_block(segments, w.shape[0], ranks, dtype, device)
    return tuple(segments) if block is None else (block,)


def _as_block(segments: list[RowSegment], total: int, ranks: Sequence[int], dtype: torch.dtype,
              device: torch.device | str) -> RowSegment | None:
    """One block segment when the segments tile the rows as equal consecutive blocks, block ``i`` using
    adapter ``a0 + i`` alone, and the adapters share one rank (what the batched GEMMs need)."""
    m = len(segments)
    if m < 2 or total % m or len(set(ranks)) != 1:
        return None
    size, first = total // m, segments[0].adapter
    for i, seg in enumerate(segments):
        if (seg.adapter is None or seg.adapter != first + i or not isinstance(seg.rows, slice)
                or seg.rows != slice(i * size, (i + 1) * size)):
            return None
    weights = [seg.weight for seg in segments]
    if len(set(weights)) == 1:
        return RowSegment(None, (), None, weights[0], blocks=tuple(segments))
    per_block = torch.tensor(weights, dtype=torch.float64).view(m, 1, 1).to(device=device, dtype=dtype)
    return RowSegment(None, (), None, 1.0, blocks=tuple(segments), block_weights=per_block)


def add_routed_torch(prepared: PreparedLowRank, x: Tensor, out: Tensor,
                     segments: Sequence[RowSegment]) -> Tensor:
    """The ``"torch"`` backend of :func:`add_routed`."""
    conv = prepared.conv
    for seg in segments:
        if prepared.pointwise is not None and _add_pointwise(prepared, x, out, seg):
            continue
        if seg.blocks:
            if prepared.down_blocks is None or not out.is_contiguous():
                add_routed_torch(prepared, x, out, seg.blocks)  # conv, unequal ranks: block by block
                continue
            m = len(seg.blocks)
            downs, ups = prepared.blocks(seg.blocks[0].adapter, m)
            h = torch.bmm(x.reshape(m, -1, x.shape[-1]), downs)
            if seg.block_weights is not None:
                h.mul_(seg.block_weights)
            out.view(m, -1, out.shape[-1]).baddbmm_(h, ups, alpha=seg.weight)
            continue
        if seg.adapter is not None:
            a = seg.adapter
            down, mid, up, up_t = prepared.downs[a], prepared.mids[a], prepared.ups[a], prepared.ups_t[a]
            down_t = prepared.downs_t[a]
        elif prepared.down_cat is not None:
            down, mid, up, up_t = prepared.down_cat, None, prepared.up_cat, prepared.up_cat_t
            down_t = prepared.down_cat_t
        else:  # Tucker or unequal down shapes: no stacked factors, one adapter after the other
            singles = [RowSegment(seg.rows, seg.weights, a, w) for a, w in enumerate(seg.weights) if w]
            add_routed_torch(prepared, x, out, singles)
            continue
        scattered = isinstance(seg.rows, Tensor)
        if conv is None and not scattered and x.is_contiguous() and out.is_contiguous():
            # every row or a dim-0 slice of a linear layer: two GEMMs on 2-D views (F.linear on a 3-D input goes
            # through matmul's reshapes: twice the dispatcher calls, which a host-bound GPU step pays per layer)
            rows_in = x if seg.rows is None else x[seg.rows]
            h = torch.mm(rows_in.view(-1, x.shape[-1]), down_t)
            if seg.columns is not None:
                h.mul_(seg.columns)
            rows_out = out if seg.rows is None else out[seg.rows]
            rows_out.view(-1, out.shape[-1]).addmm_(h, up_t, alpha=seg.weight)
            continue
        rows_in = x if seg.rows is None else x.index_select(0, seg.rows) if scattered else x[seg.rows]
        h = _down(rows_in, down, mid, conv)
        if seg.columns is not None:
            h = h * (seg.columns if conv is None else seg.columns.view(-1, 1, 1))
        if scattered:
            out.index_add_(0, seg.rows, _up(h, up, conv), alpha=seg.weight)
        else:  # every row, or a dim-0 slice (a view that stays contiguous when out is)
            _up_into(h, up, conv, out if seg.rows is None else out[seg.rows], seg.weight, up_t)
    return out


def _add_pointwise(prepared: PreparedLowRank, x: Tensor, out: Tensor, seg: RowSegment) -> bool:
    """A pointwise conv's block segment or one-adapter slice as ``bmm`` + ``baddbmm_`` over ``[rows, C, H·W]`` views;
    False (nothing done) for other segments or layouts."""
    if not (x.is_contiguous() and out.is_contiguous()) or isinstance(seg.rows, Tensor):
        return False
    if seg.blocks:  # every row, block i using adapter first + i
        first, m, rows_in, rows_out = seg.blocks[0].adapter, len(seg.blocks), x, out
    elif seg.adapter is not None:
        first, m = seg.adapter, 1
        rows_in = x if seg.rows is None else x[seg.rows]
        rows_out = out if seg.rows is None else out[seg.rows]
    else:
        return False
    n = rows_in.shape[0]
    factors = None if n % m else prepared.pointwise_rows(first, m, n // m)
    if factors is None:
        return False
    downs, ups = factors
    h = torch.bmm(downs, rows_in.view(n, x.shape[1], -1))
    if seg.block_weights is not None:
        h.view(m, n // m, *h.shape[1:]).mul_(seg.block_weights.view(m, 1, 1, 1))
    rows_out.view(n, out.shape[1], -1).baddbmm_(ups, h, alpha=seg.weight)
    return True


def add_routed(prepared: PreparedLowRank, x: Tensor, out: Tensor, segments: Sequence[RowSegment]) -> Tensor:
    """``out[n] += Σ_a w[n, a] · s_a · B_a(A_a(x[n]))`` in place, for the segments of :func:`plan_rows`.

    ``x`` is the layer input and ``out`` its output (``prepared``'s dtype, same device); nothing is
    validated per call (the factors were checked when prepared and the layer itself checked ``x``).
    Goes through :mod:`kernels.dispatch` (op ``"lowrank_routed"``); a caller that applies many
    layers can ``dispatch.select`` once and call the backend directly.
    """
    _, fn = dispatch.select("lowrank_routed", x.device)
    return fn(prepared, x, out, segments)


dispatch.register_backend(
    "lowrank_routed",
    "torch",
    add_routed_torch,
    priority=0,
    available=lambda: (True, "pure torch; always available"),
)
