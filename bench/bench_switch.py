#!/usr/bin/env python3
"""Benchmark: LoRA Switch (``LoraSetSwitch``) against static application and ComfyUI core's per-step hooks.

Usage::

    python bench/bench_switch.py [--quick] [--steps N] [--repeats N] [--no-memory] [--profile]

What is measured (one process, real ComfyUI from ``tests/harness/comfy_env``, fp32, on the CPU unless
``--device cuda``; ``--timing steady``: see bench_common.add_timing_argument):

* A mid-size SD1.5-shaped UNet (bench_apply.py's layout, model_channels 96: ≈ 81 M parameters;
  ``--quick``: model_channels 32, ≈ 10 M) and kohya LoRA files written by ``harness.lora_factory`` into
  the harness's ``loras`` folder, on every attention projection, ``proj_in``/``proj_out`` and
  feed-forward layer: 3 LoRAs at rank 16, 3 at rank 64 and one at rank 128.
* Sampling: euler / normal, ``--steps`` steps (default 12), batch 1, latent 64×64 (512 px; ``--quick``:
  16×16), cfg 5 (cond + uncond: two rows per UNet call), the same seed for every run.
* One *run* = build the MODEL (or GUIDER) with the nodes / core API, then sample. ComfyUI's model
  management is reset before every run (``unload_all_models``, untimed; ``--keep-loaded``, the default on
  cuda, keeps the model loaded), so a method that patches weights pays for it in every run, as on a fresh
  prompt.

  A. static: ``LoraSetLoad`` (first LoRA) → ``LoraSetApply`` → ``comfy.sample.sample`` (the baseline);
  B. ``LoraSetSwitch`` (strategy auto = merged), k = 3, τ = switch_every = 5, schedule "paper";
  C. core hook keyframes: per LoRA j ``comfy.hooks.create_hook_lora(sd_j, 1, 1)`` with a
     ``HookKeyframeGroup`` giving strength 1 in j's segments and 0 elsewhere; ``start_percent``
     computed from the actual sigma schedule so each switch lands exactly on its step (checked against
     ``percent_to_sigma``), ``guarantee_steps=1``; all hooks combined (``HookGroup.combine_all_hooks``)
     on both conds; ``comfy.sample.sample`` on the base model;
  D. core hook-group guider: a ``CFGGuider`` subclass holding cond sets p_j/n_j, each tagged with LoRA
     j's hook group, whose ``predict_noise`` picks j = (i // τ) % k from the step (i = last
     ``sample_sigmas`` entry ≥ σ) and calls ``comfy.samplers.sampling_function``; ``guider.sample``;
  E. ``LoraSetSwitch`` with strategy "unmerged" (k = 3);
  L. (only with ``--methods`` naming it) ``LoraSetSwitch`` with strategy "merged-lowvram" (k = 3): swapped in the
     model's own weights, the originals in host memory (no patched copy on the device);
  F/G/H. ``LoraSetSwitch`` with a ONE-entry set (one LoRA on all rows), strategy unmerged vs merged, at
     ranks 16 / 64 / 128, with the FLOP ratio that explains the overhead: per patched layer the
     adapter adds 2·r·(in+out)·tokens FLOPs (the layer itself is 2·in·out·tokens); summed over the
     patched layers and divided by the whole UNet's FLOPs, counted with
     ``torch.utils.flop_counter.FlopCounterMode`` on one forward (CPU flash attention included).

* One warm-up round, then ``--repeats`` rounds (default 4); each round runs every method once, in
  the order A B C D E (rank 16), A B C D E (rank 64), then merged/unmerged per rank of F/G/H; medians
  are reported. Correctness guard (from the warm-up outputs, i.e. before any timing): B must equal D
  within 1e-4 relative (max abs difference over max abs value), else a warning is printed; C vs D,
  E vs B and unmerged vs merged are printed as well.
* Peak memory (A, B, C, D at the first rank, unless ``--no-memory``): each method runs once in a fresh
  child process of this script (hidden ``--child``); the number is its ``ru_maxrss`` minus that of a
  child that only builds the model and loads the LoRAs (core's state dicts and the pack's file cache).
* If B misses a target (or with ``--profile``), one B run is profiled with cProfile and the time spent
  in the step probe, ``MergedSwapper.activate``/``restore``, the nodes, model loading and the UNet is
  printed.

Attention: ``--attention pytorch`` (default) makes ComfyUI use torch SDPA, as it does on NVIDIA GPUs
(``--use-pytorch-cross-attention``); ``--attention comfy`` keeps ComfyUI's CPU default (sub-quadratic
attention, about 2× slower here). torch runs on ``--threads`` CPU threads (default 2).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the `harness` package

from bench_common import (  # noqa: E402
    SD15_LAYOUT, RunLog, abort_on_non_finite, RunMeter, SamplingMethods, add_budget_argument, add_device_arguments, add_timing_argument,
    fmt_row, freeze_gc, guard_verdict, lora_targets, out_of_budget, proc_status as _proc_status, profile_one_run,
    relative_difference, reset_peak_rss as _reset_peak_rss, runs_described, select_device, setup_process,
    start_sampling_bench, time_steady, trace_sampling, unet_dtype)
from harness import comfy_env, lora_factory, tiny_models  # noqa: E402
from harness.node_calls import call_node  # noqa: E402

MODEL_CHANNELS = {"default": 96, "quick": 32}
LATENT = {"default": 64, "quick": 16}
STEPS = {"default": 12, "quick": 6}
REPEATS = {"default": 4, "quick": 2}
RANKS = (16, 64)  # main comparison (A–E)
UNMERGED_RANKS = (16, 64, 128)  # F/G/H
HEAD_CHANNELS = 32
# alpha = 4·√rank: every LoRA changes its layers by about the same relative amount (ΔW ≈ 0.8·W element-wise,
# strong, so that a wrong LoRA at any step is visible in the checks) whatever its rank. Much stronger LoRAs make
# this random-weight UNet chaotic (alpha = 2·rank at rank 64: a 1e-6 relative weight change moved the output by
# 40 %), and then merged and unmerged execution, which round differently, no longer agree.
LORA_ALPHA_PER_SQRT_RANK = 4.0
K = 3  # LoRAs in the switched set
EVERY = 5  # τ
CFG = 5.0
SEED = 1234
SAMPLER, SCHEDULER = "euler", "normal"
TARGET_B_OVER_A = 1.05
TARGET_B_OVER_CORE = 0.80
MATCH_REL = 1e-4

METHODS = {  # key → label
    "A": "A static LoraSetApply (1st LoRA)",
    "B": "B LoraSetSwitch merged (auto)",
    "C": "C core hook keyframes",
    "D": "D core hook-group guider",
    "E": "E LoraSetSwitch unmerged",
    "L": "L LoraSetSwitch merged-lowvram",
}
CORE_COMPARISON = set("ABCDE")  # the methods the comparison with core needs


def build_model(args):
    """A ModelPatcher over the SD1.5-shaped UNet; like ``tiny_models.build_unet`` but with 32-channel heads.

    Real SD1.5 fixes 8 heads per block (head dim 40 at 320 channels); at model_channels 96 that would be
    head dim 12, which makes CPU attention cost per token pair high and unlike SD1.5. 32-channel heads keep every
    weight shape (and so every LoRA key) identical and the head dim close to SD1.5's.
    """
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    class SD15Bench(comfy.supported_models.SD15):
        unet_extra_config = {"num_heads": -1, "num_head_channels": HEAD_CHANNELS}

    config = dict(tiny_models.SD15_TINY, **SD15_LAYOUT)
    config.update(model_channels=args.model_channels, dtype=unet_dtype(args))
    model_config = SD15Bench(config)
    model_config.set_inference_dtype(unet_dtype(args), None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    tiny_models.init_weights_(model.diffusion_model, 0, fan_in=True)  # finite in fp16 at any width
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def lora_name(rank: int, index: int) -> str:
    return f"bench_switch_r{rank}_{index}.safetensors"


def lora_names(rank: int, count: int = K) -> list[str]:
    return [lora_name(rank, i) for i in range(count)]


def write_loras(model_sd: dict, loras_dir: Path, ranks, unmerged_ranks) -> list[str]:
    """K files per main rank, one per rank only used by the one-entry table; kohya keys, alpha = 4·√rank."""
    targets = lora_targets(model_sd)
    for rank in sorted(set(ranks) | set(unmerged_ranks)):
        for i in range(K if rank in ranks else 1):
            lora = lora_factory.make_lora(model_sd, targets, "kohya", rank=rank,
                                          alpha=LORA_ALPHA_PER_SQRT_RANK * math.sqrt(rank),
                                          seed=1000 * rank + i)
            lora.save(loras_dir / lora_name(rank, i))
    return targets


# ------------------------------------------------------------------------------------------ methods

_GUIDER_CLASS = None


def hook_switch_guider_class():
    """Core per-step switching with hook groups (internals §4(b)1), built once comfy is importable."""
    global _GUIDER_CLASS
    if _GUIDER_CLASS is not None:
        return _GUIDER_CLASS
    import comfy.hooks
    import comfy.samplers
    import node_helpers

    class HookSwitchGuider(comfy.samplers.CFGGuider):
        def __init__(self, model_patcher, hook_groups, every, positive, negative, cfg):
            super().__init__(model_patcher)
            self.count = len(hook_groups)
            self.every = every
            negative = node_helpers.conditioning_set_values(negative, {"prompt_type": "negative"})
            conds = {}
            for j, group in enumerate(hook_groups):
                conds[f"p{j}"] = comfy.hooks.set_hooks_for_conditioning(positive, group)
                conds[f"n{j}"] = comfy.hooks.set_hooks_for_conditioning(negative, group)
            self.inner_set_conds(conds)
            self.set_cfg(cfg)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (core's signature)
            sample_sigmas = model_options["transformer_options"]["sample_sigmas"]
            s = float(timestep.reshape(-1)[0])
            i = int((sample_sigmas >= s - 1e-6 * max(abs(s), 1e-12)).nonzero().max())
            j = (i // self.every) % self.count
            return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds[f"n{j}"],
                                                    self.conds[f"p{j}"], self.cfg, model_options=model_options,
                                                    seed=seed)

    _GUIDER_CLASS = HookSwitchGuider
    return HookSwitchGuider


class Methods(SamplingMethods):
    """Every method as one full run: build the MODEL/GUIDER, sample, return the latent."""

    def __init__(self, env, model, args, loras_dir: Path):
        super().__init__(env, model, args, loras_dir, sampler=SAMPLER, scheduler=SCHEDULER, seed=SEED)
        self.every = args.every
        self.percents = [self.keyframe_percent(s) for s in range(self.steps)]

    def keyframe_percent(self, step: int) -> float:
        """A start_percent whose sigma lies in [σ_step, σ_step-1): the keyframe takes over exactly at ``step``."""
        import torch

        if step == 0:
            return 0.0
        hi, lo = float(self.sigmas[step - 1]), float(self.sigmas[step])

        def inside(p):
            s = self.ms.percent_to_sigma(p)
            return lo <= s < hi

        mid = math.sqrt(hi * lo) if lo > 0 else hi / 2
        p = 1.0 - float(self.ms.timestep(torch.tensor(mid))) / 999.0  # internals §1.9 (discrete models)
        if inside(p):
            return p
        a, b = 0.0, 1.0  # percent_to_sigma decreases with p: bisect for a sigma inside the interval
        for _ in range(60):
            p = (a + b) / 2
            s = self.ms.percent_to_sigma(p)
            if s >= hi:
                a = p
            elif s < lo:
                b = p
            else:
                return p
        raise RuntimeError(f"no keyframe percent puts step {step} between sigmas {lo} and {hi}")

    def sample(self, model, positive, negative):
        import comfy.sample

        return comfy.sample.sample(model, self.noise, self.steps, CFG, SAMPLER, SCHEDULER, positive, negative,
                                   self.latent, disable_pbar=True, seed=SEED)

    # -- the methods: each prepares its MODEL / GUIDER and returns the sampling call --------------
    def static(self, names):
        (patched, _clip, _report) = call_node("LoraSetApply", model=self.model, lora_set=self.lora_set(names[:1]))
        return lambda: self.sample(patched, self.positive, self.negative)

    def switch(self, names, strategy):
        (switched, _clip, _report) = call_node("LoraSetSwitch", model=self.model, lora_set=self.lora_set(names),
                                               switch_every=self.every, schedule="paper", strategy=strategy)
        return lambda: self.sample(switched, self.positive, self.negative)

    def keyframes(self, names):
        import comfy.hooks

        starts = list(range(0, self.steps, self.every))
        groups = []
        for j, name in enumerate(names):
            group = comfy.hooks.create_hook_lora(self.lora_sd(name), 1.0, 1.0)
            kf = comfy.hooks.HookKeyframeGroup()
            for s in starts:
                active = (s // self.every) % len(names)
                kf.add(comfy.hooks.HookKeyframe(strength=1.0 if active == j else 0.0,
                                                start_percent=self.percents[s], guarantee_steps=1))
            group.set_keyframes_on_hooks(kf)
            groups.append(group)
        hooks = comfy.hooks.HookGroup.combine_all_hooks(groups)
        positive = comfy.hooks.set_hooks_for_conditioning(self.positive, hooks)
        negative = comfy.hooks.set_hooks_for_conditioning(self.negative, hooks)
        return lambda: self.sample(self.model, positive, negative)

    def guider(self, names):
        import comfy.hooks
        import comfy.samplers

        groups = [comfy.hooks.create_hook_lora(self.lora_sd(name), 1.0, 1.0) for name in names]
        return self.sample_guider(hook_switch_guider_class()(self.model, groups, self.every, self.positive,
                                                             self.negative, CFG))

    def prepare(self, method: str, rank: int):
        """Build a main-table method at ``rank``; returns its sampling call."""
        names = lora_names(rank)
        if method == "A":
            return self.static(names)
        if method == "B":
            return self.switch(names, "auto")
        if method == "C":
            return self.keyframes(names)
        if method == "D":
            return self.guider(names)
        if method == "E":
            return self.switch(names, "unmerged")
        if method == "L":
            return self.switch(names, "merged-lowvram")
        raise ValueError(method)

    def prepare_config(self, cfg):
        """Build a timed configuration: ("main", method, rank) or ("one", strategy, rank) (one-entry set)."""
        kind, what, rank = cfg
        return self.prepare(what, rank) if kind == "main" else self.switch(lora_names(rank, 1), what)

    def run(self, method: str, rank: int):
        """One run of a main-table method: build it, then sample."""
        return self.prepare(method, rank)()

    def run_config(self, cfg):
        return self.prepare_config(cfg)()

    def timed(self, fn, *a):
        """((wall seconds, process CPU seconds), output) of one run; its peak CUDA memory in ``last_peak``."""
        meter, out = self.measure(fn, *a)
        return (meter.wall, meter.cpu), out


def time_fresh(methods: Methods, configs, args, t_start: float, unmerged_ranks):
    """Rounds of every method (build + sample each time); round 0 is the warm-up."""
    log = RunLog()
    for rnd in range(args.repeats + 1):  # round 0 is the warm-up
        t_round = time.perf_counter()
        for cfg in configs:
            seconds, out = methods.timed(methods.run_config, cfg)
            log.add(cfg, rnd == 0, seconds, out, methods.last_peak)
        if rnd == 0:
            print(f"warm-up round done ({time.perf_counter() - t_start:.0f} s since start)", flush=True)
            check_outputs(args, log.warm_outputs, unmerged_ranks)
        else:
            print(f"round {rnd}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s since start)", flush=True)
        if out_of_budget(args, t_start, time.perf_counter() - t_round, rnd):
            break
    return log


# ------------------------------------------------------------------------------------------- FLOPs

def count_flops(model, methods: Methods, targets: list[str]):
    """(UNet FLOPs of one forward with cond+uncond rows, per-layer (in, out, tokens), seconds of one forward)."""
    import comfy.utils
    import torch
    from torch.utils import flop_counter

    methods.mm.load_models_gpu([model])  # on the device the runs use (a no-op move on the CPU)
    dm = model.model.diffusion_model
    dev = model.load_device
    side = methods.latent.shape[-1]
    dtype = model.model.get_dtype()  # what BaseModel.apply_model casts the inputs to (--dtype)
    x = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(3)).to(dev, dtype)
    t = torch.full((2,), 500.0, device=dev)
    context = torch.cat([methods.positive[0][0], methods.negative[0][0]]).to(dev, dtype)
    layers: dict[str, tuple[int, int, int]] = {}
    handles = []
    for key in targets:
        path = key[:-len(".weight")]
        module = comfy.utils.get_attr(model.model, path)

        def record(mod, inputs, output, path=path):
            if isinstance(mod, torch.nn.Conv2d):
                if mod.kernel_size != (1, 1):
                    raise RuntimeError(f"{path}: only linear and 1×1 conv targets are counted analytically")
                tokens = output.shape[0] * output.shape[2] * output.shape[3]
                layers[path] = (mod.in_channels, mod.out_channels, tokens)
            else:
                layers[path] = (mod.in_features, mod.out_features, inputs[0].numel() // mod.in_features)

        handles.append(module.register_forward_hook(record))
    custom = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:  # not in torch's table: count it like the other SDPA kernels
        def cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
            return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)
        custom[cpu_flash] = cpu_sdpa_flop
    try:
        with torch.no_grad(), flop_counter.FlopCounterMode(display=False, custom_mapping=custom) as counter:
            dm(x, t, context=context)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad(), RunMeter(methods.device) as meter:
        dm(x, t, context=context)
    methods.mm.unload_all_models()
    return counter.get_total_flops(), layers, (meter.wall, meter.cpu)


def lora_flops(layers: dict, rank: int) -> int:
    return sum(2 * rank * (i + o) * n for i, o, n in layers.values())


def layer_flops(layers: dict) -> int:
    return sum(2 * i * o * n for i, o, n in layers.values())


# ------------------------------------------------------------------------------------------- memory

def child_main(args) -> None:
    """One method run in a fresh process (or only the setup, for ``baseline``); prints one JSON line."""
    env = comfy_env.start(models_dir=Path(args.models_dir), quiet=False)
    model = build_model(args)
    methods = Methods(env, model, args, Path(args.models_dir) / "loras")
    names = lora_names(args.rank)
    for name in names:
        methods.lora_sd(name)
    methods.warm_pack_cache(names)
    freeze_gc()
    rss_before = _proc_status("VmRSS")
    resettable = _reset_peak_rss()
    if args.child != "baseline":
        methods.run(args.child, args.rank)
    result = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "run_peak": _proc_status("VmHWM") - rss_before if resettable else None}
    print("CHILD_RESULT " + json.dumps(result), flush=True)


def child_command(args, method: str, rank: int, models_dir: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--rank", str(rank),
           "--models-dir", str(models_dir), "--threads", str(args.threads), "--attention", args.attention,
           "--steps", str(args.steps), "--every", str(args.every), "--latent", str(args.latent),
           "--model-channels", str(args.model_channels)]
    return cmd + (["--quick"] if args.quick else [])


def spawn_child(args, method: str, rank: int, models_dir: Path) -> dict:
    out = subprocess.run(child_command(args, method, rank, models_dir), capture_output=True, text=True,
                         env=os.environ.copy())
    for line in out.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            return json.loads(line[len("CHILD_RESULT "):])
    raise RuntimeError(f"child {method} rank {rank} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")


def measure_memory(args, rank: int, models_dir: Path, methods: str) -> dict[str, tuple[int, int | None]]:
    """Per method, bytes: (ru_maxrss − the baseline child's ru_maxrss, VmHWM − VmRSS before the run or None)."""
    jobs = ["baseline"] + [m for m in "ABCD" if m in methods]
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = dict(zip(jobs, pool.map(lambda m: spawn_child(args, m, rank, models_dir), jobs)))
    base = peaks["baseline"]["ru_maxrss"]
    return {m: (peaks[m]["ru_maxrss"] - base, peaks[m]["run_peak"]) for m in jobs[1:]}


# ------------------------------------------------------------------------------------------ profile

PROFILE_POINTS = (  # (label, file suffix, function name)
    ("whole run: comfy.sample.sample", "comfy/sample.py", "sample"),
    ("LoraSetLoad ×3 (nodes)", "nodes/ui/loading.py", "load"),
    ("LoraSetSwitch node (resolve set, attach)", "nodes/ui/composition.py", "switch"),
    ("  resolve_set (key mapping, patch lists)", "nodes/patching.py", "resolve_set"),
    ("load_models_gpu", "comfy/model_management.py", "load_models_gpu"),
    ("SAMPLER_SAMPLE wrapper (everything in the run)", "nodes/runtime/binding.py", "sampler_sample"),
    ("  step probe (probe_events)", "nodes/runtime/step_tracker.py", "probe_events"),
    ("  MergedSwapper.__init__", "nodes/runtime/merged_swap.py", "__init__"),
    ("  MergedSwapper.activate (all swaps)", "nodes/runtime/merged_swap.py", "activate"),
    ("    comfy.lora.calculate_weight", "comfy/lora.py", "calculate_weight"),
    ("  MergedSwapper.restore", "nodes/runtime/merged_swap.py", "restore"),
    ("  PREDICT_NOISE wrapper (incl. UNet)", "nodes/runtime/binding.py", "predict_noise"),
    ("  UNet forward (UNetModel._forward)", "comfy/ldm/modules/diffusionmodules/openaimodel.py", "_forward"),
)


def profile_switch(methods: Methods, rank: int) -> None:
    stats = profile_one_run(methods, lambda: methods.run("B", rank), f"B (LoraSetSwitch merged, rank {rank})",
                            PROFILE_POINTS)
    print("\nthe pack's functions, top 20 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(r"/nodes/|/kernels/", 20)
    print("top 25 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(25)
    print("top 15 by own time (where the CPU goes: torch ops show as built-in methods):")
    stats.sort_stats("tottime").print_stats(15)


# -------------------------------------------------------------------------------------------- main

def trace_methods(methods: Methods, args, rank: int) -> None:
    """torch.profiler over one warm run of A, B and E (``bench_common.trace_sampling``)."""
    for m in (m for m in "ABE" if m in args.methods):
        trace_sampling(methods, methods.prepare(m, rank), f"{METHODS[m]} (rank {rank})")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: ≈10 M-parameter model, latent 16×16, 6 steps, τ = 2, 2 repeats")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 12; --quick: 6)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 4; --quick: 2)")
    p.add_argument("--every", type=int, default=None, help="τ = switch_every (default 5; --quick: 2)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64 = 512 px; --quick: 16)")
    p.add_argument("--model-channels", type=int, default=None, help="UNet model_channels (default 96; --quick: 32)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on this shared 2-core machine 2 threads made a UNet call "
                        "5-20x slower and erratic as soon as other processes ran)")
    p.add_argument("--attention", choices=("pytorch", "comfy"), default="pytorch",
                   help="pytorch: torch SDPA (ComfyUI's GPU default); comfy: ComfyUI's CPU default (sub-quadratic)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes (always skipped on "
                                                            "cuda, where each run's peak CUDA memory is reported)")
    add_device_arguments(p)
    add_budget_argument(p)
    add_timing_argument(p)
    p.add_argument("--no-unmerged-table", action="store_true", help="skip F/G/H (one-entry unmerged vs merged)")
    p.add_argument("--profile", action="store_true", help="always cProfile one B run (default: only on a missed target)")
    p.add_argument("--methods", default="ABCDE",
                   help="which of A–E and L to run: ABCDE (default), ABCDEL, or A and B with any of E and L (then "
                        "the comparison with core is skipped, e.g. to give B / A more timed runs within --budget-s)")
    p.add_argument("--torch-profile", action="store_true",
                   help="after the timings, trace one run each of A, B and E (rank 16) with torch.profiler and print "
                        "where host and device time go (on cuda: kernels by device time)")
    p.add_argument("--child", choices=("baseline", "A", "B", "C", "D"), help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=RANKS[0], help=argparse.SUPPRESS)
    p.add_argument("--models-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    chosen = set(args.methods.upper())
    if not chosen <= set(METHODS) or not {"A", "B"} <= chosen or ({"C", "D"} & chosen and
                                                                  not CORE_COMPARISON <= chosen):
        p.error("--methods: A and B, plus E and / or L if wanted, or all of ABCDE (the comparison with core needs "
                "each of them)")
    args.methods = "".join(m for m in METHODS if m in chosen)
    mode = "quick" if args.quick else "default"
    args.steps = args.steps or STEPS[mode]
    args.repeats = args.repeats or REPEATS[mode]
    args.every = args.every or (2 if args.quick else EVERY)
    args.latent = args.latent or LATENT[mode]
    args.model_channels = args.model_channels or MODEL_CHANNELS[mode]
    select_device(args)
    return args


def main() -> None:
    args = parse_args()
    setup_process(args.threads, args.attention)
    if args.child:
        child_main(args)
        return

    t_start = time.perf_counter()
    env, models_dir = start_sampling_bench(args, "LoRA Switch benchmark", "switch")
    model = build_model(args)
    n_params = sum(t.numel() for t in model.model.diffusion_model.parameters())
    model_sd = model.model.state_dict()
    unmerged_ranks = () if args.no_unmerged_table else UNMERGED_RANKS
    targets = write_loras(model_sd, models_dir / "loras", RANKS, unmerged_ranks)
    target_params = sum(model_sd[k].numel() for k in targets)
    del model_sd
    print(f"model: SD1.5-shaped UNet, model_channels {args.model_channels}, {n_params / 1e6:.1f} M parameters; "
          f"LoRA targets: {len(targets)} layers ({target_params / 1e6:.1f} M parameters: attention q/k/v/out, "
          f"proj_in/out, ff)")
    print(f"sampling: {SAMPLER}/{SCHEDULER}, {args.steps} steps, batch 1, latent {args.latent}×{args.latent} "
          f"({args.latent * 8} px), cfg {CFG:g} (cond+uncond = 2 rows per UNet call), seed {SEED}; "
          f"Switch: k = {K}, τ = {args.every}, schedule paper")
    print(f"LoRAs: kohya, alpha = {LORA_ALPHA_PER_SQRT_RANK:g}·√rank, {K} at each rank {RANKS}" +
          (f", 1 at rank {[r for r in unmerged_ranks if r not in RANKS]}" if unmerged_ranks else ""))

    methods = Methods(env, model, args, models_dir / "loras")
    for rank in RANKS:
        for name in lora_names(rank):
            methods.lora_sd(name)
    flops, layers, fwd_seconds = count_flops(model, methods, targets)
    print(f"UNet FLOPs per call (2 rows, FlopCounterMode): {flops / 1e9:.1f} GFLOP; the {len(layers)} target layers "
          f"account for {layer_flops(layers) / 1e9:.1f} GFLOP; one UNet call took {fwd_seconds[0]:.2f} s "
          f"({fwd_seconds[1]:.2f} s CPU)")
    print("keyframe start_percent per switch step (C): "
          + ", ".join(f"step {s}: {methods.percents[s]:.4f}" for s in range(args.every, args.steps, args.every)))
    configs = [("main", m, r) for r in RANKS for m in METHODS if m in args.methods]
    configs += [("one", s, r) for r in unmerged_ranks for s in ("merged", "unmerged")]
    eta = (args.repeats + 1) * len(configs) * args.steps * fwd_seconds[0]
    print(f"{len(configs)} runs per round, {args.repeats} timed rounds + 1 warm-up: "
          f"estimated ≥ {eta / 60:.1f} min for the timings (UNet calls only)", flush=True)

    freeze_gc()
    if args.timing == "steady":
        log = time_steady(methods, configs, args, t_start, methods.prepare_config)
        check_outputs(args, log.warm_outputs, unmerged_ranks)
    else:
        log = time_fresh(methods, configs, args, t_start, unmerged_ranks)
    times, cuda_peaks = log.times, log.cuda_peaks
    methods.mm.unload_all_models()

    memory = {} if args.no_memory else measure_memory(args, RANKS[0], models_dir, args.methods)

    print()
    print(f"Results: median of {args.repeats} timed runs (after 1 warm-up) per method, seconds per run "
          f"({runs_described(args)}). "
          "Each table twice: wall clock, and process CPU time (one torch thread: CPU time leaves out waiting "
          "for a core that another process holds)")
    missed = False
    for clock, c_i in (("wall clock", 0), ("process CPU time", 1)):
        med = {cfg: statistics.median(t[c_i] for t in v) for cfg, v in times.items()}
        missed |= print_tables(med, {cfg: [t[c_i] for t in v] for cfg, v in times.items()}, clock, args, layers,
                               flops, unmerged_ranks)

    if memory:
        print()
        print(f"Peak memory of one run, fresh child process per method, rank {RANKS[0]}, MiB:")
        print("  ru_maxrss − ru_maxrss of a child that only builds the model and loads the LoRAs (0 when the run "
              "peaks below start-up's peak);")
        print("  run peak = VmHWM after the run − VmRSS before it (peak counter reset via /proc/self/clear_refs)")
        mw = (34, 12, 10)
        print(fmt_row(("method", "ru_maxrss Δ", "run peak"), mw))
        for m in memory:
            ru, run_peak = memory[m]
            print(fmt_row((METHODS[m], f"{ru / 2**20:.1f}",
                           "n/a" if run_peak is None else f"{run_peak / 2**20:.1f}"), mw))

    if cuda_peaks:
        print_cuda_peaks(cuda_peaks, unmerged_ranks)

    print()
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    if args.torch_profile:
        trace_methods(methods, args, RANKS[0])
    if args.profile or missed:
        if missed:
            print("B missed a target: profiling one B run")
        profile_switch(methods, RANKS[0])


def print_tables(med: dict, samples: dict, clock: str, args, layers: dict, flops: int, unmerged_ranks) -> bool:
    """The main tables (one per rank) and the unmerged table for one clock; returns whether B missed a target."""
    widths = (34, 8, 8, 8, 11)
    missed = False
    for rank in RANKS:
        a = med[("main", "A", rank)]
        print()
        print(f"[{clock}] rank {rank}, k = {K}, τ = {args.every}")
        print(fmt_row(("method", "median", "min", "vs A", "extra vs A"), widths))
        for m, label in METHODS.items():
            if ("main", m, rank) not in med:
                continue
            v = med[("main", m, rank)]
            print(fmt_row((label, f"{v:.3f}", f"{min(samples[('main', m, rank)]):.3f}", f"{v / a:.3f}",
                           f"{v - a:+.3f}"), widths))
        b = med[("main", "B", rank)]
        ba = b / a
        ok_a = ba <= TARGET_B_OVER_A
        missed |= not ok_a
        print(f"  B/A = {ba:.3f} (target ≤ {TARGET_B_OVER_A:.2f}): {'OK' if ok_a else 'MISSED'}")
        if ("main", "C", rank) not in med or ("main", "D", rank) not in med:
            continue
        c, d = med[("main", "C", rank)], med[("main", "D", rank)]
        bc, bd = b / c, b / d
        bcore = b / min(c, d)
        ok_core = bcore <= TARGET_B_OVER_CORE
        missed |= not ok_core
        print(f"  B/C = {bc:.3f}, B/D = {bd:.3f}, B/min(C, D) = {bcore:.3f} (target ≤ {TARGET_B_OVER_CORE:.2f}): "
              f"{'OK' if ok_core else 'MISSED'}")
        extra_core = min(c, d) - a
        print(f"  switching cost above A: B {b - a:+.3f} s, C {c - a:+.3f} s, D {d - a:+.3f} s"
              + (f"; B's / min(C, D)'s = {(b - a) / extra_core:.2f}" if extra_core > 0 else ""))
    if unmerged_ranks:
        print()
        print(f"[{clock}] unmerged runtime, one LoRA on all rows vs merged (LoraSetSwitch, one-entry set), s per run;")
        print("  FLOP ratio = (UNet + adapter FLOPs) / UNet FLOPs per UNet call; adapter FLOPs = Σ 2·r·(in+out)·tokens "
              "over the patched layers")
        uw = (6, 8, 9, 16, 14, 11, 11)
        print(fmt_row(("rank", "merged", "unmerged", "unmerged/merged", "adapter GFLOP", "UNet GFLOP", "FLOP ratio"),
                      uw))
        for rank in unmerged_ranks:
            mg, um = med[("one", "merged", rank)], med[("one", "unmerged", rank)]
            lf = lora_flops(layers, rank)
            print(fmt_row((rank, f"{mg:.3f}", f"{um:.3f}", f"{um / mg:.3f}", f"{lf / 1e9:.2f}", f"{flops / 1e9:.1f}",
                           f"{1 + lf / flops:.3f}"), uw))
    return missed


def print_cuda_peaks(peaks: dict, unmerged_ranks) -> None:
    """Peak CUDA memory per method (max over all rounds), absolute and above A at the same rank."""
    print()
    print("Peak CUDA memory allocated during a run (torch.cuda.max_memory_allocated, whole process incl. the loaded "
          "model, max over all rounds), MiB:")
    widths = (34, 10, 10)
    for rank in RANKS:
        a = peaks[("main", "A", rank)]
        print(fmt_row((f"rank {rank}", "peak", "- A"), widths))
        for m, label in METHODS.items():
            if ("main", m, rank) in peaks:
                v = peaks[("main", m, rank)]
                print(fmt_row((label, f"{v / 2**20:.1f}", f"{(v - a) / 2**20:+.1f}"), widths))
    for rank in unmerged_ranks:
        mg, um = peaks[("one", "merged", rank)], peaks[("one", "unmerged", rank)]
        print(f"  one-entry rank {rank}: merged {mg / 2**20:.1f}, unmerged {um / 2**20:.1f} MiB")


def check_outputs(args, outputs: dict, unmerged_ranks) -> None:
    """Correctness guard on the warm-up outputs (same seed and schedule for every method)."""
    abort_on_non_finite(outputs)
    for rank in RANKS:
        o = {m: outputs[("main", m, rank)] for m in METHODS if ("main", m, rank) in outputs}
        if "D" not in o:
            line = f"check rank {rank}: B vs A {relative_difference(o['B'], o['A']):.2e} (must differ)"
            for m in "EL":
                if m in o:
                    line += f"; {m} vs B {relative_difference(o[m], o['B']):.2e}"
            print(line + " (no core reference: C and D not run)")
            continue
        bd = relative_difference(o["B"], o["D"])
        line = (f"check rank {rank}: B vs D rel. diff {bd:.2e} (guard ≤ {MATCH_REL:g}: "
                f"{guard_verdict(args, bd, MATCH_REL)}); C vs D {relative_difference(o['C'], o['D']):.2e}; "
                f"E vs B {relative_difference(o['E'], o['B']):.2e}; B vs A {relative_difference(o['B'], o['A']):.2e} "
                "(must differ: the LoRAs switch)")
        if "L" in o:
            line += f"; L vs B {relative_difference(o['L'], o['B']):.2e}"
        print(line)
        if relative_difference(o["B"], o["A"]) < 10 * MATCH_REL:
            print(f"WARNING: rank {rank}: the LoRAs change the output by less than 10× the guard's tolerance; "
                  "the B = D check cannot tell a wrong schedule apart")
        if guard_verdict(args, bd, MATCH_REL) == "FAILED":
            print(f"WARNING: rank {rank}: B (LoraSetSwitch) and D (core hook-group guider) differ by {bd:.2e} relative "
                  f"> {MATCH_REL:g}: the timings do not compare the same computation")
        cd = relative_difference(o["C"], o["D"])
        if guard_verdict(args, cd, MATCH_REL) == "FAILED":
            print(f"WARNING: rank {rank}: C (core keyframes) and D differ by {cd:.2e} relative > {MATCH_REL:g}: "
                  "the keyframes do not switch on the same steps")
    for rank in unmerged_ranks:
        d = relative_difference(outputs[("one", "unmerged", rank)], outputs[("one", "merged", rank)])
        print(f"check one-entry rank {rank}: unmerged vs merged rel. diff {d:.2e}")


if __name__ == "__main__":
    main()
