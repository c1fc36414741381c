"""Pure-torch math for merging LoRA deltas (no ComfyUI imports).

Conventions (kohya / ComfyUI):

* a LoRA module has ``down = A`` of shape ``[r, in]`` (conv: ``[r, in, kh, kw]``) and
  ``up = B`` of shape ``[out, r]`` (conv: ``[out, r, 1, 1]``);
* its weight delta is ``ΔW = c · B @ A`` with ``c = strength · alpha / r``;
* a conv delta ``[out, in, kh, kw]`` is handled as the matrix ``[out, in·kh·kw]``
  (the flattened ``A`` is ``[r, in·kh·kw]``, the flattened ``B`` is ``[out, r]``).

Every function computes in fp32 (inputs are cast with ``.float()``) and returns results on the
device of its input tensors. Methods follow PEFT's ``merge_utils`` (TIES, DARE, magnitude
pruning) and kohya's ``svd_merge_lora.py`` (SVD re-factorisation), applied in ΔW space.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "SIGN_METHODS",
    "concat_factors",
    "dare_drop",
    "dare_merge",
    "flatten_delta",
    "prune_magnitude",
    "svd_factorize",
    "ties_merge",
    "unflatten_like",
]

#: Majority-sign election methods accepted by :func:`ties_merge` / :func:`dare_merge`.
SIGN_METHODS: tuple[str, ...] = ("total", "frequency")

# Denominator floor for relative errors, so an all-zero delta reports 0.0 instead of NaN.
_TINY = torch.finfo(torch.float32).tiny


# --------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------


def _check_density(density: float, name: str = "density") -> float:
    """Return ``density`` as a float, or raise unless ``0 < density <= 1``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"{name} must be a real number in (0, 1], got {density!r}")
    d = float(density)
    # `not (0 < d <= 1)` is also true for NaN, which a plain `d <= 0 or d > 1` would let through.
    if not (0.0 < d <= 1.0):
        raise ValueError(f"{name} must be in (0, 1] (fraction of entries kept), got {density!r}")
    return d


def _check_weights(weights: Sequence[float], n: int, name: str = "weights") -> list[float]:
    """Return ``weights`` as floats, or raise unless there are ``n`` finite numbers."""
    if isinstance(weights, Tensor):
        weights = weights.detach().cpu().reshape(-1).tolist()
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"len({name}) must equal the number of tensors ({n}), got {len(weights)}")
    out: list[float] = []
    for i, w in enumerate(weights):
        try:
            f = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"{name}[{i}] must be a finite real number, got {w!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{name}[{i}] must be a finite real number, got {w!r}")
        out.append(f)
    return out


def _check_deltas(deltas: Sequence[Tensor], name: str = "deltas") -> list[Tensor]:
    """Raise unless ``deltas`` is a non-empty list of same-shape, same-device tensors."""
    deltas = list(deltas)
    if not deltas:
        raise ValueError(f"{name} must contain at least one tensor, got an empty list")
    for i, d in enumerate(deltas):
        if not isinstance(d, Tensor):
            raise ValueError(f"{name}[{i}] must be a torch.Tensor, got {type(d).__name__}")
    shape, device = deltas[0].shape, deltas[0].device
    for i, d in enumerate(deltas[1:], start=1):
        if d.shape != shape:
            raise ValueError(
                f"{name}[{i}] has shape {tuple(d.shape)}, but all {name} must share the shape of "
                f"{name}[0], {tuple(shape)}"
            )
        if d.device != device:
            raise ValueError(
                f"{name}[{i}] is on {d.device}, but all {name} must be on the device of "
                f"{name}[0] ({device})"
            )
    return deltas


