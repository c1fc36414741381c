"""Oracle tests for kernels.lowrank, kernels.dense and kernels.dispatch (pure torch, CPU, fast).

The oracle is independent of the kernels' factored forward: for every batch row ``n`` it builds
the *dense* merged weight ``W + Σ_a w[n, a] · s_a · ΔW_a`` in float64 and returns
``layer(x[n], W + Σ…) − layer(x[n], W)`` with ``F.linear`` / ``F.conv2d``. Dense deltas:

* linear: ``ΔW = up @ down``;
* conv (kohya LoCon): ``ΔW = (up.flatten(1) @ down.flatten(1)).reshape(out, in, kh, kw)``;
* conv Tucker (LyCORIS):
  ``ΔW = einsum("pqhw,op,qi->oihw", mid, up[:, :, 0, 0], down[:, :, 0, 0])``.

Tolerance: the kernels run in fp32 and must match the float64 oracle to 1e-5 relative
(Frobenius norm of the difference over the norm of the oracle). Rows whose weights are all zero
must be exactly zero. With a float64 input the kernels compute in float64 and must match to 1e-12.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from kernels import dense, dispatch, lowrank, lowrank_routed
from kernels.lowrank import ConvSpec, LowRankAdapter
from kernels.lowrank_routed import PreparedLowRank, add_routed, plan_rows

TOL = 1e-5
N = 5
IN, OUT = 12, 10  # linear
CIN, COUT, HW = 6, 7, 9  # conv
RANKS = (3, 5, 2)
SCALES = (0.75, -1.5, 2.0)
STRIDED = ConvSpec(stride=2, padding=1)  # with a 3x3 kernel: 9x9 -> 5x5


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The tensors here are tiny: one intra-op thread avoids OpenMP spin-waits on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator("cpu")
    g.manual_seed(seed)
    return g


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius difference ‖a − b‖ / ‖b‖ in float64."""
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


# --------------------------------------------------------------------------------------------
# problem builders
# --------------------------------------------------------------------------------------------

LAYOUTS = ("linear2d", "linear3d", "conv3x3_s2p1", "conv1x1", "tucker3x3_s2p1")
WEIGHT_KINDS = ("ones", "onehot", "blocks", "mixed")


def _adapter(layout: str, i: int, seed: int) -> LowRankAdapter:
    r, s = RANKS[i], SCALES[i]
    if layout.startswith("linear"):
        return LowRankAdapter(_randn(r, IN, seed=seed), _randn(OUT, r, seed=seed + 1), scale=s)
    up = _randn(COUT, r, 1, 1, seed=seed + 1)
    if layout.startswith("tucker"):
        down = _randn(r, CIN, 1, 1, seed=seed)
        return LowRankAdapter(down, up, mid=_randn(r, r, 3, 3, seed=seed + 2), scale=s)
    k = 1 if layout == "conv1x1" else 3
    return LowRankAdapter(_randn(r, CIN, k, k, seed=seed), up, scale=s)


def _problem(layout: str, k: int, seed: int = 0):
    """``(x, adapters, conv, base_weight)`` for a layout; ``conv_mixed`` mixes Tucker and LoCon."""
    if layout == "conv_mixed":
        adapters = [
            _adapter("conv3x3_s2p1", 0, seed),
            _adapter("tucker3x3_s2p1", 1, seed + 10),
            _adapter("conv3x3_s2p1", 2, seed + 20),
        ][:k]
    else:
        adapters = [_adapter(layout, i, seed + 10 * i) for i in range(k)]
    if layout == "linear2d":
        return _randn(N, IN, seed=seed + 99), adapters, None, _randn(OUT, IN, seed=seed + 98)
    if layout == "linear3d":
        return _randn(N, 4, IN, seed=seed + 99), adapters, None, _randn(OUT, IN, seed=seed + 98)
    conv = ConvSpec() if layout == "conv1x1" else STRIDED
    kk = 1 if layout == "conv1x1" else 3
    x = _randn(N, CIN, HW, HW, seed=seed + 99)
    return x, adapters, conv, _randn(COUT, CIN, kk, kk, seed=seed + 98)


def _weights(kind: str, k: int) -> torch.Tensor:
    if kind == "ones":
        return torch.ones(N, k)
    if kind == "onehot":  # routing: row n uses adapter n mod k (scattered rows)
        return F.one_hot(torch.arange(N) % k, k).float()
    if kind == "blocks":  # routing in contiguous blocks, as ComfyUI batches conds (row slices)
        if k == 1:
            return torch.tensor([[0.0], [1.0], [0.5], [-2.0], [0.0]])
        return F.one_hot(torch.tensor([0, 0, 1, 1, 2])[:N] % k, k).float() * 1.5
    # mixed: zeros, negatives, non-unit values, and one all-zero row (row 1)
    full = torch.tensor(
        [[0.7, 0.0, -1.3], [0.0, 0.0, 0.0], [2.0, 0.5, 0.0], [-0.4, 0.0, 0.0], [0.0, 1.0, 1.0]]
    )
    if k == 1:
        return torch.tensor([[0.7], [0.0], [-1.3], [2.0], [-0.5]])
    return full[:, :k]


