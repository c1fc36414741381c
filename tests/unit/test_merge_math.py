"""Oracle tests for kernels.merge_math (pure torch, CPU, fast).

Each test checks the module against an independent computation: literal hand-worked values,
Eckart–Young via singular values in float64, torch.topk, a per-element Python reference for
TIES, or a direct re-derivation of the DARE masks from the same seed.
"""

from __future__ import annotations

import pytest
import torch

from kernels import merge_math as mm


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator("cpu")
    g.manual_seed(seed)
    return g


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference ‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# --------------------------------------------------------------------------------------------
# flatten / unflatten
# --------------------------------------------------------------------------------------------


def test_flatten_roundtrip_linear_and_conv() -> None:
    lin = _randn(5, 7)
    assert mm.flatten_delta(lin).shape == (5, 7)
    conv = _randn(4, 3, 3, 3)
    flat = mm.flatten_delta(conv)
    assert flat.shape == (4, 27)
    assert torch.equal(flat[1, 9:18], conv[1, 1].reshape(-1))  # row-major over (in, kh, kw)
    assert torch.equal(mm.unflatten_like(flat, conv), conv)
    assert torch.equal(mm.unflatten_like(flat, (4, 3, 3, 3)), conv)


# --------------------------------------------------------------------------------------------
# svd_factorize
# --------------------------------------------------------------------------------------------

SHAPES = [(24, 40), (40, 24), (16, 8, 3, 3), (16, 32, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
def test_svd_full_rank_reproduces_delta(shape: tuple[int, ...]) -> None:
    delta = _randn(*shape, seed=1)
    flat = delta.reshape(shape[0], -1)
    full = min(flat.shape)
    up, down, err = mm.svd_factorize(delta, rank=full)
    if len(shape) == 4:
        assert up.shape == (shape[0], full, 1, 1)
        assert down.shape == (full, *shape[1:])
    else:
        assert up.shape == (shape[0], full)
        assert down.shape == (full, shape[1])
    assert up.dtype == down.dtype == torch.float32
    assert up.is_contiguous() and down.is_contiguous()
    recon = up.reshape(shape[0], full) @ down.reshape(full, -1)
    assert _rel(recon, flat) < 1e-5
    assert err < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_truncation_is_eckart_young_optimal(shape: tuple[int, ...], rank: int) -> None:
    delta = _randn(*shape, seed=2)
    flat = delta.reshape(shape[0], -1)
    s = torch.linalg.svdvals(flat.double())
    expected_sq = (s[rank:] ** 2).sum() / (s**2).sum()

    up, down, err = mm.svd_factorize(delta, rank=rank)
    assert up.shape[1] == rank and down.shape[0] == rank
    assert abs(err**2 - expected_sq.item()) < 1e-5

    # the reported error equals an independent recomputation from the returned factors
    recon = up.reshape(shape[0], rank).double() @ down.reshape(rank, -1).double()
    independent = _rel(recon, flat)  # ‖M − up@down‖_F / ‖M‖_F in float64
    assert err == pytest.approx(independent, rel=1e-4, abs=1e-6)


def test_svd_rank_above_min_dim_is_capped() -> None:
    delta = _randn(6, 10, seed=3)
    up, down, err = mm.svd_factorize(delta, rank=50)
    assert up.shape == (6, 6) and down.shape == (6, 10)
    assert err < 1e-5
    conv = _randn(4, 2, 3, 3, seed=3)  # flat [4, 18] -> max rank 4
    up, down, _ = mm.svd_factorize(conv, rank=9)
    assert up.shape == (4, 4, 1, 1) and down.shape == (4, 2, 3, 3)


def test_svd_zero_delta() -> None:
    for shape in [(8, 12), (8, 4, 3, 3)]:
        up, down, err = mm.svd_factorize(torch.zeros(shape), rank=4)
        assert err == 0.0
        assert torch.isfinite(up).all() and torch.isfinite(down).all()
        assert torch.count_nonzero(up.reshape(8, -1) @ down.reshape(4, -1)) == 0


def test_svd_low_rank_input_is_recovered_exactly() -> None:
    b, a = _randn(20, 3, seed=4), _randn(3, 30, seed=5)
    up, down, err = mm.svd_factorize(b @ a, rank=3)
    assert err < 1e-5
    assert _rel(up @ down, b @ a) < 1e-5


def test_svd_accepts_half_precision_and_returns_fp32() -> None:
    delta = _randn(12, 16, seed=6).half()
    up, down, _ = mm.svd_factorize(delta, rank=12)
    assert up.dtype == torch.float32 and down.dtype == torch.float32
    assert _rel(up @ down, delta.float()) < 1e-5


def test_svd_clamp_bounds_factors_at_abs_quantile() -> None:
    delta = _randn(32, 48, seed=7)
    delta[0, 0] = 200.0  # an outlier the clamp should cut
    q = 0.9
    up0, down0, err0 = mm.svd_factorize(delta, rank=8)
    hi = torch.quantile(torch.cat([up0.reshape(-1), down0.reshape(-1)]).abs(), q)
    up, down, err = mm.svd_factorize(delta, rank=8, clamp_quantile=q)
    assert torch.allclose(up, up0.clamp(-hi, hi)) and torch.allclose(down, down0.clamp(-hi, hi))
    assert up.abs().max() <= hi + 1e-6 and down.abs().max() <= hi + 1e-6
    # the error is measured on the clamped factors, so it cannot beat the SVD optimum
    independent = _rel(up @ down, delta)
    assert err == pytest.approx(independent, rel=1e-4)
    assert err >= err0 - 1e-6


def test_sort_based_quantile_matches_torch_quantile() -> None:
    # the sort-based branch normally runs above 2**24 elements; force it on a small input
    v = _randn(1001, seed=8)
    for q in (0.0, 0.37, 0.99, 1.0):
        assert torch.allclose(mm._quantile(v, q, max_direct=0), torch.quantile(v, q))
        assert torch.allclose(mm._quantile(v, q), torch.quantile(v, q))


# --------------------------------------------------------------------------------------------
# prune_magnitude
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.99])
@pytest.mark.parametrize("shape", [(17, 23), (6, 4, 3, 3)])
def test_prune_magnitude_keeps_exactly_top_k(density: float, shape: tuple[int, ...]) -> None:
    delta = _randn(*shape, seed=9)
    out = mm.prune_magnitude(delta, density)
    k = int(density * delta.numel())
    idx = torch.topk(delta.abs().reshape(-1), k).indices
    expected = torch.zeros(delta.numel())
    expected[idx] = delta.reshape(-1)[idx]
    assert out.shape == delta.shape
    assert torch.equal(out.reshape(-1), expected)
    assert torch.count_nonzero(out) == k