def _check_int(value: int, name: str) -> int:
    """Return ``value`` as an int (numpy/torch integers accepted), rejecting bools and floats."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _check_sign_method(sign_method: str) -> str:
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"sign_method must be one of {SIGN_METHODS}, got {sign_method!r}")
    return sign_method


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------


def flatten_delta(delta: Tensor) -> Tensor:
    """View a weight delta as a matrix.

    Linear ``[out, in]`` is returned as is; conv ``[out, in, kh, kw]`` becomes
    ``[out, in·kh·kw]`` (row-major, which is how ``conv2d`` weights multiply unfolded
    patches, so ``B @ A`` on flattened factors equals the conv delta flattened).
    The dtype is left unchanged. Use :func:`unflatten_like` to restore the shape.
    """
    if not isinstance(delta, Tensor):
        raise ValueError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    if delta.ndim == 2:
        return delta
    if delta.ndim == 4:
        return delta.reshape(delta.shape[0], -1)
    raise ValueError(
        f"delta must be 2-D (linear [out, in]) or 4-D (conv [out, in, kh, kw]), "
        f"got shape {tuple(delta.shape)}"
    )


def unflatten_like(flat: Tensor, like: Tensor | torch.Size | Sequence[int]) -> Tensor:
    """Inverse of :func:`flatten_delta`: reshape the matrix ``flat`` to ``like``'s shape.

    ``like`` may be a tensor (its shape is used) or a shape. Raises ``ValueError`` when the
    element counts differ.
    """
    shape = tuple(like.shape) if isinstance(like, Tensor) else tuple(int(s) for s in like)
    if math.prod(shape) != flat.numel():
        raise ValueError(
            f"cannot reshape a tensor of {flat.numel()} elements {tuple(flat.shape)} to "
            f"{shape} ({math.prod(shape)} elements)"
        )
    return flat.reshape(shape)


# --------------------------------------------------------------------------------------------
# SVD re-factorisation
# --------------------------------------------------------------------------------------------


def _quantile(values: Tensor, q: float, max_direct: int = 2**24) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) without its input-size limit.

    ``torch.quantile`` refuses inputs above 2**24 elements, which a full-rank factor pair of a
    large SDXL/Flux layer can exceed, so the interpolation is done on a sorted copy instead.
    """
    v = values.reshape(-1)
    if v.numel() <= max_direct:
        return torch.quantile(v, q)
    s, _ = torch.sort(v)
    pos = q * (s.numel() - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, s.numel() - 1)
    frac = pos - lo
    return s[lo] + (s[hi] - s[lo]) * frac


