"""Unmerged low-rank (LoRA / LoCon) adapters with per-batch-row weights (no ComfyUI imports).

For a layer with input ``x`` (batch first) and output ``out``, this module computes the delta::

    out[n] += Σ_a  w[n, a] · s_a · B_a(A_a(x[n]))

where ``a`` indexes ``k`` adapters, ``w`` is an ``[N, k]`` row-weight matrix (``N = x.shape[0]``,
e.g. one row per cond/uncond or per regional prompt) and ``s_a`` is the adapter's scalar scale
(typically ``strength · alpha / r``). The base weights are never touched, so different batch rows
can use different adapters in one forward pass.

Factor conventions (kohya / LyCORIS, as in :mod:`kernels.merge_math`):

* linear: ``down = A`` is ``[r, in]``, ``up = B`` is ``[out, r]``; ``A(x) = x @ Aᵀ``.
* conv (LoCon): ``down`` is ``[r, in, kh, kw]`` and runs with the base conv's stride / padding /
  dilation; ``up`` is ``[out, r, 1, 1]`` (1×1, stride 1). Equivalent dense delta:
  ``ΔW = (up.flatten(1) @ down.flatten(1)).reshape(out, in, kh, kw)``.
* conv Tucker (LyCORIS ``use_tucker``): ``down`` is ``[r, in, 1, 1]`` (1×1), ``mid`` is
  ``[r, r, kh, kw]`` and carries the stride / padding / dilation, ``up`` is ``[out, r, 1, 1]``.
  Equivalent dense delta: ``einsum("pqhw,op,qi->oihw", mid, up[:, :, 0, 0], down[:, :, 0, 0])``.

Three strategies compute the same sum (up to rounding):

* ``reference`` — one full up(down(x)) per adapter on every row, scaled afterwards (the oracle);
* ``concat`` — all adapters in one GEMM pair on stacked factors
  ``A_cat = [A_1; …; A_k]``, ``B_cat = [B_1 … B_k]``, with the per-row weights applied to the
  rank columns in between (``h[n, j] *= w[n, a(j)] · s_{a(j)}``); not for Tucker factors;
* ``grouped`` — per adapter, only the rows with ``w[n, a] != 0`` (``index_select`` → compute →
  ``index_add_``), so per-row routing (one adapter per row) costs one adapter's FLOPs per row.

:func:`choose_strategy` picks one for ``strategy="auto"``. Everything is computed in ``x``'s dtype
on ``x``'s device (factors and weights are cast), so the caller decides the precision.
:func:`lowrank_delta` goes through :mod:`kernels.dispatch` (op ``"lowrank_delta"``); the pure
torch implementation, backend ``"torch"``, is :func:`lowrank_delta_torch`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

__all__ = [
    "STRATEGIES",
    "ConcatCache",
    "ConvSpec",
    "LowRankAdapter",
    "build_concat_cache",
    "choose_strategy",
    "lowrank_delta",
    "lowrank_delta_torch",
]

#: Values accepted for ``strategy`` (``"auto"`` resolves to one of the other three).
STRATEGIES: tuple[str, ...] = ("auto", "reference", "concat", "grouped")

_Pair = tuple[int, int]
# (down, mid, up) of one adapter, already in the compute dtype/device.
_Factors = tuple[Tensor, "Tensor | None", Tensor]


# --------------------------------------------------------------------------------------------
# adapters and conv parameters
# --------------------------------------------------------------------------------------------


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


# eq=False: tensors do not compare with `==` into a bool, and identity equality/hashing is what a
# cache keyed by adapter wants anyway.
@dataclass(frozen=True, eq=False)
class LowRankAdapter:
    """One LoRA / LoCon adapter of one layer: ``ΔW = scale · up @ (mid ∘) down``.

    Attributes:
        down: linear ``[r, in]``; conv ``[r, in, kh, kw]``, or ``[r, in, 1, 1]`` with ``mid``.
        up: linear ``[out, r]``; conv ``[out, r, 1, 1]``.
        mid: Tucker conv core ``[r, r, kh, kw]`` (LyCORIS ``lora_mid``), else ``None``.
        scale: ``s_a``, typically ``strength · alpha / r``; any finite real, negatives allowed.

    Shapes are checked on construction (``ValueError`` naming ``down`` / ``up`` / ``mid`` /
    ``scale``); dtype and device are free, :func:`lowrank_delta` casts to the input's.
    """

    down: Tensor
    up: Tensor
    mid: Tensor | None = None
    scale: float = 1.0

    def __post_init__(self) -> None:
        down, up, mid = self.down, self.up, self.mid
        for name, t in (("down", down), ("up", up), ("mid", mid)):
            if t is None and name == "mid":
                continue
            if not isinstance(t, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if down.ndim not in (2, 4):
            raise ValueError(
                f"down must be 2-D (linear [r, in]) or 4-D (conv [r, in, kh, kw]), "
                f"got shape {_shape(down)}"
            )
        if up.ndim != down.ndim:
            raise ValueError(
                f"up must be {down.ndim}-D like down {_shape(down)} "
                f"(linear [out, r] / conv [out, r, 1, 1]), got shape {_shape(up)}"
            )
        if down.shape[0] < 1:
            raise ValueError(f"down must have rank >= 1 rows, got shape {_shape(down)}")
        if up.shape[1] != down.shape[0]:
            raise ValueError(
                f"rank mismatch: up {_shape(up)} has {up.shape[1]} columns but down "
                f"{_shape(down)} has {down.shape[0]} rows"
            )
        if up.ndim == 4 and _shape(up)[2:] != (1, 1):
            raise ValueError(f"up must be a 1x1 conv [out, r, 1, 1], got shape {_shape(up)}")
        if mid is not None:
            if down.ndim != 4:
                raise ValueError("mid (Tucker core) is only valid for conv adapters (4-D down/up)")
            r = down.shape[0]
            if mid.ndim != 4 or mid.shape[0] != up.shape[1] or mid.shape[1] != r:
                raise ValueError(
                    f"mid must be [r, r, kh, kw] with r = {r} (up columns x down rows), "
                    f"got shape {_shape(mid)}"
                )
            if _shape(down)[2:] != (1, 1):
                raise ValueError(
                    f"down must be a 1x1 conv [r, in, 1, 1] when mid (Tucker) is given, "
                    f"got shape {_shape(down)}"
                )
        s = self.scale
        if isinstance(s, Tensor) and s.numel() == 1:
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scale must be a finite real number, got {self.scale!r}")
        object.__setattr__(self, "scale", float(s))

    @property
    def rank(self) -> int:
        """``r``: rows of ``down``."""
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def kernel_size(self) -> _Pair | None:
        """The kernel run with the base conv's stride/padding (Tucker: mid's); linear: None."""
        if not self.is_conv:
            return None
        k = self.mid if self.mid is not None else self.down
        return (int(k.shape[2]), int(k.shape[3]))


def _pair(value: int | Sequence[int], name: str, minimum: int) -> _Pair:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    try:
        pair = (operator.index(value),) * 2 if not isinstance(value, Sequence) else tuple(
            operator.index(v) for v in value
        )
    except TypeError:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
    if len(pair) != 2 or any(isinstance(v, bool) or v < minimum for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")
    return pair  # type: ignore[return-value]


@dataclass(frozen=True)
class ConvSpec:
    """Parameters of the base ``Conv2d`` that the adapter's spatial conv must reuse.

    The LoCon ``down`` conv (Tucker: ``mid``) runs with these; the other factor convs are 1×1,
    stride 1, no padding. Ints are normalised to pairs. ``padding`` may also be ``"valid"`` or
    ``"same"`` (as ``nn.Conv2d`` accepts; ``"same"`` needs stride 1). ``groups`` must be 1:
    LoRA/LoCon factors of a grouped conv are not defined by kohya/LyCORIS.
    Zero padding is assumed; see :meth:`from_module` for other ``padding_mode`` values.
    """

    stride: int | _Pair = 1
    padding: int | _Pair | str = 0
    dilation: int | _Pair = 1
    groups: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups != 1:
            raise ValueError(
                f"groups must be 1 for LoRA/LoCon adapters (grouped convs are not supported), "
                f"got {self.groups!r}"
            )
        stride = _pair(self.stride, "stride", 1)
        dilation = _pair(self.dilation, "dilation", 1)
        if isinstance(self.padding, str):
            if self.padding not in ("valid", "same"):
                raise ValueError(
                    f"padding must be an int, a pair of ints, 'valid' or 'same', "
                    f"got {self.padding!r}"
                )
            if self.padding == "same" and stride != (1, 1):
                raise ValueError(
                    f"padding='same' needs stride 1 (as in torch), got stride {stride}"
                )
            padding: _Pair | str = self.padding
        else:
            padding = _pair(self.padding, "padding", 0)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "padding", padding)
        object.__setattr__(self, "dilation", dilation)

    @classmethod
    def from_module(cls, conv: torch.nn.Conv2d) -> ConvSpec:
        """The spec of an ``nn.Conv2d`` (zero padding only: a reflect/replicate/circular padded
        base conv pads its input before convolving, which the unmerged delta would have to repeat).
        """
        if not isinstance(conv, torch.nn.Conv2d):
            raise ValueError(f"conv must be a torch.nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"conv.padding_mode must be 'zeros' for an unmerged delta, "
                f"got {conv.padding_mode!r}"
            )
        return cls(conv.stride, conv.padding, conv.dilation, conv.groups)


# --------------------------------------------------------------------------------------------
# pre-cast / pre-concatenated factors
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ConcatCache:
    """Factors of a fixed adapter list, cast once to a compute dtype/device (build with
    :func:`build_concat_cache`; the caller keeps it across forward calls).

    ``down_cat`` / ``up_cat`` are the rank-stacked factors (``None`` when concat is not valid,
    i.e. some adapter is Tucker); ``factors`` holds each adapter's ``(down, mid, up)``, as views
    into the stacked tensors when those exist (no second copy); ``col_adapter[j]`` is the adapter
    of rank column ``j``; ``scales`` is ``[s_a]`` in fp64 (on ``device``).
    """

    adapters: tuple[LowRankAdapter, ...]
    dtype: torch.dtype
    device: torch.device
    factors: tuple[_Factors, ...]
    down_cat: Tensor | None
    up_cat: Tensor | None
    col_adapter: Tensor | None
    scales: Tensor

    def to(self, dtype: torch.dtype, device: torch.device) -> ConcatCache:
        """This cache in another dtype/device (``self`` when both already match)."""
        if dtype == self.dtype and device == self.device:
            return self
        return build_concat_cache(self.adapters, dtype, device)


def _concat_valid(adapters: Sequence[LowRankAdapter]) -> bool:
    """Stacking needs plain two-factor adapters whose downs all have one shape past the rank."""
    if any(a.mid is not None for a in adapters):
        return False
    tail = _shape(adapters[0].down)[1:]
    return all(_shape(a.down)[1:] == tail for a in adapters)


def _cast_factors(
    adapters: Sequence[LowRankAdapter], dtype: torch.dtype, device: torch.device
) -> list[_Factors]:
    # `.to` is a no-op (no copy) when dtype and device already match.
    return [
        (
            a.down.to(device=device, dtype=dtype),
            None if a.mid is None else a.mid.to(device=device, dtype=dtype),
            a.up.to(device=device, dtype=dtype),
        )
        for a in adapters
    ]


def build_concat_cache(
    adapters: Sequence[LowRankAdapter],
    dtype: torch.dtype,
    device: torch.device | str,
) -> ConcatCache:
    """Cast (and, where valid, rank-stack) the factors of ``adapters`` once.

    ::

        A_cat = cat([A_1, …, A_k], dim=0)     # [R, in(, kh, kw)],  R = Σ r_a
        B_cat = cat([B_1, …, B_k], dim=1)     # [out, R(, 1, 1)]
        col_adapter = [0]*r_1 + [1]*r_2 + …   # which adapter each rank column belongs to

    Pass the result as ``cache=`` to :func:`lowrank_delta` with the same adapter objects; a
    per-forward call then neither casts nor concatenates. Scales are *not* folded into the
    factors (they are applied with the row weights), so changing ``w`` needs no rebuild.
    """
    adapters = _check_adapters(adapters)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    scales = torch.tensor([a.scale for a in adapters], dtype=torch.float64, device=device)
    # A tensor's device is concrete ("cuda" -> "cuda:0"), so it compares equal to x.device and
    # ConcatCache.to does not rebuild on every call.
    device = scales.device
    if not _concat_valid(adapters):
        return ConcatCache(
            tuple(adapters), dtype, device, tuple(_cast_factors(adapters, dtype, device)),
            None, None, None, scales,
        )
    down_cat = torch.cat([a.down.to(device=device, dtype=dtype) for a in adapters], dim=0)
    up_cat = torch.cat([a.up.to(device=device, dtype=dtype) for a in adapters], dim=1)
    factors: list[_Factors] = []
    start = 0
    for a in adapters:
        stop = start + a.rank
        factors.append((down_cat[start:stop], None, up_cat[:, start:stop]))
        start = stop
    col_adapter = torch.repeat_interleave(
        torch.arange(len(adapters)), torch.tensor([a.rank for a in adapters])
    ).to(device)
    return ConcatCache(
        tuple(adapters), dtype, device, tuple(factors), down_cat, up_cat, col_adapter, scales
    )


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _check_adapters(adapters: Sequence[LowRankAdapter]) -> tuple[LowRankAdapter, ...]:
    """Non-empty, all LowRankAdapter, one kind (linear/conv), one out dim, one spatial kernel."""
    if isinstance(adapters, LowRankAdapter):
        raise ValueError("adapters must be a sequence of LowRankAdapter, got a single adapter")
    adapters = tuple(adapters)
    if not adapters:
        raise ValueError("adapters must contain at least one LowRankAdapter, got none")
    for i, a in enumerate(adapters):
        if not isinstance(a, LowRankAdapter):
            raise ValueError(f"adapters[{i}] must be a LowRankAdapter, got {type(a).__name__}")
    ref = adapters[0]
    for i, a in enumerate(adapters[1:], start=1):
        if a.is_conv != ref.is_conv:
            raise ValueError(
                f"adapters[{i}] is {'conv' if a.is_conv else 'linear'} but adapters[0] is "
                f"{'conv' if ref.is_conv else 'linear'}; one layer's adapters must be one kind"
            )
        if a.in_features != ref.in_features:
            raise ValueError(
                f"adapters[{i}].down has in dim {a.in_features}, but adapters[0].down has "
                f"{ref.in_features}"
            )
        if a.out_features != ref.out_features:
            raise ValueError(
                f"adapters[{i}].up has out dim {a.out_features}, but adapters[0].up has "
                f"{ref.out_features}"
            )
        # Different spatial kernels under one stride/padding give different output sizes.
        if a.kernel_size != ref.kernel_size:
            raise ValueError(
                f"adapters[{i}] has spatial kernel {a.kernel_size}, but adapters[0] has "
                f"{ref.kernel_size}; all adapters of a conv layer must match the base kernel"
            )
    return adapters


def _check_row_weights(row_weights: Tensor | Sequence, n: int | None, k: int) -> Tensor:
    """``row_weights`` as a float ``[n, k]`` tensor on its own device (nested lists accepted).

    ``n=None`` takes ``N`` from the tensor (only its 2-D-ness and ``k`` are checked).
    The result is float32, or float64 when given float64.
    """
    if not isinstance(row_weights, Tensor):
        try:
            row_weights = torch.as_tensor(row_weights, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(
                f"row_weights must be an [N, k] tensor of real numbers, "
                f"got {type(row_weights).__name__}"
            ) from None
    if row_weights.is_complex() or row_weights.dtype == torch.bool:
        raise ValueError(f"row_weights must be real-valued, got dtype {row_weights.dtype}")
    if n is None and row_weights.ndim == 2:
        n = int(row_weights.shape[0])
    if _shape(row_weights) != (n, k):
        raise ValueError(
            f"row_weights must have shape [N, k] = [{'N' if n is None else n}, {k}] "
            f"(N = x.shape[0], k = number of adapters/deltas), got {_shape(row_weights)}"
        )
    # float64 stays float64 (an fp64 caller gets fp64 coefficients); everything else -> fp32.
    return row_weights.detach().to(
        torch.float64 if row_weights.dtype == torch.float64 else torch.float32
    )


def _check_x(x: Tensor, conv: ConvSpec | None) -> int:
    """Validate ``x`` against the layer kind and return its feature (channel) dim."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if conv is None:
        if x.ndim < 2:
            raise ValueError(
                f"x must be [N, ..., in] (at least 2-D) for a linear layer, got {_shape(x)}"
            )
        return int(x.shape[-1])
    if not isinstance(conv, ConvSpec):
        raise ValueError(f"conv must be a ConvSpec or None, got {type(conv).__name__}")
    if x.ndim != 4:
        raise ValueError(f"x must be [N, in, H, W] for a conv layer, got {_shape(x)}")
    return int(x.shape[1])


