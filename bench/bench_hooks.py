#!/usr/bin/env python3
"""Micro-benchmark: the host time the unmerged runtime's forward hooks add per LoRA'd layer call.

Usage::

    python bench/bench_hooks.py [--layers N] [--ks 1,2,3,5] [--runs R] [--calls C] [--threads T] [--device cpu|cuda]

Why: a sampler step calls a couple of hundred LoRA'd layers, and on a fast GPU a small batch is *host-bound*: the
device waits for the host's launches, so whatever Python and dispatch work a hook does per call adds to the step's
wall time directly (issue #4: Composite at k = 2 on an H100). What a hook's arithmetic costs is measured elsewhere
(``bench_lowrank.py``, ``bench_composite.py``); here the layers are tiny (``[rows, 4 tokens, 8]`` through an 8→8
Linear), so the device work is negligible and the wall time is the host's.

Setup: ``--layers`` tiny Linear layers in a row (default 192, SD1.5's LoRA'd layers), each with k rank-4 adapters
installed by ``nodes.runtime.unmerged.UnmergedAdapters`` (the runtime's own hooks and dispatch), and the routing of
LoRA Composite: ``2k`` rows, block ``i`` (a cond and an uncond row) using adapter ``i``; k = 1 is one LoRA on all
rows (Switch / AutoLoRA unmerged). ``Routing.set`` runs before every forward, as before every model call.

Printed per k (medians of ``--runs`` rounds, each the mean of ``--calls`` forwards; bare and hooked interleaved):
µs per layer call bare (``F.linear``'s module call) and hooked, the hook's own µs per layer, hooked / bare, and the
dispatcher calls (aten ops) the hook adds per layer call (a noise-free count). On cuda the clock stops after a
``torch.cuda.synchronize`` at the end of each round's calls.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the `harness` package

RANK, WIDTH, TOKENS = 4, 8, 4


def build(env, layers: int, k: int, device):
    """(model, adapters, routing weights, input) for ``layers`` Linear layers with ``k`` adapters each."""
    import torch

    unmerged = env.engine("nodes.runtime.unmerged")
    plans_module = env.engine("nodes.runtime.layers")
    lowrank = env.engine("kernels.lowrank")
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)]).to(device)
    plans = []
    for i in range(layers):
        plan = plans_module.LayerPlan(f"{i}.weight", str(i), None)
        for a in range(k):
            plan.lowrank_columns.append(a)
            plan.lowrank.append(lowrank.LowRankAdapter(down=torch.randn(RANK, WIDTH, generator=g) * 0.1,
                                                       up=torch.randn(WIDTH, RANK, generator=g) * 0.1,
                                                       mid=None, scale=0.5))
        plans.append(plan)
    routing = unmerged.Routing()
    adapters = unmerged.UnmergedAdapters(plans, routing)
    rows = 2 * k
    weights = torch.zeros(rows, k)
    for a in range(k):
        weights[2 * a:2 * a + 2, a] = 1.0
    x = torch.randn(rows, TOKENS, WIDTH, generator=g).to(device)
    return model, adapters, routing, weights, x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=192, help="hooked layers per forward (default 192)")
    ap.add_argument("--ks", default="1,2,3,5", help="adapters per layer (Composite's k; default 1,2,3,5)")
    ap.add_argument("--runs", type=int, default=7, help="timed rounds, median taken (default 7)")
    ap.add_argument("--calls", type=int, default=20, help="forwards per round (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = ap.parse_args()
    os.environ["LORA_COMPOSER_DEVICE"] = args.device

    import logging

    from harness import comfy_env

    logging.getLogger().setLevel(logging.ERROR)  # ComfyUI's start-up lines about optional nodes
    env = comfy_env.start(quiet=False)
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"hook host overhead — ComfyUI {env.version}, torch {torch.__version__}, {args.device}, "
          f"{args.threads} thread(s); {args.layers} Linear({WIDTH}, {WIDTH}) layers, rank {RANK}, "
          f"rows 2k, {TOKENS} tokens; medians of {args.runs} rounds × {args.calls} forwards")
    print(f"{'k':>3} {'bare µs/layer':>14} {'hooked µs/layer':>16} {'hook µs/layer':>14} {'hooked / bare':>14}"
          f" {'hook ops':>12}")
    for k in (int(v) for v in args.ks.split(",")):
        model, adapters, routing, weights, x = build(env, args.layers, k, device)

        def forward():
            routing.set(weights)
            model(x)

        def timed(hooked: bool) -> float:
            if hooked:
                adapters.install(model, device)
            try:
                with torch.inference_mode():
                    forward()  # warm: the hooks prepare their factors at their first call
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(args.calls):
                        forward()
                    sync()
                    return (time.perf_counter() - t0) / args.calls / args.layers
            finally:
                adapters.remove()

        bare, hooked = [], []
        for r in range(args.runs):
            for h in ((False, True) if r % 2 == 0 else (True, False)):
                (hooked if h else bare).append(timed(h))
        b, h = statistics.median(bare) * 1e6, statistics.median(hooked) * 1e6
        ops = aten_ops_per_layer(model, adapters, forward, device, args.layers)
        print(f"{k:>3} {b:>14.2f} {h:>16.2f} {h - b:>14.2f} {h / b:>14.2f} {ops:>12.1f}")


def aten_ops_per_layer(model, adapters, forward, device, layers: int) -> float:
    """Dispatcher calls per layer call that the hooks add (hooked forward minus bare, over ``layers``): a count
    that no machine's noise changes, and on a GPU an upper bound of the kernel launches they add."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for hooked in (False, True):
        if hooked:
            adapters.install(model, device)
        try:
            with torch.inference_mode():
                forward()  # the hooks prepare their factors at their first call: not counted
                with Count() as counter:
                    forward()
            counts.append(counter.calls)
        finally:
            adapters.remove()
    return (counts[1] - counts[0]) / layers


if __name__ == "__main__":
    main()