def test_prune_magnitude_density_one_is_a_copy() -> None:
    delta = _randn(5, 5, seed=10)
    out = mm.prune_magnitude(delta, 1.0)
    assert torch.equal(out, delta) and out.data_ptr() != delta.data_ptr()


def test_prune_magnitude_hand_example() -> None:
    delta = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1])
    assert torch.equal(mm.prune_magnitude(delta, 0.4), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))
    # int(0.1 * 5) == 0 -> everything pruned (PEFT's truncation)
    assert torch.count_nonzero(mm.prune_magnitude(delta, 0.1)) == 0


# --------------------------------------------------------------------------------------------
# ties_merge
# --------------------------------------------------------------------------------------------

D1 = torch.tensor([1.0, -2.0, 3.0, 0.5])
D2 = torch.tensor([-3.0, 1.0, 2.0, -0.25])


def test_ties_two_deltas_density_one_total() -> None:
    # sum = [-2, -1, 5, 0.25] -> majority [-, -, +, +]
    # e0: only D2 agrees -> 0.5*-3 = -1.5 ; e1: only D1 -> -2 ; e2: both -> (3 + 0.5*2)/2 = 2
    # e3: only D1 -> 0.5
    out = mm.ties_merge([D1, D2], [1.0, 0.5], density=1.0, sign_method="total")
    assert torch.equal(out, torch.tensor([-1.5, -2.0, 2.0, 0.5]))


def test_ties_two_deltas_density_one_frequency() -> None:
    # sign sums = [0, 0, 2, 0] -> ties go to + -> majority [+, +, +, +]
    # e0: D1 -> 1 ; e1: D2 -> 0.5*1 = 0.5 ; e2: (3 + 1)/2 = 2 ; e3: D1 -> 0.5
    out = mm.ties_merge([D1, D2], [1.0, 0.5], density=1.0, sign_method="frequency")
    assert torch.equal(out, torch.tensor([1.0, 0.5, 2.0, 0.5]))