def _check_layer(
    x: Tensor, adapters: tuple[LowRankAdapter, ...], conv: ConvSpec | None
) -> None:
    in_dim = _check_x(x, conv)
    ref = adapters[0]
    if ref.is_conv and conv is None:
        raise ValueError(
            "conv must be a ConvSpec for conv adapters (4-D factors); for a linear layer pass "
            "2-D factors (reshape 1x1 conv factors with .flatten(1))"
        )
    if not ref.is_conv and conv is not None:
        raise ValueError("conv must be None for linear adapters (2-D factors)")
    for i, a in enumerate(adapters):
        if a.in_features != in_dim:
            raise ValueError(
                f"adapters[{i}].down expects {a.in_features} input features, but x has "
                f"{in_dim} ({'dim 1' if conv else 'last dim'} of shape {_shape(x)})"
            )


def _conv_out_size(size: int, k: int, stride: int, pad: int, dil: int) -> int:
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


def _output_shape(
    x: Tensor, out_features: int, kernel: _Pair | None, conv: ConvSpec | None
) -> tuple[int, ...]:
    """Shape of the layer output (= of the delta) for input ``x``."""
    if conv is None:
        return _shape(x)[:-1] + (out_features,)
    assert kernel is not None
    if conv.padding == "same":
        spatial = _shape(x)[2:]
    else:
        pad = (0, 0) if conv.padding == "valid" else conv.padding
        spatial = tuple(
            _conv_out_size(int(x.shape[2 + i]), kernel[i], conv.stride[i], pad[i], conv.dilation[i])
            for i in range(2)
        )
    return (int(x.shape[0]), out_features) + spatial


