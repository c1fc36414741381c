#!/usr/bin/env python3
"""Benchmark: the cost of one merged-weight swap (``MergedSwapper.activate``), in UNet calls.

Usage::

    python bench/bench_swap.py [--device cuda] [--model-channels 320] [--latent 64] [--rank 16] [--swaps 24]

A merged ``LoraSetSwitch`` run costs the static-LoRA run plus its swaps (k = 3, τ = 5 over 20 steps: 4
activations and one restore), so a run's swap work ÷ UNet call predicts ``B / A`` of ``bench_switch.py`` without
sampling: ``B / A ≈ 1 + run's swap work ÷ (steps × UNet call)``. What is measured, on the SD1.5-shaped
UNet of ``bench_switch.py`` with 3 kohya LoRAs on its attention, proj and feed-forward layers, weights loaded
on the device by ComfyUI:

* one UNet call with cond + uncond rows (the unit);
* ``--swaps`` activations cycling through the 3 LoRAs (after one warm-up cycle): per swap the *host* time
  (until ``activate`` returns; on a GPU the kernels may still run) and the *wall* time (synchronised);
* ``restore`` (back to the original Parameters);
* a whole run's swap work as the runtime does it (a new swapper over the runtime's kept ``LowRankTerms``: plans,
  the factors' upload, the patched copies allocated, then LoRAs 0, 1, 2, 0 and ``restore``), which gives the
  prediction;
* on a GPU, for comparison: uploading the patched layers' original weights from pinned host memory (what a swap
  would add if the originals were kept off the GPU, as ComfyUI keeps a static LoRA's backup).

Check: after the swaps every LoRA's swapped weights are compared with ComfyUI's own patch computation
(``comfy.lora.calculate_weight`` in core's LoRA compute dtype, as ``patch_weight_to_device`` does) on the same
device: they must be bit-identical.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the `harness` package

from bench_common import (  # noqa: E402
    SD15_LAYOUT, RunMeter, add_device_arguments, freeze_gc, select_device, setup_process, start_sampling_bench)
from bench_switch import K, build_model, lora_names, write_loras  # noqa: E402  (its model, LoRAs and set size)

SWITCH_ORDER = (0, 1, 2, 0)  # bench_switch.py's schedule: 20 steps, τ = 5, k = 3
SWITCH_ACTIVATIONS = len(SWITCH_ORDER)
SWITCH_STEPS = 20
RUNS = 8


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-channels", type=int, default=96, help="UNet model_channels (default 96; SD1.5: 320)")
    p.add_argument("--latent", type=int, default=64, help="latent side for the UNet-call unit (default 64 = 512 px)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--swaps", type=int, default=24, help="timed activations (default 24)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    add_device_arguments(p)
    args = p.parse_args()
    args.timing, args.steps = "steady", SWITCH_STEPS
    select_device(args)
    return args


def build(args, env, models_dir: Path):
    """(ModelPatcher loaded on the device, per-LoRA patch lists): bench_switch.py's model and LoRA files."""
    import comfy.model_management as mm

    from harness.node_calls import load_set

    patching = env.engine("nodes.patching")  # the pack as ComfyUI loaded it (ComfyUI owns the name `nodes`)

    model = build_model(args)
    write_loras(model.model.state_dict(), models_dir / "loras", (args.rank,), ())
    options = [patching.model_patch_lists(entry, patches)
               for entry, patches in patching.resolve_set(model, None, load_set(lora_names(args.rank, K)))]
    mm.load_models_gpu([model])
    return model, options


def unet_call_seconds(model, args, clock_device: str) -> float:
    import torch

    dm = model.model.diffusion_model
    dev = model.load_device
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, args.latent, args.latent, generator=g).to(dev)
    t = torch.full((2,), 500.0, device=dev)
    context = torch.randn(2, 77, SD15_LAYOUT["context_dim"], generator=g).to(dev)
    walls = []
    with torch.no_grad():
        for _ in range(4):
            with RunMeter(clock_device) as c:
                dm(x, t, context=context)
            walls.append(c.wall)
    return statistics.median(walls[1:])


def check_bit_exact(model, swapper, options, keys, compute_dtype) -> int:
    """Swapped weights of every option vs core's patch computation on the same device; returns how many
    (layer, option) pairs differ."""
    import comfy.lora
    import comfy.utils
    import torch

    bad = 0
    for j in range(len(options)):
        swapper.activate(j)
        for key in keys:
            original = swapper.originals[key]
            patches = options[j].get(key)
            if not patches:
                continue
            temp = original.to(compute_dtype(original.device), copy=True)
            expected = comfy.lora.calculate_weight(patches, temp, key).to(original.dtype)
            if not torch.equal(comfy.utils.get_attr(model.model, key), expected):
                bad += 1
    return bad