A3 = torch.tensor([10.0, -1.0, 0.5, 2.0])  # density 0.75 -> k=3, drops 0.5  -> [10, -1, 0, 2]
B3 = torch.tensor([-1.0, 3.0, -4.0, -0.2])  # drops -0.2 -> [-1, 3, -4, 0]
C3 = torch.tensor([-2.0, 0.1, -1.0, 1.0])  # drops 0.1  -> [-2, 0, -1, 1]
W3 = [1.0, 2.0, 0.5]


def test_ties_three_deltas_pruned_total() -> None:
    # pruned sum = [7, 2, -5, 3] -> majority [+, +, -, +]; pruned zeros (sign 0) never count
    # e0: A -> 10/1 ; e1: B -> 2*3 = 6 ; e2: B, C -> (2*-4 + 0.5*-1)/2 = -4.25
    # e3: A, C -> (2 + 0.5*1)/2 = 1.25
    out = mm.ties_merge([A3, B3, C3], W3, density=0.75, sign_method="total")
    assert torch.equal(out, torch.tensor([10.0, 6.0, -4.25, 1.25]))


def test_ties_three_deltas_pruned_frequency() -> None:
    # sign sums = [-1, 0, -2, 2] -> majority [-, +, -, +]
    # e0: B, C -> (2*-1 + 0.5*-2)/2 = -1.5 ; others as in the "total" case
    out = mm.ties_merge([A3, B3, C3], W3, density=0.75, sign_method="frequency")
    assert torch.equal(out, torch.tensor([-1.5, 6.0, -4.25, 1.25]))


def test_ties_all_zero_column_gives_zero() -> None:
    a = torch.tensor([0.0, 1.0])
    b = torch.tensor([0.0, -1.0])
    # e0: nobody has a nonzero sign -> 0 / clamp(0, 1) = 0 ; e1: total 0 -> +, only a -> 1
    out = mm.ties_merge([a, b], [1.0, 1.0], density=1.0)
    assert torch.equal(out, torch.tensor([0.0, 1.0]))


def test_ties_agreeing_signs_density_one_is_weighted_mean() -> None:
    base = _randn(6, 9, seed=11)
    deltas = [base.sign() * (_randn(6, 9, seed=s).abs() + 0.1) for s in (12, 13, 14)]
    w = [0.7, -0.2, 1.3]  # a negative weight does not flip the election (unweighted)
    out = mm.ties_merge(deltas, w, density=1.0)
    expected = sum(wi * d for wi, d in zip(w, deltas)) / len(deltas)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def _ties_reference(deltas, weights, density, method):
    """Per-element Python loop, written independently of the vectorised module code."""
    pruned = []
    for d in deltas:
        flat = d.reshape(-1).tolist()
        k = int(density * len(flat))
        keep = set(sorted(range(len(flat)), key=lambda j: -abs(flat[j]))[:k])
        pruned.append([v if j in keep else 0.0 for j, v in enumerate(flat)])
    sgn = lambda v: (v > 0) - (v < 0)  # noqa: E731
    out = []
    for j in range(len(pruned[0])):
        col = [p[j] for p in pruned]
        vote = sum(col) if method == "total" else sum(sgn(v) for v in col)
        maj = 1 if vote >= 0 else -1
        agree = [i for i, v in enumerate(col) if sgn(v) == maj]
        out.append(sum(weights[i] * col[i] for i in agree) / max(1, len(agree)))
    return torch.tensor(out).reshape(deltas[0].shape)


@pytest.mark.parametrize("method", mm.SIGN_METHODS)
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
def test_ties_matches_elementwise_reference(method: str, density: float) -> None:
    deltas = [_randn(5, 3, 2, 2, seed=s) for s in (20, 21, 22, 23)]
    w = [1.0, 0.5, -0.75, 2.0]
    out = mm.ties_merge(deltas, w, density, sign_method=method)
    ref = _ties_reference(deltas, w, density, method)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------------