def _check_out(out: Tensor | None, x: Tensor, shape: tuple[int, ...]) -> None:
    """``out`` must be exactly what the delta would be: same shape, dtype and device."""
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise ValueError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if _shape(out) != shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must have the layer output's shape {shape}, x's dtype {x.dtype} and device "
            f"{x.device}; got {_shape(out)}, {out.dtype}, {out.device}"
        )


# --------------------------------------------------------------------------------------------
# strategies (inputs already validated and cast)
# --------------------------------------------------------------------------------------------


def _conv_kwargs(conv: ConvSpec) -> dict:
    return {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}


def _down(x: Tensor, down: Tensor, mid: Tensor | None, conv: ConvSpec | None) -> Tensor:
    """``h = A(x)`` (Tucker: ``mid(A(x))``): ``[N, ..., r]`` or ``[N, r, H', W']``."""
    if conv is None:
        return F.linear(x, down)
    if mid is None:
        return F.conv2d(x, down, **_conv_kwargs(conv))
    return F.conv2d(F.conv2d(x, down), mid, **_conv_kwargs(conv))


def _up(h: Tensor, up: Tensor, conv: ConvSpec | None) -> Tensor:
    return F.linear(h, up) if conv is None else F.conv2d(h, up)


def _up_into(h: Tensor, up: Tensor, conv: ConvSpec | None, out: Tensor, alpha: float = 1.0,
             up_t: Tensor | None = None) -> None:
    """``out += alpha · up(h)``; linear into a contiguous ``out``: one ``addmm_`` (beta = 1), so the
    delta is never materialised and the separate read-modify-write pass over ``out`` disappears.
    ``up_t``: ``up.t()`` made beforehand (a caller running the same factors many times saves the view).
    """
    if conv is None and out.is_contiguous():
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t() if up_t is None else up_t, alpha=alpha)
    else:
        out.add_(_up(h, up, conv), alpha=alpha)