def _dense_delta_of(a: LowRankAdapter) -> torch.Tensor:
    down, up = a.down.double(), a.up.double()
    if a.mid is not None:
        return torch.einsum("pqhw,op,qi->oihw", a.mid.double(), up[:, :, 0, 0], down[:, :, 0, 0])
    if down.ndim == 2:
        return up @ down
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _layer(x: torch.Tensor, weight: torch.Tensor, conv: ConvSpec | None) -> torch.Tensor:
    if conv is None:
        return F.linear(x, weight)
    return F.conv2d(x, weight, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)


def _oracle_merged(x, weight, dense_deltas, w, conv) -> torch.Tensor:
    """Per row: layer(x[n], W + Σ_a w[n, a] ΔW_a) − layer(x[n], W), all in float64."""
    x, weight, w = x.double(), weight.double(), w.double()
    rows = []
    for n in range(x.shape[0]):
        merged = weight.clone()
        for a, dw in enumerate(dense_deltas):
            merged = merged + w[n, a] * dw.double()
        xn = x[n : n + 1]
        rows.append(_layer(xn, merged, conv) - _layer(xn, weight, conv))
    return torch.cat(rows, dim=0)


def _oracle(x, adapters, w, conv, weight) -> torch.Tensor:
    deltas = [a.scale * _dense_delta_of(a) for a in adapters]
    return _oracle_merged(x, weight, deltas, w, conv)


# --------------------------------------------------------------------------------------------
# lowrank_delta against the oracle
# --------------------------------------------------------------------------------------------

CASES = [
    (layout, k, wk) for layout in LAYOUTS for k in (1, 3) for wk in WEIGHT_KINDS
] + [("conv_mixed", 3, wk) for wk in WEIGHT_KINDS]


@pytest.mark.parametrize("strategy", ["reference", "concat", "grouped", "auto"])
@pytest.mark.parametrize(("layout", "k", "weights"), CASES)
def test_lowrank_delta_matches_dense_oracle(
    layout: str, k: int, weights: str, strategy: str
) -> None:
    x, adapters, conv, weight = _problem(layout, k)
    w = _weights(weights, k)
    got = lowrank.lowrank_delta(x, adapters, w, conv=conv, strategy=strategy)
    want = _oracle(x, adapters, w, conv, weight)
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    assert _rel(got, want) < TOL
    zero_rows = (w == 0).all(dim=1)
    assert torch.equal(got[zero_rows], torch.zeros_like(got[zero_rows]))


def test_linear_4d_input_and_list_weights() -> None:
    """Any number of middle dims; row weights as a nested list."""
    adapters = [_adapter("linear", i, 10 * i) for i in range(2)]
    x = _randn(3, 2, 4, IN, seed=5)
    w = [[1.0, -0.5], [0.0, 2.0], [0.0, 0.0]]
    want = _oracle(x, adapters, torch.tensor(w), None, _randn(OUT, IN, seed=6))
    for strategy in ("reference", "concat", "grouped"):
        got = lowrank.lowrank_delta(x, adapters, w, strategy=strategy)
        assert got.shape == (3, 2, 4, OUT)
        assert _rel(got, want) < TOL


@pytest.mark.parametrize("layout", [*LAYOUTS, "conv_mixed"])
def test_strategies_agree_with_each_other(layout: str) -> None:
    x, adapters, conv, _ = _problem(layout, 3, seed=3)
    w = _weights("mixed", 3)
    ref = lowrank.lowrank_delta(x, adapters, w, conv=conv, strategy="reference")
    for strategy in ("concat", "grouped", "auto"):
        got = lowrank.lowrank_delta(x, adapters, w, conv=conv, strategy=strategy)
        assert _rel(got, ref) < 1e-6, strategy


@pytest.mark.parametrize("layout", ["linear3d", "conv3x3_s2p1", "tucker3x3_s2p1"])
def test_float64_input_computes_in_float64(layout: str) -> None:
    """fp32 factors are cast to x's dtype: with fp64 x the result matches the oracle to 1e-12."""
    x, adapters, conv, weight = _problem(layout, 3, seed=4)
    w = _weights("mixed", 3)
    want = _oracle(x, adapters, w, conv, weight)
    for strategy in ("reference", "concat", "grouped"):
        got = lowrank.lowrank_delta(x.double(), adapters, w, conv=conv, strategy=strategy)
        assert got.dtype == torch.float64
        assert _rel(got, want) < 1e-12


def test_bfloat16_input_returns_bfloat16() -> None:
    x, adapters, conv, weight = _problem("linear3d", 3, seed=6)
    w = _weights("mixed", 3)
    got = lowrank.lowrank_delta(x.bfloat16(), adapters, w, conv=conv)
    assert got.dtype == torch.bfloat16
    assert _rel(got, _oracle(x.bfloat16().float(), adapters, w, conv, weight)) < 5e-2