def test_dare_same_seed_same_result_different_seed_differs() -> None:
    deltas = [_randn(8, 12, seed=s) for s in (30, 31)]
    for ties in (False, True):
        a = mm.dare_merge(deltas, [1.0, 0.5], 0.5, seed=123, ties=ties)
        b = mm.dare_merge(deltas, [1.0, 0.5], 0.5, seed=123, ties=ties)
        c = mm.dare_merge(deltas, [1.0, 0.5], 0.5, seed=124, ties=ties)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_dare_linear_matches_masks_rederived_from_seed() -> None:
    deltas = [_randn(4, 6, seed=s) for s in (32, 33, 34)]
    w, p, seed = [0.5, -1.0, 2.0], 0.6, 77
    g = _gen(seed)
    masks = [torch.bernoulli(torch.full((4, 6), p), generator=g) for _ in deltas]  # list order
    expected = sum(wi * d * m / p for wi, d, m in zip(w, deltas, masks))
    out = mm.dare_merge(deltas, w, p, seed=seed)
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_dare_ties_is_ties_on_dropped_tensors() -> None:
    deltas = [_randn(4, 6, seed=s) for s in (35, 36, 37)]
    w, p, seed = [1.0, 0.25, 0.5], 0.5, 5
    g = _gen(seed)
    dropped = [mm.dare_drop(d, p, g) for d in deltas]
    for method in mm.SIGN_METHODS:
        expected = _ties_reference(dropped, w, 1.0, method)  # no magnitude pruning in DARE-TIES
        out = mm.dare_merge(deltas, w, p, seed=seed, ties=True, sign_method=method)
        assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_dare_drop_is_unbiased() -> None:
    delta = _randn(16, seed=40)
    g = _gen(41)
    draws = 2000
    acc = torch.zeros_like(delta)
    for _ in range(draws):
        acc += mm.dare_drop(delta, 0.7, g)
    mean = acc / draws
    # per entry std of the mean is |x|·sqrt((1-p)/p)/sqrt(n) ≈ 1.5% |x|; allow 5% in norm
    assert _rel(mean, delta) < 0.05


def test_dare_drop_keeps_about_density_and_rescales() -> None:
    delta = torch.ones(100, 100)
    out = mm.dare_drop(delta, 0.25, _gen(42))
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    assert torch.equal(out[kept], torch.full((int(kept.sum()),), 4.0))


def test_dare_density_one_is_exact_weighted_sum() -> None:
    deltas = [_randn(7, 5, seed=s) for s in (43, 44)]
    w = [0.3, -1.7]
    out = mm.dare_merge(deltas, w, 1.0, seed=0)
    expected = torch.zeros(7, 5)
    expected.add_(deltas[0], alpha=w[0]).add_(deltas[1], alpha=w[1])
    assert torch.equal(out, expected)
    # and DARE-TIES at density 1 is plain TIES at density 1
    dare_ties = mm.dare_merge(deltas, w, 1.0, seed=0, ties=True)
    assert torch.equal(dare_ties, mm.ties_merge(deltas, w, 1.0))


# --------------------------------------------------------------------------------------------
# concat_factors
# --------------------------------------------------------------------------------------------


def test_concat_linear_exact_with_negative_coeffs() -> None:
    ranks, out_dim, in_dim = (2, 5, 3), 12, 20
    ups = [_randn(out_dim, r, seed=50 + i) for i, r in enumerate(ranks)]
    downs = [_randn(r, in_dim, seed=60 + i) for i, r in enumerate(ranks)]
    coeffs = [0.8, -1.25, 0.5]
    up, down = mm.concat_factors(ups, downs, coeffs)
    assert up.shape == (out_dim, sum(ranks)) and down.shape == (sum(ranks), in_dim)
    expected = sum(c * u @ d for c, u, d in zip(coeffs, ups, downs))
    assert _rel(up @ down, expected) < 1e-5


def test_concat_conv_exact_with_negative_coeffs() -> None:
    ranks, out_ch, in_ch = (4, 2), 8, 6
    ups = [_randn(out_ch, r, 1, 1, seed=70 + i) for i, r in enumerate(ranks)]
    downs = [_randn(r, in_ch, 3, 3, seed=80 + i) for i, r in enumerate(ranks)]
    coeffs = [-0.5, 2.0]
    up, down = mm.concat_factors(ups, downs, coeffs)
    assert up.shape == (out_ch, 6, 1, 1) and down.shape == (6, in_ch, 3, 3)
    expected = sum(
        c * u.reshape(out_ch, -1) @ d.reshape(d.shape[0], -1) for c, u, d in zip(coeffs, ups, downs)
    )
    got = up.reshape(out_ch, -1) @ down.reshape(6, -1)
    assert _rel(got, expected) < 1e-5
    # as a conv: applying down (3x3) then up (1x1) equals the sum of the individual LoRA convs
    x = _randn(1, in_ch, 7, 7, seed=90)
    lhs = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), up)
    rhs = sum(
        c * torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, d), u)
        for c, u, d in zip(coeffs, ups, downs)
    )
    assert _rel(lhs, rhs) < 1e-5