def _rows(v: Tensor, like: Tensor, conv: ConvSpec | None) -> Tensor:
    """Broadcast per-row values ``v`` (``[N]``, or ``[N, C]`` per feature) against ``like``.

    Linear features are the last dim, conv channels dim 1.
    """
    n = v.shape[0]
    if v.ndim == 1:
        return v.reshape((n,) + (1,) * (like.ndim - 1))
    if conv is None:
        return v.reshape((n,) + (1,) * (like.ndim - 2) + (v.shape[1],))
    return v.reshape(n, v.shape[1], 1, 1)


def _reference(
    x: Tensor,
    factors: Sequence[_Factors],
    coef: Tensor,
    conv: ConvSpec | None,
    out: Tensor | None = None,
) -> Tensor:
    """``Σ_a coef[:, a] · up_a(down_a(x))`` on all rows, scaled after the up projection."""
    delta = out
    for a, (down, mid, up) in enumerate(factors):
        y = _up(_down(x, down, mid, conv), up, conv)
        term = _rows(coef[:, a], y, conv) * y
        delta = term if delta is None else delta.add_(term)
    assert delta is not None  # adapters is never empty here
    return delta


def _concat(
    x: Tensor,
    down_cat: Tensor,
    up_cat: Tensor,
    col_adapter: Tensor,
    coef: Tensor,
    conv: ConvSpec | None,
    out: Tensor | None = None,
) -> Tensor:
    """One GEMM pair: ``h = x A_catᵀ``; ``h[n, j] *= coef[n, a(j)]``; ``delta = h B_catᵀ``.

    Block algebra: ``B_cat diag(c_n) A_cat = Σ_a c_{n,a} B_a A_a`` for every row ``n``.
    """
    h = _down(x, down_cat, None, conv)
    # index_select with a stored column map, not repeat_interleave: no host sync on GPU.
    h = h * _rows(coef.index_select(1, col_adapter), h, conv)
    if out is None:
        return _up(h, up_cat, conv)
    _up_into(h, up_cat, conv, out)
    return out