def test_all_zero_weights_give_zeros_of_output_shape() -> None:
    x, adapters, conv, _ = _problem("conv3x3_s2p1", 3)
    for strategy in ("reference", "concat", "grouped", "auto"):
        got = lowrank.lowrank_delta(x, adapters, torch.zeros(N, 3), conv=conv, strategy=strategy)
        assert got.shape == (N, COUT, 5, 5)
        assert not got.any()


# --------------------------------------------------------------------------------------------
# accumulating into the layer output (out=)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["mixed", "blocks", "ones"])
@pytest.mark.parametrize("layout", [*LAYOUTS, "conv_mixed"])
def test_out_accumulates_in_place(layout: str, weights: str) -> None:
    x, adapters, conv, weight = _problem(layout, 3, seed=8)
    w = _weights(weights, 3)
    want = _oracle(x, adapters, w, conv, weight)
    base = _randn(*want.shape, seed=9) * want.std().item()
    zero_rows = (w == 0).all(dim=1)
    for strategy in ("reference", "concat", "grouped", "auto"):
        out = base.clone()
        got = lowrank.lowrank_delta(x, adapters, w, conv=conv, strategy=strategy, out=out)
        assert got is out, strategy
        assert _rel(out, base.double() + want) < TOL, strategy
        assert torch.equal(out[zero_rows], base[zero_rows]), strategy


def test_out_non_contiguous_falls_back_to_add() -> None:
    x, adapters, _, weight = _problem("linear2d", 3, seed=10)
    w = _weights("blocks", 3)
    want = _oracle(x, adapters, w, None, weight)
    for strategy in ("reference", "concat", "grouped"):
        before = _randn(N, OUT, seed=11)
        out = before.t().contiguous().t()  # [N, OUT] with transposed strides: not contiguous
        assert not out.is_contiguous()
        lowrank.lowrank_delta(x, adapters, w, strategy=strategy, out=out)
        assert _rel(out, before.double() + want) < TOL


def test_out_must_match_the_delta() -> None:
    x, adapters, conv, _ = _problem("conv3x3_s2p1", 2)
    w = _weights("ones", 2)
    for bad in (torch.zeros(N, COUT, 9, 9), torch.zeros(N, COUT, 5, 5, dtype=torch.float64)):
        with pytest.raises(ValueError, match="out"):
            lowrank.lowrank_delta(x, adapters, w, conv=conv, out=bad)
    with pytest.raises(ValueError, match="out"):
        dense.dense_delta(x, [torch.zeros(COUT, CIN, 3, 3)], torch.ones(N, 1), conv=STRIDED,
                          out=torch.zeros(N, COUT, 4, 4))


# --------------------------------------------------------------------------------------------
# strategy choice
# --------------------------------------------------------------------------------------------


def test_auto_picks_grouped_for_routing_and_concat_for_dense_rows() -> None:
    _, adapters, _, _ = _problem("linear3d", 3)
    assert lowrank.choose_strategy(adapters, _weights("onehot", 3)) == "grouped"
    assert lowrank.choose_strategy(adapters, _weights("blocks", 3)) == "grouped"
    assert lowrank.choose_strategy(adapters, _weights("ones", 3)) == "concat"
    # 2 of 5 rows use one adapter, 1 row none, 2 rows several: not "most" -> concat
    w = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1]])
    assert lowrank.choose_strategy(adapters, w) == "concat"
    # one adapter, even with zero rows -> concat
    assert lowrank.choose_strategy(adapters[:1], _weights("mixed", 1)) == "concat"


def test_auto_picks_grouped_when_concat_is_invalid() -> None:
    _, tucker, conv, _ = _problem("tucker3x3_s2p1", 3)
    assert lowrank.choose_strategy(tucker, _weights("ones", 3), conv) == "grouped"
    _, mixed, conv, _ = _problem("conv_mixed", 3)
    assert lowrank.choose_strategy(mixed, _weights("ones", 3), conv) == "grouped"
    _, locon, conv, _ = _problem("conv3x3_s2p1", 3)
    assert lowrank.choose_strategy(locon, _weights("ones", 3), conv) == "concat"


# --------------------------------------------------------------------------------------------
# ConcatCache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [*LAYOUTS, "conv_mixed"])
def test_cached_equals_uncached(layout: str) -> None:
    x, adapters, conv, _ = _problem(layout, 3, seed=7)
    w = _weights("mixed", 3)
    cache = lowrank.build_concat_cache(adapters, torch.float32, "cpu")
    assert (cache.down_cat is None) == any(a.mid is not None for a in adapters)
    for strategy in ("reference", "concat", "grouped", "auto"):
        plain = lowrank.lowrank_delta(x, adapters, w, conv=conv, strategy=strategy)
        cached = lowrank.lowrank_delta(x, adapters, w, conv=conv, strategy=strategy, cache=cache)
        assert _rel(cached, plain) < 1e-6, strategy