def test_concat_puts_coefficient_on_down_only() -> None:
    ups = [torch.ones(2, 1), torch.ones(2, 1)]
    downs = [torch.ones(1, 3), torch.ones(1, 3)]
    up, down = mm.concat_factors(ups, downs, [2.0, -3.0])
    assert torch.equal(up, torch.ones(2, 2))
    assert torch.equal(down, torch.tensor([[2.0] * 3, [-3.0] * 3]))


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------

X = torch.ones(3, 4)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: mm.flatten_delta(torch.ones(3)), "2-D"),
        (lambda: mm.unflatten_like(X, (5, 5)), "reshape"),
        (lambda: mm.svd_factorize(X, rank=0), "rank"),
        (lambda: mm.svd_factorize(X, rank=2.0), "rank"),
        (lambda: mm.svd_factorize(torch.ones(2, 3, 4), rank=1), "2-D"),
        (lambda: mm.svd_factorize(X, rank=1, clamp_quantile=1.5), "clamp_quantile"),
        (lambda: mm.svd_factorize(torch.full((3, 4), float("nan")), rank=1), "finite"),
        (lambda: mm.prune_magnitude(X, 0.0), "density"),
        (lambda: mm.prune_magnitude(X, 1.01), "density"),
        (lambda: mm.prune_magnitude(X, float("nan")), "density"),
        (lambda: mm.ties_merge([], [], 0.5), "deltas"),
        (lambda: mm.ties_merge([X, X], [1.0], 0.5), "weights"),
        (lambda: mm.ties_merge([X, torch.ones(4, 3)], [1.0, 1.0], 0.5), "shape"),
        (lambda: mm.ties_merge([X, X], [1.0, float("inf")], 0.5), r"weights\[1\]"),
        (lambda: mm.ties_merge([X, X], [1.0, 1.0], 0.5, sign_method="mean"), "sign_method"),
        (lambda: mm.dare_drop(X, -0.1, _gen(0)), "density"),
        (lambda: mm.dare_drop(X, 0.5, None), "generator"),
        (lambda: mm.dare_merge([X, X], [1.0, 1.0], 0.5, seed=1.5), "seed"),
        (lambda: mm.dare_merge([X, X], [1.0, float("nan")], 0.5, seed=1), "weights"),
        (lambda: mm.dare_merge([X], [1.0], 2.0, seed=1), "density"),
        (lambda: mm.concat_factors([], [], []), "ups"),
        (lambda: mm.concat_factors([torch.ones(3, 2)], [torch.ones(2, 4)], [1.0, 2.0]), "coeffs"),
        (lambda: mm.concat_factors([torch.ones(3, 2)], [], [1.0]), "downs"),
        (lambda: mm.concat_factors([torch.ones(3, 2)], [torch.ones(3, 4)], [1.0]), "rank mismatch"),
        (
            lambda: mm.concat_factors(
                [torch.ones(3, 2), torch.ones(5, 2)], [torch.ones(2, 4)] * 2, [1.0, 1.0]
            ),
            "out dim",
        ),
        (
            lambda: mm.concat_factors(
                [torch.ones(3, 2), torch.ones(3, 2, 1, 1)],
                [torch.ones(2, 4), torch.ones(2, 4, 1, 1)],
                [1.0, 1.0],
            ),
            "ndim",
        ),
        (
            lambda: mm.concat_factors(
                [torch.ones(3, 2), torch.ones(3, 2)],
                [torch.ones(2, 4), torch.ones(2, 5)],
                [1.0, 1.0],
            ),
            "trailing shape",
        ),
        (
            lambda: mm.concat_factors([torch.ones(3, 2, 3, 3)], [torch.ones(2, 4, 3, 3)], [1.0]),
            "1x1",
        ),
        (
            lambda: mm.concat_factors([torch.ones(3, 2)], [torch.ones(2, 4)], [float("inf")]),
            "coeffs",
        ),
    ],
)
def test_invalid_arguments_raise_value_error(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