def _row_selector(rows: Tensor) -> slice | Tensor | None:
    """Which batch rows a CPU bool mask ``rows`` selects.

    ``None`` for no row; a ``slice`` for one contiguous run (ComfyUI batches each cond's rows
    together), so the rows are views and need no gather/scatter copies; otherwise the int64
    indices (on the CPU).
    """
    idx = rows.nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    start, stop = int(idx[0]), int(idx[-1]) + 1
    if stop - start == idx.numel():
        return slice(start, stop)
    return idx


def _grouped(
    x: Tensor,
    factors: Sequence[_Factors],
    coef: Tensor,
    used: Tensor,
    conv: ConvSpec | None,
    out: Tensor | None = None,
) -> Tensor:
    """Per adapter ``a``, only the rows with ``used[n, a]`` (``w[n, a] != 0``).

    ``used`` is a CPU bool ``[N, k]``. Contiguous rows are sliced (views); scattered rows go
    through ``index_select`` / ``index_add_``. Within one adapter the rows are unique, so each
    output element gets exactly one term per adapter (no order-dependent rounding).
    """
    n = x.shape[0]
    delta = out
    for a, (down, mid, up) in enumerate(factors):
        sel = _row_selector(used[:, a])
        if sel is None:
            continue
        if isinstance(sel, slice):
            h = _down(x[sel], down, mid, conv)
            h = h * _rows(coef[sel, a], h, conv)
            if delta is not None:
                _up_into(h, up, conv, delta[sel])  # a dim-0 slice of a contiguous tensor is too
                continue
            y = _up(h, up, conv)
            if sel == slice(0, n):
                delta = y  # every row, first adapter: the term is the delta so far
                continue
            delta = x.new_zeros((n,) + _shape(y)[1:])
            delta[sel].add_(y)
            continue
        idx = sel.to(x.device, non_blocking=True)
        h = _down(x.index_select(0, idx), down, mid, conv)
        y = _up(h * _rows(coef.index_select(0, idx)[:, a], h, conv), up, conv)
        if delta is None:
            delta = x.new_zeros((n,) + _shape(y)[1:])
        delta.index_add_(0, idx, y)
    if delta is None:  # every weight is zero: run the layer shape on an empty batch
        down, mid, up = factors[0]
        y = _up(_down(x[:0], down, mid, conv), up, conv)
        delta = x.new_zeros((n,) + _shape(y)[1:])
    return delta