def svd_factorize(
    delta: Tensor, rank: int, clamp_quantile: float | None = None
) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` LoRA factors of ``delta`` (truncated SVD, Eckart–Young).

    With ``M = flatten_delta(delta)`` in fp32 and ``M = U diag(S) Vhᵀ`` (thin SVD)::

        r'   = min(rank, min(M.shape))
        up   = U[:, :r'] · diag(S[:r'])      # singular values absorbed into up (kohya)
        down = Vh[:r', :]
        optional clamp:  h = quantile(|cat(up.flat, down.flat)|, clamp_quantile)
                         up, down = clamp(up, -h, h), clamp(down, -h, h)
        rel_error = ‖M − up @ down‖_F / max(‖M‖_F, tiny)

    Without clamping, ``rel_error² = Σ_{j>r'} S_j² / Σ_j S_j²`` (the optimum for rank r').
    ``rel_error`` is measured on the returned (possibly clamped) factors, so it reports what the
    caller actually stores; it is 0.0 for an all-zero delta.

    Clamp note: kohya/PEFT take the quantile of the *signed* values and clamp to ``±h``. Here the
    quantile is taken of ``|values|``, because the signs of singular-vector pairs are arbitrary
    (they can differ between LAPACK and cuSOLVER), and a signed quantile would make the clamp
    depend on that choice. For symmetric value distributions, signed q ≈ absolute ``2q − 1``,
    so kohya's 0.99 corresponds to about 0.98 here.

    Args:
        delta: ``[out, in]`` or ``[out, in, kh, kw]``, any float dtype/device.
        rank: target rank, ``>= 1``; capped at ``min(out, in·kh·kw)``.
        clamp_quantile: ``None`` (default, no clamp) or a value in ``(0, 1]``; kohya uses 0.99.

    Returns:
        ``(up, down, rel_error)``: contiguous fp32 factors on ``delta``'s device, shaped
        ``[out, r']`` / ``[r', in]`` (linear) or ``[out, r', 1, 1]`` / ``[r', in, kh, kw]``
        (conv), and the relative Frobenius error as a Python float.
    """
    flat = flatten_delta(delta).float()
    rank = _check_int(rank, "rank")
    if rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if clamp_quantile is not None:
        clamp_quantile = _check_density(clamp_quantile, name="clamp_quantile")
    if flat.numel() == 0:
        raise ValueError(f"delta must not be empty, got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("delta must contain only finite values (found NaN or Inf)")

    r = min(rank, min(flat.shape))
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    up = u[:, :r] * s[:r]  # == U[:, :r] @ diag(S[:r]) without building the diagonal matrix
    down = vh[:r]

    if clamp_quantile is not None:
        h = _quantile(torch.cat([up.reshape(-1), down.reshape(-1)]).abs(), clamp_quantile)
        up = up.clamp(-h, h)
        down = down.clamp(-h, h)

    norm = torch.linalg.matrix_norm(flat).item()
    err = torch.linalg.matrix_norm(flat - up @ down).item()
    rel_error = 0.0 if norm == 0.0 else err / max(norm, _TINY)

    if delta.ndim == 4:
        up = up.reshape(flat.shape[0], r, 1, 1)
        down = down.reshape(r, *delta.shape[1:])
    return up.contiguous(), down.contiguous(), float(rel_error)


# --------------------------------------------------------------------------------------------
# pruning / TIES / DARE
# --------------------------------------------------------------------------------------------


def prune_magnitude(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = int(density · numel)`` largest-magnitude entries, zero the rest.

    ``τ = ΔW ⊙ m`` with ``m_j = 1`` iff ``j ∈ topk(|ΔW|, k)`` (per tensor, as PEFT's
    ``magnitude_based_pruning``; ``int()`` truncates like PEFT). Among equal magnitudes at the
    threshold, which ones survive is up to ``torch.topk``. ``density == 1`` returns an fp32 copy.
    """
    if not isinstance(delta, Tensor):
        raise ValueError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    density = _check_density(density)
    x = delta.float()
    if density >= 1.0:
        return x.clone()
    k = int(density * x.numel())
    flat = x.reshape(-1)
    mask = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k=k, largest=True, sorted=False).indices
        mask[idx] = 1.0
    return (flat * mask).reshape(x.shape)


def _elect_and_disjoint_mean(taus: Tensor, weights: list[float], sign_method: str) -> Tensor:
    """TIES steps 2–3 on stacked task tensors ``taus`` of shape ``[n, ...]``.

    ``γ = sign(Σ_i τ_i)`` ("total") or ``sign(Σ_i sign(τ_i))`` ("frequency"), with 0 → +1;
    ``m_i = [sign(τ_i) == γ]`` (an exact 0 has sign 0 and never counts);
    ``merged = Σ_i w_i τ_i m_i / max(1, Σ_i m_i)``.
    The sign is elected on the *unweighted* τ_i, as in PEFT.
    """
    signs = taus.sign()
    votes = taus.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    majority = torch.where(votes >= 0, 1.0, -1.0)
    mask = (signs == majority).to(taus.dtype)
    w = torch.tensor(weights, dtype=taus.dtype, device=taus.device)
    w = w.reshape((-1,) + (1,) * (taus.ndim - 1))
    summed = (taus * w * mask).sum(dim=0)
    return summed / mask.sum(dim=0).clamp(min=1.0)


def ties_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    sign_method: str = "total",
) -> Tensor:
    """TIES merge (Yadav et al. 2023) with PEFT's ``ties`` semantics, in ΔW space.

    ::

        τ_i    = prune_magnitude(ΔW_i, density)              # trim
        γ      = sign(Σ_i τ_i)  or  sign(Σ_i sign(τ_i)), 0 → +1  # elect: "total" / "frequency"
        m_i    = [sign(τ_i) == γ]                            # pruned zeros never agree
        merged = Σ_i w_i τ_i m_i / max(1, Σ_i m_i)           # disjoint mean

    The weights play the paper's λ role; they scale the tensors but not the election.

    Args:
        deltas: same-shape tensors on one device.
        weights: one finite weight per delta.
        density: fraction kept by magnitude pruning, in ``(0, 1]``.
        sign_method: ``"total"`` or ``"frequency"``.

    Returns:
        fp32 tensor of the deltas' shape on their device.
    """
    deltas = _check_deltas(deltas)
    weights = _check_weights(weights, len(deltas))
    density = _check_density(density)
    _check_sign_method(sign_method)
    taus = torch.stack([prune_magnitude(d, density) for d in deltas], dim=0)
    return _elect_and_disjoint_mean(taus, weights, sign_method)


def dare_drop(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE drop-and-rescale: ``τ = ΔW ⊙ m / density`` with ``m_j ~ Bernoulli(density)``.

    ``E[τ] = ΔW``. The mask is drawn on the CPU from ``generator`` (so a seed gives the same
    mask on every device and torch build that shares the CPU RNG), then moved to ``delta``'s
    device. ``density == 1`` returns an fp32 copy without drawing (the mask would be all ones,
    and ``x · 1 / 1`` is exact, so the result is identical).
    """
    if not isinstance(delta, Tensor):
        raise ValueError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
    density = _check_density(density)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU torch.Generator (torch.Generator('cpu')), got {generator!r}"
        )
    x = delta.float()
    if density >= 1.0:
        return x.clone()
    probs = torch.full(tuple(x.shape), density, dtype=torch.float32)
    mask = torch.bernoulli(probs, generator=generator).to(x.device)
    return x * mask / density


def dare_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    density: float,
    seed: int,
    ties: bool = False,
    sign_method: str = "total",
) -> Tensor:
    """DARE merge (Yu et al. 2023) with PEFT's ``dare_linear`` / ``dare_ties`` semantics.

    One ``torch.Generator("cpu").manual_seed(seed)`` is consumed in list order::

        τ_i = dare_drop(ΔW_i, density)                      # Bernoulli(density) mask / density
        dare_linear (ties=False): merged = Σ_i w_i τ_i
        dare_ties   (ties=True):  TIES election (``sign_method``) + disjoint mean on τ_i,
                                  without magnitude pruning

    Args:
        deltas: same-shape tensors on one device.
        weights: one finite weight per delta.
        density: keep probability, in ``(0, 1]``; 1 gives the plain weighted sum (or TIES at
            density 1 when ``ties``).
        seed: RNG seed (any Python int accepted by ``Generator.manual_seed``).
        ties: use TIES sign election + disjoint mean instead of the plain sum.
        sign_method: ``"total"`` or ``"frequency"`` (only used when ``ties``).

    Returns:
        fp32 tensor of the deltas' shape on their device.
    """
    deltas = _check_deltas(deltas)
    weights = _check_weights(weights, len(deltas))
    density = _check_density(density)
    _check_sign_method(sign_method)
    seed = _check_int(seed, "seed")

    gen = torch.Generator("cpu")
    gen.manual_seed(seed)
    taus = [dare_drop(d, density, gen) for d in deltas]
    if ties:
        return _elect_and_disjoint_mean(torch.stack(taus, dim=0), weights, sign_method)
    merged = torch.zeros_like(taus[0])
    for w, t in zip(weights, taus):
        merged.add_(t, alpha=w)
    return merged


# --------------------------------------------------------------------------------------------
# exact concatenation
# --------------------------------------------------------------------------------------------


def concat_factors(
    ups: Sequence[Tensor], downs: Sequence[Tensor], coeffs: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Exact rank stacking: ``B_cat @ A_cat = Σ_i c_i B_i @ A_i``.

    ::

        B_cat = [B_1, B_2, …]                   (columns; conv: dim 1 of [out, r_i, 1, 1])
        A_cat = [c_1 A_1; c_2 A_2; …]           (rows;    conv: dim 0 of [r_i, in, kh, kw])

    The block product gives ``B_cat A_cat = Σ_i B_i (c_i A_i)``, exactly. The coefficient goes on
    the down side only: splitting it as ``√|c_i|`` on both sides (PEFT/kohya style) needs a sign
    convention and adds a rounding step, while folding ``c_i`` into ``A_i`` alone is exact for any
    sign and simpler. Store ``alpha = R = Σ_i r_i`` with the result so a loader's ``alpha / R``
    scale is 1. Tucker (``lora_mid``) factors are not accepted: materialise those first.

    Args:
        ups: ``[out, r_i]`` (linear) or ``[out, r_i, 1, 1]`` (conv); same ``ndim`` and ``out``.
        downs: ``[r_i, in]`` or ``[r_i, in, kh, kw]``; same trailing shape.
        coeffs: finite ``c_i`` (typically ``strength_i · alpha_i / r_i``), negatives allowed.

    Returns:
        ``(up, down)``: contiguous fp32 on the inputs' device, with rank ``R = Σ r_i``.
    """
    ups, downs = list(ups), list(downs)
    if not ups:
        raise ValueError("ups must contain at least one tensor, got an empty list")
    if len(downs) != len(ups):
        raise ValueError(f"len(downs) must equal len(ups) ({len(ups)}), got {len(downs)}")
    coeffs = _check_weights(coeffs, len(ups), name="coeffs")

    ref_up, ref_down = ups[0], downs[0]
    for name, seq in (("ups", ups), ("downs", downs)):
        for i, t in enumerate(seq):
            if not isinstance(t, Tensor):
                raise ValueError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if t.device != ref_up.device:
                raise ValueError(
                    f"{name}[{i}] is on {t.device}, but all factors must be on {ref_up.device}"
                )
    if ref_up.ndim not in (2, 4):
        raise ValueError(
            f"ups[0] must be 2-D [out, r] or 4-D [out, r, 1, 1], got shape {tuple(ref_up.shape)}"
        )
    for i, (up, down) in enumerate(zip(ups, downs)):
        if up.ndim != ref_up.ndim or up.shape[0] != ref_up.shape[0]:
            raise ValueError(
                f"ups[{i}] has shape {tuple(up.shape)}; all ups must have ndim {ref_up.ndim} and "
                f"out dim {ref_up.shape[0]} like ups[0] {tuple(ref_up.shape)}"
            )
        if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
            raise ValueError(
                f"ups[{i}] must be a 1x1 conv [out, r, 1, 1], got {tuple(up.shape)} "
                f"(Tucker/mid factors must be materialised by the caller)"
            )
        if down.ndim != up.ndim:
            raise ValueError(
                f"downs[{i}] has shape {tuple(down.shape)}, expected {up.ndim}-D to match "
                f"ups[{i}] {tuple(up.shape)}"
            )
        if down.shape[0] != up.shape[1]:
            raise ValueError(
                f"rank mismatch at index {i}: ups[{i}] has {up.shape[1]} columns but downs[{i}] "
                f"has {down.shape[0]} rows"
            )
        if down.shape[1:] != ref_down.shape[1:]:
            raise ValueError(
                f"downs[{i}] has shape {tuple(down.shape)}; all downs must share the trailing "
                f"shape {tuple(ref_down.shape[1:])} of downs[0]"
            )

    up = torch.cat([u.float() for u in ups], dim=1)
    down = torch.cat([d.float() * c for d, c in zip(downs, coeffs)], dim=0)
    return up.contiguous(), down.contiguous()