def run_seconds(swapper_class, model, options, args) -> float:
    """Median wall seconds of one sampling run's swap work, as a runtime does it: a new swapper over the runtime's
    ``LowRankTerms`` (kept between runs), bench_switch's activations, then ``restore``."""
    import torch

    terms = swapper_class(model.model, options).terms  # what the runtime keeps for its lifetime
    walls = []
    with torch.no_grad():
        for _ in range(RUNS + 1):
            with RunMeter(args.device) as c:
                swapper = swapper_class(model.model, options, terms=terms)
                for j in SWITCH_ORDER:
                    swapper.activate(j)
                swapper.restore()
            walls.append(c.wall)
    return statistics.median(walls[1:])


def main() -> None:
    args = parse_args()
    setup_process(args.threads, "pytorch")
    env, models_dir = start_sampling_bench(args, "Merged swap benchmark", "swap")
    import torch

    swap_module = env.engine("nodes.runtime.merged_swap")
    MergedSwapper, patched_keys = swap_module.MergedSwapper, swap_module.patched_keys
    model, options = build(args, env, models_dir)
    keys = patched_keys(options)
    weights = [model.model.get_parameter(k) for k in keys]
    patched_bytes = sum(w.numel() * w.element_size() for w in weights)
    n_params = sum(t.numel() for t in model.model.diffusion_model.parameters())
    print(f"model: SD1.5-shaped UNet, model_channels {args.model_channels}, {n_params / 1e6:.1f} M parameters on "
          f"{weights[0].device}; {K} kohya LoRAs of rank {args.rank} on {len(keys)} layers "
          f"({patched_bytes / 2**20:.0f} MiB of weights patched per swap)")
    freeze_gc()

    call = unet_call_seconds(model, args, args.device)
    swapper = MergedSwapper(model.model, options)
    with torch.no_grad():
        for j in range(K):  # warm-up: buffers allocated, factors on the device
            swapper.activate(j)
        host, wall = [], []
        for n in range(args.swaps):
            with RunMeter(args.device) as c:
                swapper.activate((n + 1) % K)
            host.append(c.host)
            wall.append(c.wall)
        mismatches = check_bit_exact(model, swapper, options, keys, swap_module._compute_dtype)
        with RunMeter(args.device) as c:
            swapper.restore()
        restore = c.wall
        swapped_back = all(model.model.get_parameter(k) is w for k, w in zip(keys, weights))

    run = run_seconds(MergedSwapper, model, options, args)

    swap, swap_host = statistics.median(wall), statistics.median(host)
    per_layer_us = 1e6 * swap / len(keys)
    print(f"\nper swap, median of {args.swaps}: wall {swap / call:.4f} UNet calls ({per_layer_us:.1f} µs per layer), "
          f"host {swap_host / call:.4f} UNet calls (host ÷ wall {swap_host / swap:.2f}); restore {restore / call:.4f}")
    print(f"a run's swap work (new swapper: plans, factor upload, patched copies allocated; LoRAs 0, 1, 2, 0; "
          f"restore), median of {RUNS}: {run / call:.4f} UNet calls")
    print(f"predicted bench_switch B / A (k = 3, τ = 5, {SWITCH_STEPS} steps): {1 + run / (SWITCH_STEPS * call):.3f} "
          f"(from 4 steady swaps + restore: {1 + (SWITCH_ACTIVATIONS * swap + restore) / (SWITCH_STEPS * call):.3f})")
    if args.device == "cuda":
        pinned = [w.detach().to("cpu").pin_memory() for w in weights]
        with RunMeter(args.device) as c:
            for w, p in zip(weights, pinned):
                w.data.copy_(p, non_blocking=True)  # the same values: the model is unchanged
        print(f"uploading the patched layers' originals from pinned memory ({patched_bytes / 2**20:.0f} MiB): "
              f"{c.wall / call:.4f} UNet calls ({patched_bytes / c.wall / 1e9:.1f} GB/s)")
    print(f"check: swapped weights vs core's calculate_weight on {weights[0].device}: "
          f"{'bit-identical' if mismatches == 0 else f'FAILED, {mismatches} layer×LoRA pairs differ'}; "
          f"originals back after restore: {'yes' if swapped_back else 'FAILED'}")
    if mismatches or not swapped_back:
        sys.exit(1)


if __name__ == "__main__":
    main()