# --------------------------------------------------------------------------------------------
# strategy choice and entry points
# --------------------------------------------------------------------------------------------


def _choose(used: Tensor, concat_ok: bool) -> str:
    if not concat_ok:
        return "grouped"
    n, k = used.shape
    if k == 1 or bool(used.all()):
        return "concat"  # nothing to skip: one GEMM pair is the fewest launches
    single = int((used.sum(dim=1) == 1).sum())
    if 2 * single > n:
        return "grouped"  # routing: concat would spend k× the FLOPs on zero columns
    return "concat"


def choose_strategy(
    adapters: Sequence[LowRankAdapter],
    row_weights: Tensor | Sequence,
    conv: ConvSpec | None = None,
) -> str:
    """The strategy ``strategy="auto"`` uses for these adapters and row weights.

    Rules, in order (``used[n, a] = w[n, a] != 0``):

    1. some adapter is Tucker (``mid``) → ``"grouped"`` (concat cannot stack it);
    2. one adapter, or every row uses every adapter → ``"concat"``;
    3. more than half of the rows use exactly one adapter (routing) → ``"grouped"``;
    4. otherwise → ``"concat"``.

    ``conv`` is accepted for symmetry with :func:`lowrank_delta` (checked only for type): the
    choice depends on the adapters and weights alone. Reads ``row_weights`` on the host (a device
    sync when they live on a GPU; keep them on the CPU).
    """
    adapters = _check_adapters(adapters)
    if conv is not None and not isinstance(conv, ConvSpec):
        raise ValueError(f"conv must be a ConvSpec or None, got {type(conv).__name__}")
    w = _check_row_weights(row_weights, None, len(adapters))
    return _choose(w.cpu() != 0, _concat_valid(adapters))


