#!/usr/bin/env python3
"""Micro-benchmark: unmerged LoRA strategies of ``kernels.lowrank`` on one linear layer.

Usage::

    python bench/bench_lowrank.py [--runs N] [--inner M] [--threads T] [--device cpu|cuda]
                                  [--dtype float32|bfloat16|float16]

Setup: ``x`` is ``[N=4, T=1024, in=640]``, the base layer ``F.linear(x, W)`` with ``W``
``[640, 640]``; ranks 16 / 64 / 128; ``k = 1`` (every row uses the adapter) and ``k = 3`` with
one-hot routing (row ``n`` uses adapter ``n mod 3``). All adapters of a configuration share the
rank. Factors are pre-cast and pre-stacked with ``build_concat_cache`` (as a caller would hold
them), so the timings are the per-forward cost.

Printed (ratios only, medians of ``--runs`` rounds after a warm-up; each round times every method
once, in an order that rotates across rounds, each timing the mean of ``--inner`` calls):

* ``concat/ref``, ``grouped/ref``: strategy time over the ``reference`` strategy's;
* ``auto``: what ``strategy="auto"`` picks for these row weights;
* ``overhead``: ``(F.linear(x, W) + lowrank_delta(auto)) / F.linear(x, W)``, the unmerged cost
  relative to the plain layer (a merged LoRA costs 1.00 per forward); ``out=``: the same with
  the delta accumulated into the layer output (``lowrank_delta(..., out=y)``: no delta tensor,
  the add fused into the up GEMM); ``routed``: the same through the runtime's path
  (``kernels.lowrank_routed``: factors prepared once, rows grouped once per model call, no per-call checks);
* ``1 + flops``: ``1 + 2·r·(in+out) / (2·in·out)``, the FLOP-count prediction of that ratio for
  one adapter per row (``grouped`` does exactly that much extra work, ``concat`` ``k`` times it).

A second table takes LoRA Composite's layout (the ``N`` rows in ``k`` equal consecutive blocks, block
``i`` using adapter ``i``; ``k`` = 2 and 4) through the runtime's path two ways: ``per block`` (one
GEMM pair per block) and ``batched`` (the block segment: one ``bmm`` / ``baddbmm_`` pair for all
blocks), each as ``(base + adapters) / base``. On a GPU the per-block form launches ``2k`` kernels
per layer and the batched form 2.

Defaults: CPU, fp32, ``torch.set_num_threads(2)``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from kernels import lowrank, lowrank_routed  # noqa: E402

N, T, IN, OUT = 4, 1024, 640, 640
RANKS = (16, 64, 128)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, inner: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def _problem(r: int, k: int, seed: int, device: torch.device, dtype: torch.dtype):
    """``(x, weight, adapters)``: the layer input, its weight and ``k`` rank-``r`` adapters."""
    g = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    x = randn(N, T, IN)
    weight = randn(OUT, IN, std=IN**-0.5)
    adapters = [
        lowrank.LowRankAdapter(randn(r, IN, std=IN**-0.5), randn(OUT, r, std=r**-0.5), scale=1.0)
        for _ in range(k)
    ]
    return x, weight, adapters


def _medians(methods: dict, args, device: torch.device) -> dict[str, float]:
    """Median time per method: a warm-up, then ``--runs`` rounds timing every method once, in an order
    that rotates across rounds."""
    names = list(methods)
    with torch.inference_mode():
        for fn in methods.values():  # warm-up (allocator, BLAS packing, lazy init)
            for _ in range(2):
                fn()
        times: dict[str, list[float]] = {m: [] for m in names}
        for rnd in range(args.runs):
            for m in names[rnd % len(names):] + names[: rnd % len(names)]:
                times[m].append(_time(methods[m], device, args.inner))
    return {m: statistics.median(v) for m, v in times.items()}


def bench_config(r: int, k: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    x, weight, adapters = _problem(r, k, 1000 * r + k, device, dtype)
    # k = 1: every row uses the adapter; k = 3: one-hot routing, row n -> adapter n mod k.
    w = torch.nn.functional.one_hot(torch.arange(N) % k, k).float()
    cache = lowrank.build_concat_cache(adapters, dtype, device)

    def delta(strategy: str):
        return lambda: lowrank.lowrank_delta(x, adapters, w, strategy=strategy, cache=cache)

    def unmerged():
        y = F.linear(x, weight)
        y.add_(lowrank.lowrank_delta(x, adapters, w, cache=cache))
        return y

    def unmerged_out():
        y = F.linear(x, weight)
        return lowrank.lowrank_delta(x, adapters, w, cache=cache, out=y)

    prepared = lowrank_routed.PreparedLowRank(adapters, None, dtype, device)
    segments = lowrank_routed.plan_rows(w, prepared.ranks, dtype, device)

    def unmerged_routed():
        y = F.linear(x, weight)
        return lowrank_routed.add_routed_torch(prepared, x, y, segments)

    methods = {
        "reference": delta("reference"),
        "concat": delta("concat"),
        "grouped": delta("grouped"),
        "base": lambda: F.linear(x, weight),
        "unmerged": unmerged,
        "unmerged_out": unmerged_out,
        "unmerged_routed": unmerged_routed,
    }
    med = _medians(methods, args, device)
    return {
        "r": r,
        "k": k,
        "concat/ref": med["concat"] / med["reference"],
        "grouped/ref": med["grouped"] / med["reference"],
        "auto": lowrank.choose_strategy(adapters, w),
        "overhead": med["unmerged"] / med["base"],
        "overhead_out": med["unmerged_out"] / med["base"],
        "overhead_routed": med["unmerged_routed"] / med["base"],
        "1+flops": 1.0 + (2 * r * (IN + OUT)) / (2 * IN * OUT),
    }


def bench_blocks(r: int, k: int, args, device: torch.device, dtype: torch.dtype) -> dict:
    x, weight, adapters = _problem(r, k, 7000 * r + k, device, dtype)
    prepared = lowrank_routed.PreparedLowRank(adapters, None, dtype, device)
    w = torch.repeat_interleave(torch.eye(k), N // k, dim=0)
    (block,) = lowrank_routed.plan_rows(w, prepared.ranks, dtype, device)
    assert block.blocks, "Composite's layout must plan as one block segment"

    def run(segments):
        return lambda: lowrank_routed.add_routed_torch(prepared, x, F.linear(x, weight), segments)

    methods = {"base": lambda: F.linear(x, weight), "per_block": run(block.blocks), "batched": run((block,))}
    with torch.inference_mode():
        torch.testing.assert_close(methods["per_block"](), methods["batched"](), rtol=1e-4, atol=1e-4)
    med = _medians(methods, args, device)
    return {"r": r, "k": k, "per_block": med["per_block"] / med["base"], "batched": med["batched"] / med["base"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=7, help="timed rounds (median taken), >= 5")
    ap.add_argument("--inner", type=int, default=3, help="calls per timing (their mean)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    if args.runs < 5:
        ap.error("--runs must be >= 5")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    print(
        f"# lowrank_delta, linear x=[{N},{T},{IN}] -> out={OUT}, {args.dtype} on {device} "
        f"({torch.get_num_threads()} threads), torch {torch.__version__}; "
        f"medians of {args.runs} rounds x {args.inner} calls"
    )
    header = f"{'r':>4} {'k':>2}  {'concat/ref':>10} {'grouped/ref':>11} {'auto':>8}"
    header += f"  {'overhead':>8} {'out=':>6} {'routed':>6} {'1+flops':>8}"
    print(header)
    for k in (1, 3):
        for r in RANKS:
            row = bench_config(r, k, args, device, dtype)
            print(
                f"{row['r']:>4} {row['k']:>2}  {row['concat/ref']:>10.2f}"
                f" {row['grouped/ref']:>11.2f} {row['auto']:>8}  {row['overhead']:>8.3f}"
                f" {row['overhead_out']:>6.3f} {row['overhead_routed']:>6.3f} {row['1+flops']:>8.3f}"
            )
    print(f"# Composite's layout: {N} rows in k equal blocks, block i -> adapter i; (base + adapters) / base")
    print(f"{'r':>4} {'k':>2}  {'per block':>9} {'batched':>8}")
    for k in (2, 4):
        for r in RANKS:
            row = bench_blocks(r, k, args, device, dtype)
            print(f"{row['r']:>4} {row['k']:>2}  {row['per_block']:>9.3f} {row['batched']:>8.3f}")


if __name__ == "__main__":
    main()
