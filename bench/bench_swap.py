#!/usr/bin/env python3
"""Benchmark: the cost of one merged-weight swap, in UNet calls, for both merged forms: ``MergedSwapper`` (a patched
copy beside the originals, strategy ``merged``) and ``InPlaceSwapper`` (in the model's own weights, the originals in
host memory, ``merged-lowvram``).

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
* ``restore`` (back to the original Parameters, or their values copied back);
* a whole run's swap work as the runtime does it (a new swapper over the runtime's kept ``LowRankTerms``: plans,
  the factors' upload, the patched copies allocated or the originals copied to host memory, then LoRAs 0, 1, 2, 0
  and ``restore``), which gives the prediction, and on CUDA the device memory such a run allocates;
* on a GPU, for comparison: uploading the patched layers' original weights from pinned host memory (what a swap
  would add if the originals were kept off the GPU, as ComfyUI keeps a static LoRA's backup).

Check: every LoRA's swapped weights are compared with ComfyUI's own patch computation on the same device: the
copy's bit for bit (``comfy.lora.calculate_weight`` in core's LoRA compute dtype, as ``patch_weight_to_device``
does), the in-place form's within 8 units of fp32 precision of each layer's largest weight (fp32 formula, TF32 off,
after incremental updates); and the original weights must be back after ``restore``.
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
    dtype = model.model.get_dtype()  # what BaseModel.apply_model casts the inputs to (--dtype)
    x = torch.randn(2, 4, args.latent, args.latent, generator=g).to(dev, dtype)
    t = torch.full((2,), 500.0, device=dev)
    context = torch.randn(2, 77, SD15_LAYOUT["context_dim"], generator=g).to(dev, dtype)
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


def steady_swaps(swapper, args):
    """(median host, median wall) seconds of ``--swaps`` activations cycling through the LoRAs, after a warm-up."""
    import torch

    with torch.no_grad():
        for j in range(K):  # warm-up: buffers allocated, factors on the device
            swapper.activate(j)
        host, wall = [], []
        for n in range(args.swaps):
            with RunMeter(args.device) as c:
                swapper.activate((n + 1) % K)
            host.append(c.host)
            wall.append(c.wall)
    return statistics.median(host), statistics.median(wall)


def check_in_place(model, swapper_class, options, eps_units: int = 8) -> int:
    """A fresh in-place swapper through two cycles of the LoRAs (incremental updates included), every option's
    weights vs the fp32 formula ``W + Σ factor · up @ down`` (core's ``calculate_weight`` in fp32), within
    ``eps_units`` units of fp32 precision of each layer's largest weight (the tests' bound); returns the pairs off.
    TF32 is off meanwhile: the check is of the swap's arithmetic, not of the GPU's matmul precision (``addmm_`` runs
    in the weight's dtype, so core 0.9.x's fp16 LoRA compute is not what it is compared with)."""
    import comfy.lora
    import comfy.utils
    import torch

    settings = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    bad = 0
    try:
        swapper = swapper_class(model.model, options)
        with torch.no_grad():
            for j in list(range(len(options))) * 2:
                swapper.activate(j)
                for slot in swapper._slots:
                    patches = options[j].get(slot.layer.key)
                    if not patches:
                        continue
                    original = slot.backup.to(slot.weight.device, torch.float32, copy=True)  # patched in place
                    expected = comfy.lora.calculate_weight(patches, original, slot.layer.key)
                    error = (comfy.utils.get_attr(model.model, slot.layer.key).double() - expected.double()).abs().max()
                    if error > eps_units * torch.finfo(slot.weight.dtype).eps * expected.abs().max():
                        bad += 1
            swapper.restore()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = settings
    return bad


def peak_bytes(device: str, work) -> int:
    """Peak device memory ``work()`` allocates beyond what was allocated before it (CUDA; 0 elsewhere)."""
    import torch

    if device != "cuda":
        work()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    work()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    args = parse_args()
    setup_process(args.threads, "pytorch")
    env, models_dir = start_sampling_bench(args, "Merged swap benchmark", "swap")
    import torch

    swap_module = env.engine("nodes.runtime.merged_swap")
    MergedSwapper, patched_keys = swap_module.MergedSwapper, swap_module.patched_keys
    InPlaceSwapper = env.engine("nodes.runtime.inplace_swap").InPlaceSwapper
    model, options = build(args, env, models_dir)
    keys = patched_keys(options)
    weights = [model.model.get_parameter(k) for k in keys]
    before = [w.detach().to("cpu", copy=True) for w in weights]
    patched_bytes = sum(w.numel() * w.element_size() for w in weights)
    n_params = sum(t.numel() for t in model.model.diffusion_model.parameters())
    print(f"model: SD1.5-shaped UNet, model_channels {args.model_channels}, {n_params / 1e6:.1f} M parameters on "
          f"{weights[0].device}; {K} kohya LoRAs of rank {args.rank} on {len(keys)} layers "
          f"({patched_bytes / 2**20:.0f} MiB of weights patched per swap)")
    freeze_gc()

    call = unet_call_seconds(model, args, args.device)
    rows, checks = [], []
    forms = (("merged (patched copy)", MergedSwapper), ("merged-lowvram (in place)", InPlaceSwapper))
    for label, swapper_class in forms:
        swapper = swapper_class(model.model, options)
        swap_host, swap = steady_swaps(swapper, args)
        with torch.no_grad():
            if swapper_class is MergedSwapper:
                mismatches = check_bit_exact(model, swapper, options, keys, swap_module._compute_dtype)
            with RunMeter(args.device) as c:
                swapper.restore()
        if swapper_class is InPlaceSwapper:
            mismatches = check_in_place(model, swapper_class, options)
        verdict = ("bit-identical" if swapper_class is MergedSwapper else
                   "within 8 ulp of each layer's max|W| of the fp32 formula (TF32 off)")
        checks.append(f"{label}: {verdict if not mismatches else f'FAILED, {mismatches} layer×LoRA pairs off'}")
        restore = c.wall
        back = all(model.model.get_parameter(k) is w and torch.equal(w.detach().cpu(), b)
                   for k, w, b in zip(keys, weights, before))
        checks.append(f"{label}: original weights back after restore: {'yes' if back else 'FAILED'}")
        mismatches += 0 if back else 1
        runs = []
        peak = peak_bytes(args.device, lambda: runs.append(run_seconds(swapper_class, model, options, args)))
        run = runs[0]
        rows.append((label, swap, swap_host, restore, run, peak, mismatches))

    print(f"\n{'strategy':<27}{'per swap':>10}{'µs/layer':>10}{'host/wall':>10}{'restore':>9}{'run':>9}"
          f"{'pred. B/A':>10}{'peak MiB':>10}   (UNet calls; per swap: median of {args.swaps}; run: median of {RUNS})")
    for label, swap, swap_host, restore, run, peak, _ in rows:
        print(f"{label:<27}{swap / call:>10.4f}{1e6 * swap / len(keys):>10.1f}{swap_host / swap:>10.2f}"
              f"{restore / call:>9.4f}{run / call:>9.4f}{1 + run / (SWITCH_STEPS * call):>10.3f}"
              f"{peak / 2**20 if args.device == 'cuda' else float('nan'):>10.0f}")
    print(f"run = a run's swap work as the runtime does it (new swapper: plans, factor upload, copies or the "
          f"originals' host backup; LoRAs 0, 1, 2, 0; restore). pred. B/A = bench_switch's B / A (k = 3, τ = 5, {SWITCH_STEPS} "
          f"steps) ≈ 1 + run ÷ ({SWITCH_STEPS} UNet calls). peak = device memory a run allocates beyond the loaded "
          f"model (CUDA only).")
    if args.device == "cuda":
        pinned = [w.detach().to("cpu").pin_memory() for w in weights]
        with RunMeter(args.device) as c:
            for w, p in zip(weights, pinned):
                w.data.copy_(p, non_blocking=True)  # the same values: the model is unchanged
        print(f"uploading the patched layers' originals from pinned memory ({patched_bytes / 2**20:.0f} MiB): "
              f"{c.wall / call:.4f} UNet calls ({patched_bytes / c.wall / 1e9:.1f} GB/s)")
    print("checks against core's calculate_weight on the same device:\n  " + "\n  ".join(checks))
    if any(row[-1] for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