def test_cache_layout_and_dtype_cast() -> None:
    x, adapters, _, weight = _problem("linear2d", 3)
    cache = lowrank.build_concat_cache(adapters, torch.float64, "cpu")
    assert cache.down_cat.shape == (sum(RANKS), IN) and cache.up_cat.shape == (OUT, sum(RANKS))
    assert cache.col_adapter.tolist() == [0] * 3 + [1] * 5 + [2] * 2
    assert torch.equal(cache.factors[1][0], adapters[1].down.double())  # a view of down_cat
    w = _weights("mixed", 3)
    # cache built for float64, x in float32: still correct (cast per call)
    got = lowrank.lowrank_delta(x, adapters, w, strategy="concat", cache=cache)
    assert got.dtype == torch.float32
    assert _rel(got, _oracle(x, adapters, w, None, weight)) < TOL


def test_cache_for_other_adapters_is_rejected() -> None:
    x, adapters, _, _ = _problem("linear2d", 3)
    other = [_adapter("linear", i, 50 + i) for i in range(3)]
    cache = lowrank.build_concat_cache(other, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cache"):
        lowrank.lowrank_delta(x, adapters, _weights("ones", 3), cache=cache)


# --------------------------------------------------------------------------------------------
# dense_delta
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", WEIGHT_KINDS)
@pytest.mark.parametrize("layout", ["linear3d", "conv3x3_s2p1", "conv1x1"])
def test_dense_delta_matches_oracle(layout: str, weights: str) -> None:
    x, _, conv, weight = _problem(layout, 3)
    deltas = [_randn(*weight.shape, seed=200 + a) * 0.1 for a in range(3)]
    w = _weights(weights, 3)
    got = dense.dense_delta(x, deltas, w, conv=conv)
    want = _oracle_merged(x, weight, deltas, w, conv)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert _rel(got, want) < TOL
    zero_rows = (w == 0).all(dim=1)
    assert not got[zero_rows].any()
    base = _randn(*want.shape, seed=12)
    out = base.clone()
    assert dense.dense_delta(x, deltas, w, conv=conv, out=out) is out
    assert _rel(out, base.double() + want) < TOL
    assert torch.equal(out[zero_rows], base[zero_rows])


def test_dense_delta_all_zero_and_float64() -> None:
    x, _, conv, weight = _problem("conv3x3_s2p1", 2)
    deltas = [_randn(*weight.shape, seed=300 + a) for a in range(2)]
    zero = dense.dense_delta(x, deltas, torch.zeros(N, 2), conv=conv)
    assert zero.shape == (N, COUT, 5, 5) and not zero.any()
    w = _weights("mixed", 2)
    got = dense.dense_delta(x.double(), deltas, w, conv=conv)
    assert got.dtype == torch.float64
    assert _rel(got, _oracle_merged(x, weight, deltas, w, conv)) < 1e-12


# --------------------------------------------------------------------------------------------
# lowrank_routed: prepared factors + row segments, against the same oracle
# --------------------------------------------------------------------------------------------

ROUTED_WEIGHT_KINDS = WEIGHT_KINDS + ("stacked_halves",)


def _routed_weights(kind: str, k: int) -> torch.Tensor:
    if kind == "stacked_halves":  # AutoLoRA: base rows (no adapter), then rows using every adapter at once
        return torch.tensor([[0.0] * k, [0.0] * k, [1.0] * k, [1.0] * k, [1.0] * k])
    return _weights(kind, k)


@pytest.mark.parametrize(
    ("layout", "k", "weights"),
    [(layout, k, wk) for layout in LAYOUTS for k in (1, 3) for wk in ROUTED_WEIGHT_KINDS]
    + [("conv_mixed", 3, wk) for wk in ROUTED_WEIGHT_KINDS],
)
def test_add_routed_matches_dense_oracle(layout: str, k: int, weights: str) -> None:
    x, adapters, conv, weight = _problem(layout, k)
    w = _routed_weights(weights, k)
    base = _layer(x, weight, conv)
    prepared = PreparedLowRank(adapters, conv, x.dtype, x.device)
    out = base.clone()
    assert add_routed(prepared, x, out, plan_rows(w, prepared.ranks, x.dtype, x.device)) is out
    delta = out - base
    assert _rel(delta, _oracle(x, adapters, w, conv, weight)) < TOL
    zero_rows = (w == 0).all(dim=1)
    assert torch.equal(out[zero_rows], base[zero_rows])  # untouched, bit for bit


def test_add_routed_float64_is_exact_to_1e12() -> None:
    x, adapters, conv, weight = _problem("linear3d", 3)
    x = x.double()
    w = _routed_weights("mixed", 3)
    prepared = PreparedLowRank(adapters, conv, torch.float64, x.device)
    out = torch.zeros(N, 4, OUT, dtype=torch.float64)
    add_routed(prepared, x, out, plan_rows(w, prepared.ranks, torch.float64, x.device))
    assert _rel(out, _oracle(x, adapters, w, conv, weight)) < 1e-12


def test_plan_rows_groups_rows_by_weight_vector() -> None:
    ranks = (3, 5)
    # rows 0-1 adapter 0 (a slice), rows 2 and 4 adapter 1 at 0.5 (scattered: indices), row 3 unused,
    # rows 5-6 both adapters at 2 (stacked, one scalar), row 7 unequal weights (stacked, per-column)
    w = torch.tensor([[1, 0], [1, 0], [0, .5], [0, 0], [0, .5], [2, 2], [2, 2], [1, -3]], dtype=torch.float32)
    segs = plan_rows(w, ranks, torch.float32, "cpu")
    assert [(s.adapter, s.weight) for s in segs] == [(0, 1.0), (1, 0.5), (None, 2.0), (None, 1.0)]
    assert segs[0].rows == slice(0, 2) and segs[2].rows == slice(5, 7) and segs[3].rows == slice(7, 8)
    assert torch.equal(segs[1].rows, torch.tensor([2, 4]))
    assert segs[0].columns is None and segs[2].columns is None
    assert torch.equal(segs[3].columns, torch.tensor([1.0] * 3 + [-3.0] * 5))
    assert plan_rows(torch.zeros(3, 2), ranks, torch.float32, "cpu") == ()
    (every,) = plan_rows(torch.ones(3, 2), ranks, torch.float32, "cpu")
    assert every.rows is None and every.adapter is None and every.weight == 1.0  # all rows: no view at all


def _block_problem(layout: str, m: int, seed: int = 0):
    """``m`` linear/conv adapters of one rank and an input of ``m`` blocks of 2 rows (Composite's layout)."""
    x, _, conv, weight = _problem(layout, 1, seed)
    x = torch.cat([x[:2]] * m, dim=0) + 0.1 * _randn(2 * m, *x.shape[1:], seed=seed + 7)
    adapters = []
    for i in range(m):
        a = _adapter(layout, 0, seed + 10 * i)
        adapters.append(LowRankAdapter(a.down, a.up, mid=a.mid, scale=SCALES[i % len(SCALES)]))
    return x, adapters, conv, weight


@pytest.mark.parametrize("layout", ["linear2d", "linear3d", "conv1x1", "conv3x3_s2p1"])
@pytest.mark.parametrize("block_weights", ["equal", "unequal"])
@pytest.mark.parametrize("m", [2, 5])
def test_block_segments_match_dense_oracle(layout: str, block_weights: str, m: int) -> None:
    """Equal consecutive row blocks, block i using adapter i alone: one block segment, batched GEMMs on linear
    layers and pointwise (1×1) convs (the per-block path on other convs), both against the float64 oracle."""
    x, adapters, conv, weight = _block_problem(layout, m)
    values = [1.5] * m if block_weights == "equal" else [0.5 + i for i in range(m)]
    w = torch.zeros(2 * m, m)
    for i, v in enumerate(values):
        w[2 * i:2 * i + 2, i] = v
    prepared = PreparedLowRank(adapters, conv, x.dtype, x.device)
    assert (prepared.down_blocks is not None) == (conv is None)
    (block,) = plan_rows(w, prepared.ranks, x.dtype, x.device)
    assert block.rows is None and len(block.blocks) == m and [s.adapter for s in block.blocks] == list(range(m))
    assert (block.block_weights is None) == (block_weights == "equal")
    base = _layer(x, weight, conv)
    out = base.clone()
    add_routed(prepared, x, out, (block,))
    assert _rel(out - base, _oracle(x, adapters, w, conv, weight)) < TOL
    x64 = x.double()
    out64 = torch.zeros_like(base, dtype=torch.float64)
    add_routed(PreparedLowRank(adapters, conv, torch.float64, "cpu"), x64, out64,
               plan_rows(w, prepared.ranks, torch.float64, "cpu"))
    assert _rel(out64, _oracle(x, adapters, w, conv, weight)) < 1e-12


def test_block_segments_cover_a_chunk_of_the_adapters() -> None:
    """A split batch (fewer blocks than adapters, starting at adapter a0) still runs batched."""
    x, adapters, conv, weight = _block_problem("linear3d", 5)
    x = x[:6]  # 3 blocks: adapters 2, 3, 4
    w = torch.zeros(6, 5)
    for i in range(3):
        w[2 * i:2 * i + 2, 2 + i] = 1.0
    prepared = PreparedLowRank(adapters, conv, x.dtype, x.device)
    (block,) = plan_rows(w, prepared.ranks, x.dtype, x.device)
    assert [s.adapter for s in block.blocks] == [2, 3, 4]
    out = torch.zeros(6, 4, OUT)
    add_routed(prepared, x, out, (block,))
    assert _rel(out, _oracle(x, adapters, w, conv, weight)) < TOL


def test_rows_that_are_not_equal_ordered_blocks_stay_segments() -> None:
    ranks = (4, 4, 4)
    one_hot = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    assert len(plan_rows(one_hot, ranks, torch.float32, "cpu")) == 1
    for w, why in [
        (one_hot[[2, 3, 0, 1, 4, 5]], "adapters out of block order"),
        (F.one_hot(torch.tensor([0, 0, 0, 1, 2, 2]), 3).float(), "unequal block sizes"),
        (F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float(), "scattered rows"),
        (torch.cat([one_hot[:4], torch.zeros(2, 3)]), "rows without an adapter"),
    ]:
        segs = plan_rows(w, ranks, torch.float32, "cpu")
        assert all(not s.blocks for s in segs), why
    assert all(not s.blocks for s in plan_rows(one_hot, (4, 8, 4), torch.float32, "cpu"))  # unequal ranks


def test_block_segments_launch_the_same_operations_for_any_number_of_loras() -> None:
    """The reason for block segments: per layer, the torch calls (GPU kernel launches) do not grow with k."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    for layout in ("linear3d", "conv1x1"):  # a pointwise conv is a matrix over channels: the same batched pair
        counts = {}
        for m in (2, 5):
            x, adapters, conv, weight = _block_problem(layout, m)
            prepared = PreparedLowRank(adapters, conv, x.dtype, x.device)
            w = torch.repeat_interleave(torch.eye(m), 2, dim=0)
            segments = plan_rows(w, prepared.ranks, x.dtype, x.device)
            out = torch.zeros_like(_layer(x, weight, conv))
            with Count() as counter:
                add_routed(prepared, x, out, segments)
            counts[m] = [c for c in counter.calls
                         if c in ("bmm", "baddbmm_", "linear", "addmm_", "index_add_", "conv2d", "add_")]
        assert counts[2] == counts[5] == ["bmm", "baddbmm_"], layout


@pytest.mark.parametrize("rows", ["every row", "a slice"])
def test_linear_rows_run_two_gemms_on_views(rows: str) -> None:
    """One adapter on every row (Switch unmerged) or a slice of rows (AutoLoRA's LoRA half): per layer the two GEMMs on
    2-D views and nothing else — F.linear on a 3-D input took 3 more dispatcher calls (``t``, matmul's reshapes),
    which a host-bound GPU step pays per hooked layer — and the oracle result."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x, adapters, conv, weight = _problem("linear3d", 1)
    w = torch.ones(N, 1) if rows == "every row" else torch.tensor([[0.0], [0.0], [1.5], [1.5], [1.5]])
    prepared = PreparedLowRank(adapters, conv, x.dtype, x.device)
    segments = plan_rows(w, prepared.ranks, x.dtype, x.device)
    base = _layer(x, weight, conv)
    out = base.clone()
    with Count() as counter:
        add_routed(prepared, x, out, segments)
    views = ["view", "mm", "view", "addmm_"]
    assert counter.ops == (views if rows == "every row" else ["slice", *views[:2], "slice", *views[2:]])
    assert _rel(out - base, _oracle(x, adapters, w, conv, weight)) < TOL


@pytest.mark.parametrize("why", ["large batch", "non-contiguous input", "scattered rows"])
def test_pointwise_conv_falls_back_to_convolutions(why: str, monkeypatch) -> None:
    """Where the batched GEMMs of a 1×1 conv do not apply (their per-row factor copies over the size cap, a
    channels-last input, rows given by indices) the conv path runs, and the result is the same."""
    m = 3
    x, adapters, conv, weight = _block_problem("conv1x1", m)
    w = torch.repeat_interleave(torch.eye(m), 2, dim=0) * 0.7
    if why == "large batch":
        monkeypatch.setattr(lowrank_routed, "POINTWISE_ROWS_BYTES", 64)
    elif why == "non-contiguous input":
        x = x.to(memory_format=torch.channels_last)
    else:
        w = w[[0, 2, 4, 1, 3, 5]]
    prepared = PreparedLowRank(adapters, conv, x.dtype, x.device)
    assert prepared.pointwise is not None
    base = _layer(x, weight, conv)
    out = base.clone()
    add_routed(prepared, x, out, plan_rows(w, prepared.ranks, x.dtype, x.device))
    assert _rel(out - base, _oracle(x, adapters, w, conv, weight)) < TOL
    assert all(f is None for f in prepared._pointwise_rows.values())  # no per-row copies kept or used
    strided = PreparedLowRank(_problem("conv3x3_s2p1", 2)[1], STRIDED, x.dtype, x.device)
    assert strided.pointwise is None  # a 3×3 or strided conv is no matrix over channels


def test_prepared_factors_fold_the_scale_and_share_storage() -> None:
    _, adapters, conv, _ = _problem("linear2d", 3)
    prepared = PreparedLowRank(adapters, conv, torch.float32, "cpu")
    assert prepared.ranks == RANKS
    for a, adapter in enumerate(adapters):
        assert torch.allclose(prepared.ups[a], adapter.up * adapter.scale)
        assert prepared.downs[a].data_ptr() != adapter.down.data_ptr() or a == 0
    assert prepared.downs[1].untyped_storage().data_ptr() == prepared.down_cat.untyped_storage().data_ptr()
    assert prepared.down_blocks is None  # ranks 3, 5, 2: no batched block form
    for a in range(3):
        assert prepared.ups[a].untyped_storage().data_ptr() == prepared.up_cat.untyped_storage().data_ptr()
    equal = PreparedLowRank(_block_problem("linear2d", 3)[1], None, torch.float32, "cpu")
    for a in range(3):  # the batched form is the same storage, adapter by adapter
        assert torch.equal(equal.down_blocks[a], equal.downs[a].t())
        assert torch.equal(equal.up_blocks[a], equal.ups[a].t())
    assert equal.down_blocks.untyped_storage().data_ptr() == equal.down_cat.untyped_storage().data_ptr()
    assert equal.up_blocks.untyped_storage().data_ptr() == equal.up_cat.untyped_storage().data_ptr()
    tucker = PreparedLowRank(_problem("conv_mixed", 3)[1], STRIDED, torch.float32, "cpu")
    assert tucker.down_cat is None and tucker.down_blocks is None  # Tucker cannot be stacked: segments using several adapters run them in turn
    with pytest.raises(ValueError, match="conv"):
        PreparedLowRank(adapters, STRIDED, torch.float32, "cpu")


# --------------------------------------------------------------------------------------------
# dispatch
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "fn"), [("lowrank_delta", "lowrank_delta_torch"), ("dense_delta", "dense_delta_torch"),
                   ("lowrank_routed", "add_routed_torch")]
)
def test_dispatch_lists_and_selects_torch(op: str, fn: str) -> None:
    rows = dispatch.backends(op)
    torch_rows = [r for r in rows if r.name == "torch"]
    assert len(torch_rows) == 1
    name, priority, available, reason = torch_rows[0]
    assert available and reason and isinstance(priority, int)
    module = {"lowrank_delta": lowrank, "dense_delta": dense, "lowrank_routed": lowrank_routed}[op]
    assert dispatch.select(op, torch.device("cpu")) == ("torch", getattr(module, fn))
    assert op in dispatch.ops()


@pytest.fixture
def fake_backends() -> Iterator[list]:
    calls: list = []
    names = ["no_triton", "broken_probe", "cuda_only"]

    def boom() -> tuple[bool, str]:
        raise ImportError("no module named triton")

    dispatch.register_backend(
        "lowrank_delta", "no_triton", calls.append, 100, lambda: (False, "triton is not installed")
    )
    dispatch.register_backend("lowrank_delta", "broken_probe", calls.append, 90, boom)
    dispatch.register_backend(
        "lowrank_delta", "cuda_only", calls.append, 80, lambda: (True, "ok"), devices={"cuda"}
    )
    try:
        yield calls
    finally:
        for name in names:
            dispatch.unregister_backend("lowrank_delta", name)


def test_dispatch_records_reasons_and_skips_unusable(fake_backends: list) -> None:
    rows = {r.name: r for r in dispatch.backends("lowrank_delta", "cpu")}
    assert [r.name for r in dispatch.backends("lowrank_delta")][:3] == [
        "no_triton", "broken_probe", "cuda_only"
    ]
    assert rows["no_triton"].available is False and "triton" in rows["no_triton"].reason
    assert rows["broken_probe"].available is False and "ImportError" in rows["broken_probe"].reason
    assert rows["cuda_only"].available is False and "device type 'cpu'" in rows["cuda_only"].reason
    assert rows["torch"].available is True
    assert dispatch.select("lowrank_delta", "cpu")[0] == "torch"
    # device type only: no CUDA needed to ask
    assert dispatch.select("lowrank_delta", "cuda:0")[0] == "cuda_only"


def test_entry_point_goes_through_dispatch() -> None:
    sentinel = object()
    seen = []

    def fast(x, adapters, row_weights, conv=None, strategy="auto", cache=None, out=None):
        seen.append(strategy)
        return sentinel

    dispatch.register_backend("lowrank_delta", "fast", fast, priority=50)
    try:
        x, adapters, _, _ = _problem("linear2d", 1)
        assert lowrank.lowrank_delta(x, adapters, torch.ones(N, 1), strategy="grouped") is sentinel
        assert seen == ["grouped"]
    finally:
        dispatch.unregister_backend("lowrank_delta", "fast")
    assert dispatch.select("lowrank_delta", "cpu")[0] == "torch"


def test_dispatch_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="op"):
        dispatch.select("no_such_op", "cpu")
    with pytest.raises(ValueError, match="priority"):
        dispatch.register_backend("x", "y", lambda: None, priority=1.5)
    with pytest.raises(ValueError, match="fn"):
        dispatch.register_backend("x", "y", None, priority=1)
    with pytest.raises(ValueError, match="devices"):
        dispatch.register_backend("x", "y", lambda: None, priority=1, devices="cuda")
    with pytest.raises(ValueError, match="name"):
        dispatch.unregister_backend("lowrank_delta", "never_registered")


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_adapter_shape_errors_name_the_factor() -> None:
    with pytest.raises(ValueError, match="rank mismatch"):
        LowRankAdapter(torch.zeros(4, IN), torch.zeros(OUT, 3))
    with pytest.raises(ValueError, match="up"):
        LowRankAdapter(torch.zeros(4, CIN, 3, 3), torch.zeros(COUT, 4, 3, 3))
    with pytest.raises(ValueError, match="down"):
        LowRankAdapter(
            torch.zeros(4, CIN, 3, 3), torch.zeros(COUT, 4, 1, 1), mid=torch.zeros(4, 4, 3, 3)
        )
    with pytest.raises(ValueError, match="mid"):
        LowRankAdapter(
            torch.zeros(4, CIN, 1, 1), torch.zeros(COUT, 4, 1, 1), mid=torch.zeros(4, 3, 3, 3)
        )
    with pytest.raises(ValueError, match="scale"):
        LowRankAdapter(torch.zeros(4, IN), torch.zeros(OUT, 4), scale=float("nan"))
    assert LowRankAdapter(torch.zeros(4, IN), torch.zeros(OUT, 4)).rank == 4