def lowrank_delta_torch(
    x: Tensor,
    adapters: Sequence[LowRankAdapter],
    row_weights: Tensor | Sequence,
    conv: ConvSpec | None = None,
    strategy: str = "auto",
    cache: ConcatCache | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The ``"torch"`` backend of :func:`lowrank_delta` (same arguments and result)."""
    adapters = _check_adapters(adapters)
    _check_layer(x, adapters, conv)
    if out is not None:
        ref = adapters[0]
        _check_out(out, x, _output_shape(x, ref.out_features, ref.kernel_size, conv))
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    w = _check_row_weights(row_weights, x.shape[0], len(adapters))

    if cache is not None:
        if not isinstance(cache, ConcatCache):
            raise ValueError(f"cache must be a ConcatCache or None, got {type(cache).__name__}")
        if len(cache.adapters) != len(adapters) or any(
            c is not a for c, a in zip(cache.adapters, adapters)
        ):
            raise ValueError(
                "cache was built for other adapters; build it with build_concat_cache(adapters, "
                "...) from the same LowRankAdapter objects, in the same order"
            )
        # A dtype/device mismatch still gives the right answer, at the cost of a cast per call.
        cache = cache.to(x.dtype, x.device)
        scales = cache.scales
    else:
        scales = torch.tensor([a.scale for a in adapters], dtype=torch.float64, device=w.device)

    concat_ok = _concat_valid(adapters)
    used: Tensor | None = None
    if strategy == "auto":
        used = w.cpu() != 0
        strategy = _choose(used, concat_ok)
    elif strategy == "concat" and not concat_ok:
        strategy = "grouped"  # Tucker: same sum, the only non-oracle path that handles it

    coef = _coefficients(w, adapters, scales, x)

    if strategy == "concat":
        if cache is not None:
            down_cat, up_cat, col = cache.down_cat, cache.up_cat, cache.col_adapter
            assert down_cat is not None and up_cat is not None and col is not None
        else:
            fs = _cast_factors(adapters, x.dtype, x.device)
            down_cat = torch.cat([f[0] for f in fs], dim=0)
            up_cat = torch.cat([f[2] for f in fs], dim=1)
            col = torch.repeat_interleave(
                torch.arange(len(adapters)), torch.tensor([a.rank for a in adapters])
            ).to(x.device)
        return _concat(x, down_cat, up_cat, col, coef, conv, out)

    factors = cache.factors if cache is not None else _cast_factors(adapters, x.dtype, x.device)
    if strategy == "reference":
        return _reference(x, factors, coef, conv, out)
    if used is None:
        used = w.cpu() != 0
    return _grouped(x, factors, coef, used, conv, out)


def _coefficients(w: Tensor, adapters: Sequence[LowRankAdapter], scales: Tensor, x: Tensor) -> Tensor:
    """``c[n, a] = w[n, a] · s_a`` on ``x``'s device in ``x``'s dtype.

    Formed in fp64 (an ``[N, k]`` tensor: free), so the only rounding is the one cast to the compute
    dtype. Row weights best live on the host (see :func:`lowrank_delta`); moving them to a GPU from
    pageable memory would make the host wait for the GPU on every call, so the product is formed on the
    host and uploaded from pinned memory without a sync (same fp64 arithmetic, same values).
    """
    if w.device.type == "cpu" and x.device.type == "cuda":
        host_scales = torch.tensor([a.scale for a in adapters], dtype=torch.float64)
        c = (w.to(torch.float64) * host_scales).to(x.dtype)
        try:
            c = c.pin_memory()
        except RuntimeError:  # pinned memory unavailable (some WSL setups): a synchronous copy
            return c.to(x.device)
        return c.to(x.device, non_blocking=True)
    return (w.to(scales.device, torch.float64) * scales).to(device=x.device, dtype=x.dtype)


def lowrank_delta(
    x: Tensor,
    adapters: Sequence[LowRankAdapter],
    row_weights: Tensor | Sequence,
    conv: ConvSpec | None = None,
    strategy: str = "auto",
    cache: ConcatCache | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Delta to add to a layer's output: ``Σ_a w[n, a] · s_a · up_a(down_a(x[n]))``.

    Args:
        x: the layer *input*, batch first: linear ``[N, ..., in]`` (any middle dims), conv
            ``[N, in, H, W]``. Its dtype and device are the compute dtype and device.
        adapters: ``k >= 1`` adapters of this layer (one kind, one in/out dim, one kernel).
        row_weights: ``[N, k]`` real weights (tensor or nested list); zeros skip work in the
            grouped strategy. Best kept on the CPU: ``auto``/``grouped`` read them on the host.
        conv: the base conv's :class:`ConvSpec`; ``None`` for a linear layer.
        strategy: ``"auto"`` (see :func:`choose_strategy`), ``"reference"``, ``"concat"`` or
            ``"grouped"``; ``"concat"`` with a Tucker adapter runs ``"grouped"`` (same sum).
        cache: optional :func:`build_concat_cache` result for these same adapter objects.
        out: optional layer output to accumulate into, in place (``out += delta``; then ``out``
            is returned). Must have the delta's shape and ``x``'s dtype/device. Saves allocating
            the delta and a separate add pass (linear layers fuse the add into the up GEMM).

    Returns:
        The delta (or ``out`` with the delta added), in ``x``'s dtype on ``x``'s device, shaped
        like the layer's output: linear ``[N, ..., out]``, conv ``[N, out, H', W']``. Rows whose
        weights are all zero are exactly zero (``out``: left untouched). No NaN/Inf check is
        made (that would cost a device sync per call).

    The implementation comes from :func:`kernels.dispatch.select` (op ``"lowrank_delta"``).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _, fn = dispatch.select("lowrank_delta", x.device)
    return fn(x, adapters, row_weights, conv=conv, strategy=strategy, cache=cache, out=out)


dispatch.register_backend(
    "lowrank_delta",
    "torch",
    lowrank_delta_torch,
    priority=0,
    available=lambda: (True, "pure torch (reference / concat / grouped); always available"),
)