def test_lowrank_delta_errors_name_the_argument() -> None:
    x, adapters, _, _ = _problem("linear3d", 2)
    w = _weights("ones", 2)
    with pytest.raises(ValueError, match=r"adapters\[0\]\.down"):
        lowrank.lowrank_delta(x[..., :-1], adapters, w)
    bad_out = LowRankAdapter(torch.zeros(2, IN), torch.zeros(OUT + 1, 2))
    with pytest.raises(ValueError, match=r"adapters\[1\]\.up"):
        lowrank.lowrank_delta(x, [adapters[0], bad_out], w)
    for bad_w in (torch.ones(N - 1, 2), torch.ones(N, 3), torch.ones(N * 2), [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="row_weights"):
            lowrank.lowrank_delta(x, adapters, bad_w)
    with pytest.raises(ValueError, match="strategy"):
        lowrank.lowrank_delta(x, adapters, w, strategy="fastest")
    with pytest.raises(ValueError, match="conv"):
        lowrank.lowrank_delta(x, adapters, w, conv=ConvSpec())
    xc, conv_adapters, _, _ = _problem("conv3x3_s2p1", 2)
    with pytest.raises(ValueError, match="conv"):
        lowrank.lowrank_delta(xc, conv_adapters, w)
    with pytest.raises(ValueError, match=r"adapters\[1\]"):  # 1x1 next to 3x3 under one ConvSpec
        lowrank.lowrank_delta(xc, [conv_adapters[0], _adapter("conv1x1", 1, 0)], w, conv=STRIDED)
    with pytest.raises(ValueError, match="row_weights"):
        lowrank.choose_strategy(adapters, torch.ones(N, 3))


def test_convspec_validation_and_from_module() -> None:
    with pytest.raises(ValueError, match="groups"):
        ConvSpec(stride=1, padding=1, groups=2)
    with pytest.raises(ValueError, match="stride"):
        ConvSpec(stride=0)
    with pytest.raises(ValueError, match="padding"):
        ConvSpec(padding="full")
    spec = ConvSpec.from_module(torch.nn.Conv2d(CIN, COUT, 3, stride=2, padding=1))
    assert spec == ConvSpec(stride=(2, 2), padding=(1, 1), dilation=(1, 1))
    with pytest.raises(ValueError, match="groups"):
        ConvSpec.from_module(torch.nn.Conv2d(CIN, CIN, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode"):
        ConvSpec.from_module(torch.nn.Conv2d(CIN, COUT, 3, padding=1, padding_mode="reflect"))


def test_dense_delta_errors_name_the_argument() -> None:
    x, _, _, weight = _problem("linear3d", 2)
    w = _weights("ones", 2)
    with pytest.raises(ValueError, match=r"deltas\[1\]"):
        dense.dense_delta(x, [weight, weight[:, :-1]], w)
    with pytest.raises(ValueError, match="deltas"):
        dense.dense_delta(x, [weight[:, :-1], weight[:, :-1]], w)
    with pytest.raises(ValueError, match="deltas"):
        dense.dense_delta(x, [], w)
    with pytest.raises(ValueError, match="row_weights"):
        dense.dense_delta(x, [weight, weight], torch.ones(N, 3))
    xc, _, _, cw = _problem("conv3x3_s2p1", 1)
    with pytest.raises(ValueError, match="deltas"):  # 4-D deltas without conv=
        dense.dense_delta(xc.flatten(2).transpose(1, 2), [cw], torch.ones(N, 1))
