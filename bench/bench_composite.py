#!/usr/bin/env python3
"""Benchmark: LoRA Composite (``LoraSetComposite``) and AutoLoRA (``AutoLoraGuidance``, ``AutoLoraGuider``).

Usage::

    python bench/bench_composite.py [--quick] [--steps N] [--repeats N] [--k 2,3,5] [--no-memory] [--profile]
                                    [--methods S,SB,CU,...] [--torch-profile] [--device cuda] [--dtype fp16]

What is measured (one process, real ComfyUI from ``tests/harness/comfy_env``, fp32 unless ``--dtype``, on the
CPU unless ``--device cuda``; ``--timing steady``: see bench_common.add_timing_argument):

* A mid-size SD1.5-shaped UNet (bench_apply.py's layout with model_channels 96: ≈ 81 M parameters;
  ``--quick``: model_channels 32, ≈ 10 M) and rank-16 kohya LoRA files (alpha 8) written by
  ``harness.lora_factory`` into the harness's ``loras`` folder, on every attention projection,
  ``proj_in``/``proj_out`` and feed-forward layer.
* Sampling: euler / normal sigmas, ``--steps`` steps (default 10), batch 1, latent 64×64 (512 px;
  ``--quick``: 32×32), cfg 5 (cond + uncond: two rows per UNet call), the same seed and sigmas for
  every method. Model-form methods sample with ``comfy.sample.sample_custom``, guiders with
  ``guider.sample``.
* One *run* = build the MODEL / GUIDER with the nodes or the core API, then sample. ComfyUI's model
  management is reset before every run (``unload_all_models``, untimed; ``--keep-loaded``, the default on
  cuda, keeps the model loaded), so a method that patches weights pays for it in every run, as on a fresh
  prompt.

  S       ``LoraSetLoad`` (1st LoRA) → ``LoraSetApply``: one LoRA applied statically (the baseline;
          k×S is the "physical floor" of evaluating k LoRAs separately);
  CM / CU ``LoraSetComposite`` over k LoRAs, strategy merged (sequential passes with swapped weights) /
          unmerged (one batched forward with per-row routing);
  SB      the batching floor (default on cuda, else only with ``--methods``): S's model with its positive and
          negative conditioning each given k times, so that ComfyUI runs the 2k rows CU runs in one UNet call,
          with no adapter work (the result equals S's). CU / SB is what the adapters add to a 2k-row call,
          SB / (k × S) what one 2k-row call costs against k two-row calls; the rows each UNet call saw in the
          warm-up run are printed for SB and CU;
  CH      core hook-group guider (comfyui-internals §4(c)): a ``CFGGuider`` subclass with cond sets
          p_j/n_j each tagged with LoRA j's ``comfy.hooks.create_hook_lora`` group; ``predict_noise``
          loops j: ``calc_cond_batch([p_j, n_j])`` → ``cfg_function``, averaged;
  CR      re-patching per evaluation: a ``CFGGuider`` whose ``predict_noise``, for each LoRA, re-patches
          the weights in place with ``comfy.lora.calculate_weight`` of that LoRA's patches (built with the
          pack's ``nodes.patching.resolve_set``/``model_patch_lists``) from a backup of the original
          weights, runs ``sampling_function``, and restores the originals at the end;
  AM / AU ``AutoLoraGuidance`` (γ 0.5, LoRA branch = the 1st LoRA), strategy merged / unmerged;
  AG / AGM ``AutoLoraGuider`` (cfg_base = cfg_lora = 5, γ 0.5) via ``guider.sample``, strategy unmerged (both
          branches' cond and uncond in one batched call, rows routed by cond) / merged (a call per branch);
  AC      core AutoLoRA guider (internals §4(d) guider form): conds [pos, neg, pos+hook, neg+hook] in
          ONE ``calc_cond_batch``, CFG per branch, blended with γ.

* One warm-up round, then ``--repeats`` rounds (default 4); each round runs every method once, in a
  fixed order that is reversed on every other round (interleaved); medians are reported.
  ``--autolora-only`` runs S and the AutoLoRA methods alone (no Composite); ``--methods`` names the
  methods to run (S always runs), e.g. ``S,SB,CU`` for the decomposition alone. ``--torch-profile`` traces
  one warm run each of S, SB and CU (smallest k) with torch.profiler (on cuda: the device's kernel time
  over the wall time, i.e. whether the run is host-bound).
  Correctness guards on the warm-up outputs (before any timing): CM vs CU, CM vs CH, AG vs AM and AGM vs AG
  within 1e-4 relative (max abs difference / max abs value), else a WARNING line; CR vs CH and AC vs AG
  are printed too.
* Peak memory (unless ``--no-memory``): every method once in a fresh child process (hidden
  ``--child``; Composite at the largest k, ``--mem-steps`` sampler steps, default 2 — the peak is
  reached within the first step; two children at a time, one torch thread each): the child's peak
  RSS minus that of a child that only builds the model and loads the LoRA files (core's state dicts
  and the pack's file cache). In both, the kernel's RSS high-water mark is reset
  (``/proc/self/clear_refs`` ← 5) once the setup is done, since the start-up peak would otherwise
  hide the run's, and the peak is read as ``VmHWM``: ``ru_maxrss`` of an exec'd child also holds the
  high-water mark of the process that spawned it (the kernel folds the pre-exec mm's peak into it),
  i.e. of this large parent, so it reads the same for every child (``ru_maxrss`` is used only where
  ``clear_refs`` is not writable). The children run with a fixed glibc mmap threshold
  (``MALLOC_MMAP_THRESHOLD_``) so freed tensors leave RSS instead of being reused unseen.
* If a Composite target is missed, one merged and one unmerged Composite run (smallest k that
  missed) are profiled with cProfile, likewise an AutoLoRA method that missed (``--profile``:
  always), and the time in ``MergedSwapper.activate`` / ``calculate_weight``, the unmerged hooks,
  the batching and the UNet is printed.
* Time budget: the default run must finish in < 25 min. After timing one bare UNet call, the default
  k-list (2, 3, 5) is reduced (2, 5 → 2, 3 → 2) if the estimate exceeds 23 min, and a NOTE line says
  so; ``--k`` forces a list.

Attention: ``--attention pytorch`` (default) makes ComfyUI use torch SDPA, as on NVIDIA GPUs;
``--attention comfy`` keeps ComfyUI's CPU default (sub-quadratic attention, slower). torch runs on
``--threads`` CPU threads (default 2).
"""
from __future__ import annotations

import argparse
import gc
import json
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
    relative_difference, reset_peak_rss, runs_described, select_device, setup_process, start_sampling_bench,
    time_steady, trace_sampling, unet_dtype)
from harness import comfy_env, lora_factory, tiny_models  # noqa: E402
from harness.node_calls import call_node  # noqa: E402

MODEL_CHANNELS = {"default": 96, "quick": 32}
LATENT = {"default": 64, "quick": 32}
STEPS = {"default": 10, "quick": 4}
REPEATS = {"default": 4, "quick": 2}
KS = {"default": (2, 3, 5), "quick": (2,)}
RANK = 16
ALPHA = 8.0
CFG = 5.0
GAMMA = 0.5
SEED = 1234
SAMPLER, SCHEDULER = "euler", "normal"
MATCH_REL = 1e-4
TARGET_COMPOSITE_OVER_FLOOR = 1.05  # best Composite ≤ 1.05 × (k × S)
TARGET_COMPOSITE_OVER_CORE = 1.0  # Composite / hook-group and Composite / re-patch < 1
TARGET_AUTOLORA_MODEL = 2.05  # AutoLoraGuidance ≤ 2.05 × S
TARGET_AUTOLORA_GUIDER = 2.10  # AutoLoraGuider ≤ 2.10 × S
BUDGET_S = 23 * 60  # the default run must finish in < 25 min (setup included)
K_FALLBACKS = ((2, 3, 5), (2, 5), (2, 3), (2,))
OVERHEAD = 1.2  # run time / bare UNet time (patching, wrappers, CFG, sampler), for the estimate
CHILD_START_S = 30.0  # one memory child's start-up (imports, model, LoRA files), for the estimate

COMPOSITE_METHODS = {  # key → label (run for every k)
    "SB": "SB static, conds ×k (2k rows)",
    "CM": "CM LoraSetComposite merged",
    "CU": "CU LoraSetComposite unmerged",
    "CH": "CH core hook-group guider",
    "CR": "CR re-patch per evaluation",
}
AUTOLORA_METHODS = {
    "AM": "AM AutoLoraGuidance merged",
    "AU": "AU AutoLoraGuidance unmerged",
    "AG": "AG AutoLoraGuider unmerged",
    "AGM": "AGM AutoLoraGuider merged",
    "AC": "AC core AutoLoRA guider",
}
S_LABEL = "S  static LoraSetApply (1 LoRA)"
ALL_METHODS = ("S", *COMPOSITE_METHODS, *AUTOLORA_METHODS)


def lora_name(index: int) -> str:
    return f"bench_composite_r{RANK}_{index}.safetensors"


def lora_names(count: int) -> list[str]:
    return [lora_name(i) for i in range(count)]


def write_loras(model_sd: dict, loras_dir: Path, count: int) -> list[str]:
    targets = lora_targets(model_sd)
    for i in range(count):
        lora = lora_factory.make_lora(model_sd, targets, "kohya", rank=RANK, alpha=ALPHA, seed=500 + i)
        lora.save(loras_dir / lora_name(i))
    return targets


# ------------------------------------------------------------------------------------ core guiders

_CLASSES: dict = {}


def core_guider_classes():
    """The reference guiders built from ComfyUI core only (created once comfy is importable)."""
    if _CLASSES:
        return _CLASSES
    import comfy.hooks
    import comfy.lora
    import comfy.samplers
    import comfy.utils
    import node_helpers

    def negative_type(cond):
        return node_helpers.conditioning_set_values(cond, {"prompt_type": "negative"})

    class HookCompositeGuider(comfy.samplers.CFGGuider):
        """internals §4(c): N cond sets, each tagged with one LoRA's HookGroup; CFG per LoRA, averaged."""

        def __init__(self, model_patcher, hook_groups, positive, negative, cfg):
            super().__init__(model_patcher)
            self.count = len(hook_groups)
            negative = negative_type(negative)
            conds = {}
            for j, group in enumerate(hook_groups):
                conds[f"p{j}"] = comfy.hooks.set_hooks_for_conditioning(positive, group)
                conds[f"n{j}"] = comfy.hooks.set_hooks_for_conditioning(negative, group)
            self.inner_set_conds(conds)
            self.set_cfg(cfg)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (core's signature)
            acc = None
            for j in range(self.count):
                p, n = self.conds[f"p{j}"], self.conds[f"n{j}"]
                out = comfy.samplers.calc_cond_batch(self.inner_model, [p, n], x, timestep, model_options)
                eps = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                                  model_options=model_options, cond=p, uncond=n)
                acc = eps if acc is None else acc + eps
            return acc / self.count

    class RepatchCompositeGuider(comfy.samplers.CFGGuider):
        """Re-patching per evaluation: bake LoRA j in place (calculate_weight from the originals), evaluate."""

        def __init__(self, model_patcher, patch_lists, positive, negative, cfg):
            super().__init__(model_patcher)
            self.patch_lists = patch_lists  # per LoRA: {model key: ComfyUI patch list}
            self.keys = sorted({k for lists in patch_lists for k in lists})
            self.backup: dict | None = None
            self.set_conds(positive, negative)
            self.set_cfg(cfg)

        def _bake(self, lists) -> None:
            model = self.inner_model
            for key in self.keys:
                weight = comfy.utils.get_attr(model, key).data
                weight.copy_(self.backup[key])
                plist = lists.get(key)
                if plist:
                    out = comfy.lora.calculate_weight(plist, weight, key)
                    if out is not weight:
                        weight.copy_(out)

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            model = self.inner_model
            if self.backup is None:  # the originals, once per guider (one copy of the LoRA'd layers)
                self.backup = {k: comfy.utils.get_attr(model, k).detach().clone() for k in self.keys}
            acc = None
            try:
                for lists in self.patch_lists:
                    self._bake(lists)
                    eps = comfy.samplers.sampling_function(model, x, timestep, self.conds.get("negative"),
                                                           self.conds.get("positive"), self.cfg,
                                                           model_options=model_options, seed=seed)
                    acc = eps if acc is None else acc + eps
            finally:
                for key in self.keys:
                    comfy.utils.get_attr(model, key).data.copy_(self.backup[key])
            return acc / len(self.patch_lists)

    class HookAutoLoraGuider(comfy.samplers.CFGGuider):
        """internals §4(d) guider form: [pos, neg, pos+hook, neg+hook] in one calc_cond_batch."""

        def __init__(self, model_patcher, hook_group, positive, negative, cfg, gamma):
            super().__init__(model_patcher)
            negative = negative_type(negative)
            self.inner_set_conds({"positive": positive, "negative": negative,
                                  "pos_l": comfy.hooks.set_hooks_for_conditioning(positive, hook_group),
                                  "neg_l": comfy.hooks.set_hooks_for_conditioning(negative, hook_group)})
            self.set_cfg(cfg)
            self.gamma = gamma

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006
            c = self.conds
            o = comfy.samplers.calc_cond_batch(self.inner_model, [c["positive"], c["negative"], c["pos_l"],
                                                                  c["neg_l"]], x, timestep, model_options)
            base = comfy.samplers.cfg_function(self.inner_model, o[0], o[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=c["positive"], uncond=c["negative"])
            lora = comfy.samplers.cfg_function(self.inner_model, o[2], o[3], self.cfg, x, timestep,
                                               model_options=model_options, cond=c["pos_l"], uncond=c["neg_l"])
            return base + self.gamma * (lora - base)

    _CLASSES.update(hook=HookCompositeGuider, repatch=RepatchCompositeGuider, auto=HookAutoLoraGuider)
    return _CLASSES


# ------------------------------------------------------------------------------------------ methods

class Methods(SamplingMethods):
    """Every method as one full run: build the MODEL/GUIDER, sample, return the latent."""

    def __init__(self, env, model, args, loras_dir: Path):
        super().__init__(env, model, args, loras_dir, sampler=SAMPLER, scheduler=SCHEDULER, seed=SEED)
        self.patching = env.engine("nodes.patching")
        self.rows_seen: dict[tuple[str, int], list[int]] = {}  # (method, k) → rows of each UNet call, first run

    def warm_caches(self, names) -> None:
        for name in names:
            self.lora_sd(name)
        self.warm_pack_cache(names)

    def sample_model(self, model):
        import comfy.sample

        return lambda: comfy.sample.sample_custom(model, self.noise, CFG, self.sampler, self.sigmas, self.positive,
                                                  self.negative, self.latent, disable_pbar=True, seed=SEED)

    # -- the methods: each prepares its MODEL / GUIDER and returns the sampling call --------------
    def static(self):
        (patched, _clip, _report) = call_node("LoraSetApply", model=self.model, lora_set=self.lora_set(lora_names(1)))
        return self.sample_model(patched)

    def static_batched(self, k: int):
        """S's model with each conditioning given k times: ComfyUI batches the 2k rows into one UNet call (what CU
        runs), with no adapter work; the averaged prediction equals S's."""
        import comfy.sample

        (patched, _clip, _report) = call_node("LoraSetApply", model=self.model, lora_set=self.lora_set(lora_names(1)))
        positive = [[t, dict(d)] for _ in range(k) for t, d in self.positive]
        negative = [[t, dict(d)] for _ in range(k) for t, d in self.negative]
        return lambda: comfy.sample.sample_custom(patched, self.noise, CFG, self.sampler, self.sigmas, positive,
                                                  negative, self.latent, disable_pbar=True, seed=SEED)

    def recording_rows(self, cfg: tuple[str, int], sample):
        """``sample``, which on its first call records the rows of every UNet call it makes (in ``rows_seen``)."""
        def run():
            if cfg in self.rows_seen:
                return sample()
            seen = self.rows_seen[cfg] = []

            def record(_module, args, kwargs):
                x = args[0] if args else kwargs.get("x")
                seen.append(int(x.shape[0]))

            handle = self.model.model.diffusion_model.register_forward_pre_hook(record, with_kwargs=True)
            try:
                return sample()
            finally:
                handle.remove()
        return run

    def composite(self, k: int, strategy: str):
        (m, _clip, _report) = call_node("LoraSetComposite", model=self.model, lora_set=self.lora_set(lora_names(k)),
                                        strategy=strategy)
        return self.sample_model(m)

    def hook_composite(self, k: int):
        import comfy.hooks

        groups = [comfy.hooks.create_hook_lora(self.lora_sd(name), 1.0, 1.0) for name in lora_names(k)]
        return self.sample_guider(core_guider_classes()["hook"](self.model, groups, self.positive, self.negative, CFG))

    def repatch_composite(self, k: int):
        resolved = self.patching.resolve_set(self.model, None, self.lora_set(lora_names(k)))
        lists = [self.patching.model_patch_lists(e, p) for e, p in resolved]
        return self.sample_guider(core_guider_classes()["repatch"](self.model, lists, self.positive, self.negative,
                                                                   CFG))

    def autolora_model(self, strategy: str):
        (m, _clip, _report) = call_node("AutoLoraGuidance", model=self.model, lora_set=self.lora_set(lora_names(1)),
                                        gamma=GAMMA, strategy=strategy)
        return self.sample_model(m)

    def autolora_guider(self, strategy: str):
        (guider,) = call_node("AutoLoraGuider", model=self.model, lora_set=self.lora_set(lora_names(1)),
                              positive=self.positive, negative=self.negative, cfg_base=CFG, cfg_lora=CFG, gamma=GAMMA,
                              strategy=strategy)
        return self.sample_guider(guider)

    def core_autolora(self):
        import comfy.hooks

        group = comfy.hooks.create_hook_lora(self.lora_sd(lora_names(1)[0]), 1.0, 1.0)
        return self.sample_guider(core_guider_classes()["auto"](self.model, group, self.positive, self.negative, CFG,
                                                                GAMMA))

    def prepare(self, method: str, k: int = 0):
        """Build a method's MODEL / GUIDER; returns its sampling call."""
        if method == "S":
            return self.static()
        if method == "SB":
            return self.recording_rows((method, k), self.static_batched(k))
        if method == "CM":
            return self.composite(k, "merged")
        if method == "CU":
            return self.recording_rows((method, k), self.composite(k, "unmerged"))
        if method == "CH":
            return self.hook_composite(k)
        if method == "CR":
            return self.repatch_composite(k)
        if method == "AM":
            return self.autolora_model("merged")
        if method == "AU":
            return self.autolora_model("unmerged")
        if method == "AG":
            return self.autolora_guider("unmerged")
        if method == "AGM":
            return self.autolora_guider("merged")
        if method == "AC":
            return self.core_autolora()
        raise ValueError(method)

    def run(self, method: str, k: int = 0):
        """One run: build the method, then sample."""
        return self.prepare(method, k)()

    def timed(self, fn, *a):
        """(wall seconds, output) of ``fn(*a)``; its peak CUDA memory in ``last_peak``."""
        meter, out = self.measure(fn, *a)
        return meter.wall, out


def time_fresh(methods: Methods, configs, args, t_start: float):
    """Rounds of every method (build + sample each time), order reversed every other round; round 0 is the
    warm-up."""
    log = RunLog()
    rounds = 0 if args.memory_only else args.repeats
    for rnd in range(rounds + 1):  # round 0 is the warm-up
        t_round = time.perf_counter()
        order = configs if rnd % 2 == 0 else configs[::-1]
        for cfg in order:
            seconds, out = methods.timed(methods.run, *cfg)
            log.add(cfg, rnd == 0, seconds, out, methods.last_peak)
        if rnd == 0:
            print(f"warm-up round done ({time.perf_counter() - t_start:.0f} s since start)", flush=True)
            check_outputs(args, log.warm_outputs, args.ks)
        else:
            print(f"round {rnd}/{args.repeats} done ({time.perf_counter() - t_start:.0f} s since start)", flush=True)
        if out_of_budget(args, t_start, time.perf_counter() - t_round, rnd):
            break
    return log


def time_one_forward(model, methods: Methods, rows: int = 2) -> float:
    """Seconds of one bare UNet forward with ``rows`` rows (for the ETA)."""
    import torch

    methods.mm.load_models_gpu([model])  # on the device the runs use (a no-op move on the CPU)
    dm = model.model.diffusion_model
    dev = model.load_device
    side = methods.latent.shape[-1]
    dtype = model.model.get_dtype()  # what BaseModel.apply_model casts the inputs to (--dtype)
    x = torch.randn(rows, 4, side, side, generator=torch.Generator().manual_seed(3)).to(dev, dtype)
    t = torch.full((rows,), 500.0, device=dev)
    context = torch.cat([methods.positive[0][0], methods.negative[0][0]] * (rows // 2)).to(dev, dtype)
    with torch.no_grad():
        dm(x, t, context=context)
        with RunMeter(methods.device) as meter:
            dm(x, t, context=context)
    methods.mm.unload_all_models()
    return meter.wall


# ------------------------------------------------------------------------------------------- memory

MEMORY_JOBS = ("baseline", "S", "CM", "CU", "CH", "CR", "AM", "AU", "AG", "AGM", "AC")


def memory_jobs(args) -> tuple[str, ...]:
    return tuple(j for j in MEMORY_JOBS if j in ("baseline", "S") or j in args.methods)


def child_main(args) -> None:
    """One method run in a fresh process (or only the setup, for ``baseline``); prints one JSON line."""
    env = comfy_env.start(models_dir=Path(args.models_dir), quiet=False)
    model = tiny_models.build_unet("sd15", seed=0, config_overrides=model_config(args),
                                   dtype=unet_dtype(args), fan_in=True)
    methods = Methods(env, model, args, Path(args.models_dir) / "loras")
    methods.warm_caches(lora_names(args.mem_k))
    freeze_gc()
    # Start-up (imports, model construction) peaks far above the steady state; reset the kernel's
    # high-water mark (which ru_maxrss reports) so the number reflects the run, not the start-up.
    resettable = _reset_peak_rss()
    if args.child != "baseline":
        methods.run(args.child, args.mem_k)
    result = {"ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "reset": resettable,
              "hwm": _proc_status("VmHWM")}
    print("CHILD_RESULT " + json.dumps(result), flush=True)


def child_env() -> dict:
    """A fixed malloc mmap threshold: every large tensor is its own mapping, returned to the OS when freed.

    Without it glibc raises the threshold dynamically, large freed blocks stay in the heap and later
    allocations reuse them without raising RSS, which hides (or shifts) peaks between methods.
    """
    env = os.environ.copy()
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    return env


def child_command(args, method: str, models_dir: Path) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--mem-k", str(args.mem_k),
           "--models-dir", str(models_dir), "--threads", "1", "--attention", args.attention,
           "--steps", str(args.mem_steps), "--latent", str(args.latent), "--model-channels", str(args.model_channels),
           "--dtype", args.dtype]
    return cmd + (["--quick"] if args.quick else [])


def spawn_child(args, method: str, models_dir: Path) -> int:
    out = subprocess.run(child_command(args, method, models_dir), capture_output=True, text=True, env=child_env())
    for line in out.stdout.splitlines():
        if line.startswith("CHILD_RESULT "):
            result = json.loads(line[len("CHILD_RESULT "):])
            if not result["reset"]:
                print(f"note: child {method} could not reset its peak RSS (/proc/self/clear_refs): its number "
                      "includes the start-up peak")
            # ru_maxrss of an exec'd child also carries the PARENT's high-water mark (the kernel folds the
            # pre-exec mm's peak into the process's maxrss at exec, and subprocess forks/vforks this
            # large process), so every child reported the same number; VmHWM is the child's own mm.
            return result["hwm"] if result["reset"] else result["ru_maxrss"]
    raise RuntimeError(f"child {method} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")


def measure_memory(args, models_dir: Path) -> dict[str, int]:
    """Peak RSS above the model+LoRA-files baseline, bytes, per method; two children at a time (1 thread each)."""
    jobs = memory_jobs(args)
    with ThreadPoolExecutor(max_workers=2) as pool:
        peaks = dict(zip(jobs, pool.map(lambda m: spawn_child(args, m, models_dir), jobs)))
    return {m: peaks[m] - peaks["baseline"] for m in jobs[1:]}


# ------------------------------------------------------------------------------------------ profile

PROFILE_POINTS = (  # (label, file suffix, function name)
    ("whole run: sample_custom / guider.sample", "comfy/samplers.py", "sample"),
    ("load_models_gpu", "comfy/model_management.py", "load_models_gpu"),
    ("SAMPLER_SAMPLE wrapper (everything in the run)", "nodes/runtime/binding.py", "sampler_sample"),
    ("  step probe (probe_events)", "nodes/runtime/step_tracker.py", "probe_events"),
    ("  APPLY_MODEL wrapper (mixture)", "nodes/runtime/binding.py", "apply_model"),
    ("  MergedSwapper.activate (all swaps)", "nodes/runtime/merged_swap.py", "activate"),
    ("    MergedSwapper._set (per layer)", "nodes/runtime/merged_swap.py", "_set"),
    ("    comfy.lora.calculate_weight", "comfy/lora.py", "calculate_weight"),
    ("    stochastic_rounding", "comfy/float.py", "stochastic_rounding"),
    ("  MergedSwapper.restore", "nodes/runtime/merged_swap.py", "restore"),
    ("  unmerged hooks: add_adapters (all layers)", "nodes/runtime/unmerged.py", "add_adapters"),
    ("    add_routed_torch (low-rank kernels)", "kernels/lowrank_routed.py", "add_routed_torch"),
    ("  batching.expand_call", "nodes/runtime/batching.py", "expand_call"),
    ("  batching.fold", "nodes/runtime/batching.py", "fold"),
    ("  core hooks: patch_hooks", "comfy/model_patcher.py", "patch_hooks"),
    ("  calc_cond_batch", "comfy/samplers.py", "calc_cond_batch"),
    ("  UNet forward (UNetModel._forward)", "comfy/ldm/modules/diffusionmodules/openaimodel.py", "_forward"),
)


def profile_run(methods: Methods, method: str, k: int, label: str) -> None:
    stats = profile_one_run(methods, lambda: methods.run(method, k), f"{label} (k = {k})", PROFILE_POINTS)
    print("top 20 by cumulative time:")
    stats.sort_stats("cumulative").print_stats(20)


# -------------------------------------------------------------------------------------------- main

def model_config(args) -> dict:
    return dict(SD15_LAYOUT, model_channels=args.model_channels)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: ≈10 M-parameter model, latent 32×32, 4 steps, k = 2, 2 repeats")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 10; --quick: 4)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up (default 4; --quick: 2)")
    p.add_argument("--k", type=str, default=None, help="comma-separated LoRA counts for Composite (default 2,3,5; "
                                                       "--quick: 2)")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64 = 512 px; --quick: 32)")
    p.add_argument("--model-channels", type=int, default=None, help="UNet model_channels (default 96; --quick: 32)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--attention", choices=("pytorch", "comfy"), default="pytorch",
                   help="pytorch: torch SDPA (ComfyUI's GPU default); comfy: ComfyUI's CPU default (sub-quadratic)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes (always skipped on "
                                                            "cuda, where each run's peak CUDA memory is reported)")
    add_device_arguments(p)
    add_budget_argument(p)
    add_timing_argument(p)
    p.add_argument("--memory-only", action="store_true", help="skip the timings (guards and peak RSS only)")
    p.add_argument("--mem-steps", type=int, default=2, help="sampler steps in the memory children (default 2)")
    p.add_argument("--autolora-only", action="store_true", help="S and the AutoLoRA methods only (no Composite)")
    p.add_argument("--profile", action="store_true", help="always cProfile (default: only methods that miss a target)")
    p.add_argument("--methods", default=None,
                   help="comma-separated methods to run (S always runs): " + ",".join(ALL_METHODS)
                        + " (default: all but SB; on cuda all)")
    p.add_argument("--torch-profile", action="store_true",
                   help="after the timings, trace one warm run each of S, SB and CU (smallest k) with torch.profiler")
    p.add_argument("--child", choices=MEMORY_JOBS, help=argparse.SUPPRESS)
    p.add_argument("--mem-k", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--models-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    mode = "quick" if args.quick else "default"
    args.steps = args.steps or STEPS[mode]
    args.repeats = args.repeats or REPEATS[mode]
    args.ks = tuple(int(v) for v in args.k.split(",")) if args.k else KS[mode]
    if args.methods is None:
        default = [m for m in ALL_METHODS if m != "SB" or args.device == "cuda"]
        args.methods = [m for m in default if not (args.autolora_only and m in COMPOSITE_METHODS)]
    else:
        args.methods = [m.strip().upper() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in args.methods if m not in ALL_METHODS]
        if unknown:
            p.error(f"--methods: unknown {unknown}; choose from {','.join(ALL_METHODS)}")
    args.methods = ["S"] + [m for m in ALL_METHODS if m in args.methods and m != "S"]
    if args.autolora_only or not any(m in COMPOSITE_METHODS for m in args.methods):
        args.ks = ()
    if any(k < 2 for k in args.ks):
        p.error("--k values must be ≥ 2")
    if args.repeats < 1:
        p.error("--repeats must be ≥ 1")
    args.latent = args.latent or LATENT[mode]
    args.model_channels = args.model_channels or MODEL_CHANNELS[mode]
    args.k_given = args.k is not None
    args.mem_k_given = args.mem_k is not None
    args.mem_k = args.mem_k or max(args.ks, default=1)
    select_device(args)
    if args.device == "cuda" and args.memory_only:
        p.error("--memory-only measures peak RSS in child processes: CPU only")
    return args


def forwards_per_round(args, steps: int, ks) -> int:
    """UNet-call equivalents (2 rows each) of one round: S, each Composite method × k, each AutoLoRA method × 2."""
    composite = sum(m in COMPOSITE_METHODS for m in args.methods)
    autolora = sum(m in AUTOLORA_METHODS for m in args.methods)
    return steps * (1 + composite * sum(ks) + 2 * autolora)


def estimate_seconds(args, ks, fwd: float) -> float:
    """Rough wall time of the rest of the run from one bare UNet call's seconds (``fwd``)."""
    rounds = (0 if args.memory_only else args.repeats) + 1
    total = rounds * forwards_per_round(args, args.steps, ks) * fwd * OVERHEAD
    if not args.no_memory:
        total += (len(memory_jobs(args)) * CHILD_START_S / 2
                  + forwards_per_round(args, args.mem_steps, [max(ks, default=0)]) * fwd * OVERHEAD)
    if not args.memory_only:  # the cProfile runs of a missed Composite target (merged + unmerged, smallest k)
        total += 2 * args.steps * min(ks, default=1) * fwd * OVERHEAD * 1.3
    return total


def fit_k_list(args, fwd: float, elapsed: float) -> None:
    """Default run only: drop k values (2,3,5 → 2,5 → 2,3 → 2) until the estimate fits the time budget."""
    if args.k_given or args.quick or not args.ks:
        return
    for ks in K_FALLBACKS:
        if set(ks) <= set(args.ks) and elapsed + estimate_seconds(args, ks, fwd) <= BUDGET_S:
            break
    if elapsed + estimate_seconds(args, ks, fwd) > BUDGET_S:
        print(f"WARNING: even k = {list(ks)} is estimated at {(elapsed + estimate_seconds(args, ks, fwd)) / 60:.0f} "
              f"min, over the {BUDGET_S / 60:.0f}-min budget (a slow or busy machine?)")
    if ks != args.ks:
        print(f"NOTE: k-list reduced from {list(args.ks)} to {list(ks)} so that the run fits the "
              f"{BUDGET_S / 60:.0f}-min budget (estimated from one bare UNet call; force it with --k)")
        args.ks = ks
        if not args.mem_k_given:
            args.mem_k = max(ks)


def check_outputs(args, outputs: dict, ks) -> None:
    """Correctness guards on the warm-up outputs (same seed, sigmas and conds for every method)."""
    abort_on_non_finite(outputs)

    def guard(name, a, b, what):
        if a not in outputs or b not in outputs:
            return
        d = relative_difference(outputs[a], outputs[b])
        verdict = guard_verdict(args, d, MATCH_REL)
        print(f"check {name}: rel. diff {d:.2e} (guard ≤ {MATCH_REL:g}) {verdict}")
        if verdict == "FAILED":
            print(f"WARNING: {name} differ by {d:.2e} relative > {MATCH_REL:g}: {what}")

    def info(name, a, b, note=""):
        if a in outputs and b in outputs:
            print(f"info  {name}: rel. diff {relative_difference(outputs[a], outputs[b]):.2e}{note}")

    for k in ks:
        guard(f"k={k} Composite merged vs unmerged", ("CM", k), ("CU", k), "the two strategies do not compute the same")
        guard(f"k={k} Composite merged vs core hook-group guider", ("CM", k), ("CH", k),
              "the timings do not compare the same computation")
        info(f"k={k} re-patch guider vs hook-group guider", ("CR", k), ("CH", k))
        info(f"k={k} Composite vs S", ("CM", k), ("S", 0), " (must be large: Composite is not one LoRA)")
        info(f"k={k} S with conds ×k vs S", ("SB", k), ("S", 0), " (the same prediction averaged k times: small)")
    guard("AutoLoraGuidance merged vs AutoLoraGuider (equal cfg)", ("AM", 0), ("AG", 0),
          "the model and guider forms disagree")
    guard("AutoLoraGuider unmerged vs merged", ("AG", 0), ("AGM", 0), "the guider's two strategies disagree")
    info("AutoLoraGuidance unmerged vs merged", ("AU", 0), ("AM", 0))
    info("core AutoLoRA guider vs AutoLoraGuider", ("AC", 0), ("AG", 0))
    info("AutoLoraGuidance vs S", ("AM", 0), ("S", 0), " (must be large: γ = 0.5 is not the LoRA model)")


def print_time_tables(args, times: dict) -> list[tuple[str, int]]:
    """The Composite and AutoLoRA tables; returns the methods that missed a target (to profile)."""
    med = {cfg: statistics.median(v) for cfg, v in times.items()}
    s = med[("S", 0)]
    missed: list[tuple[str, int]] = []
    print()
    print(f"Results: median of {args.repeats} timed runs (after 1 warm-up) per method, seconds per run "
          f"({runs_described(args)})")
    print(f"{S_LABEL}: median {s:.3f} s (min {min(times[('S', 0)]):.3f})")

    print()
    print("LoRA Composite: not run (--autolora-only)" if not args.ks else
          f"LoRA Composite — floor = k × S; targets: best Composite ≤ {TARGET_COMPOSITE_OVER_FLOOR:.2f} × floor, "
          f"best Composite / CH < 1, best Composite / CR < 1")
    widths = (31, 8, 8, 9, 9, 9, 9)
    for k in args.ks:
        floor = k * s
        print()
        print(f"k = {k}: floor k×S = {floor:.3f} s")
        print(fmt_row(("method", "median", "min", "/ floor", "/ CH", "/ CR", "per LoRA"), widths))
        ch, cr = med.get(("CH", k)), med.get(("CR", k))

        def over(v, ref):
            return "—" if ref is None else f"{v / ref:.3f}"

        for m, label in COMPOSITE_METHODS.items():
            if (m, k) not in med:
                continue
            v = med[(m, k)]
            print(fmt_row((label, f"{v:.3f}", f"{min(times[(m, k)]):.3f}", f"{v / floor:.3f}", over(v, ch),
                           over(v, cr), f"{v / k:.3f}"), widths))
        if ("SB", k) in med and ("CU", k) in med:
            sb = med[("SB", k)]
            print(f"  decomposition: CU / SB = {med[('CU', k)] / sb:.3f} (what the adapters add to a {2 * k}-row "
                  f"call); SB / floor = {sb / floor:.3f} (one {2 * k}-row call against {k} two-row calls, no "
                  "LoRA work)")
        strategies = [m for m in ("CM", "CU") if (m, k) in med]
        if not strategies:
            continue
        best_m = min(strategies, key=lambda m: med[(m, k)])
        best = med[(best_m, k)]
        ok_floor = best / floor <= TARGET_COMPOSITE_OVER_FLOOR
        ok_ch = ch is None or best / ch < TARGET_COMPOSITE_OVER_CORE
        ok_cr = cr is None or best / cr < TARGET_COMPOSITE_OVER_CORE
        verdicts = [f"/ floor = {best / floor:.3f} (target ≤ {TARGET_COMPOSITE_OVER_FLOOR:.2f}) "
                    f"{'OK' if ok_floor else 'MISSED'}"]
        verdicts += [] if ch is None else [f"/ CH = {best / ch:.3f} (< 1) {'OK' if ok_ch else 'MISSED'}"]
        verdicts += [] if cr is None else [f"/ CR = {best / cr:.3f} (< 1) {'OK' if ok_cr else 'MISSED'}"]
        print(f"  best Composite = {best_m} ({'merged' if best_m == 'CM' else 'unmerged'}): " + "; ".join(verdicts))
        if not (ok_floor and ok_ch and ok_cr):
            missed += [(m, k) for m in strategies]

    if not any(m in AUTOLORA_METHODS for m in args.methods):
        return missed
    print()
    print(f"AutoLoRA (γ = {GAMMA:g}, 1 LoRA) vs plain LoRA sampling S = {s:.3f} s; targets: AutoLoraGuidance ≤ "
          f"{TARGET_AUTOLORA_MODEL:.2f} × S, AutoLoraGuider ≤ {TARGET_AUTOLORA_GUIDER:.2f} × S")
    aw = (31, 8, 8, 8, 9, 9, 8)
    print(fmt_row(("method", "median", "min", "/ S", "target", "verdict", "/ AC"), aw))
    ac = med.get(("AC", 0))
    for m, label in AUTOLORA_METHODS.items():
        if (m, 0) not in med:
            continue
        v = med[(m, 0)]
        target = {"AM": TARGET_AUTOLORA_MODEL, "AU": TARGET_AUTOLORA_MODEL, "AG": TARGET_AUTOLORA_GUIDER,
                  "AGM": TARGET_AUTOLORA_GUIDER}.get(m)
        verdict = "" if target is None else ("OK" if v / s <= target else "MISSED")
        print(fmt_row((label, f"{v:.3f}", f"{min(times[(m, 0)]):.3f}", f"{v / s:.3f}",
                       f"≤ {target:.2f}" if target else "(core)", verdict, "—" if ac is None else f"{v / ac:.3f}"),
                      aw))
    for form, pair, target in (("AutoLoraGuidance", ("AM", "AU"), TARGET_AUTOLORA_MODEL),
                               ("AutoLoraGuider", ("AG", "AGM"), TARGET_AUTOLORA_GUIDER)):
        ran = [m for m in pair if (m, 0) in med]
        if not ran:
            continue
        best = min(ran, key=lambda m: med[(m, 0)])
        if med[(best, 0)] / s > target:
            missed.append((best, 0))
        print(f"  {form} target judged on the faster strategy run ({best}): {med[(best, 0)] / s:.3f} × S")

    return missed


def print_cuda_peaks(configs, peaks: dict) -> None:
    """Peak CUDA memory per method (max over all rounds): absolute and above S."""
    labels = {"S": S_LABEL, **COMPOSITE_METHODS, **AUTOLORA_METHODS}
    s = peaks[("S", 0)]
    print()
    print("Peak CUDA memory allocated during a run (torch.cuda.max_memory_allocated, whole process incl. the loaded "
          "model, max over all rounds), MiB:")
    widths = (31, 6, 10, 10)
    print(fmt_row(("method", "k", "peak", "- S"), widths))
    for cfg in configs:
        m, k = cfg
        v = peaks[cfg]
        print(fmt_row((labels[m], k or "", f"{v / 2**20:.1f}", f"{(v - s) / 2**20:+.1f}"), widths))


def main() -> None:
    args = parse_args()
    setup_process(args.threads, args.attention)
    if args.child:
        child_main(args)
        return

    t_start = time.perf_counter()
    env, models_dir = start_sampling_bench(args, "LoRA Composite / AutoLoRA benchmark", "composite")
    model = tiny_models.build_unet("sd15", seed=0, config_overrides=model_config(args),
                                   dtype=unet_dtype(args), fan_in=True)
    n_params = sum(t.numel() for t in model.model.diffusion_model.parameters())
    model_sd = model.model.state_dict()
    n_loras = max(args.ks, default=1)
    targets = write_loras(model_sd, models_dir / "loras", n_loras)
    target_params = sum(model_sd[k].numel() for k in targets)
    itemsize = unet_dtype(args).itemsize
    largest_layer = max(model_sd[k].numel() for k in targets) * itemsize
    del model_sd
    lora_bytes = (models_dir / "loras" / lora_name(0)).stat().st_size
    print(f"model: SD1.5-shaped UNet, model_channels {args.model_channels}, {n_params / 1e6:.1f} M parameters; "
          f"LoRA targets: {len(targets)} layers ({target_params / 1e6:.1f} M parameters = "
          f"{target_params * itemsize / 2**20:.0f} MiB {args.dtype} per patched copy; largest layer {largest_layer / 2**20:.1f} MiB)")
    print(f"LoRAs: {n_loras} kohya files, rank {RANK}, alpha {ALPHA:g}, {lora_bytes / 2**20:.1f} MiB each "
          f"(attention q/k/v/out, proj_in/out, ff)")
    print(f"sampling: {SAMPLER}/{SCHEDULER}, {args.steps} steps, batch 1, latent {args.latent}×{args.latent} "
          f"({args.latent * 8} px), cfg {CFG:g} (cond+uncond = 2 rows per UNet call), seed {SEED}; "
          f"Composite k ∈ {list(args.ks)}; AutoLoRA γ = {GAMMA:g} with the 1st LoRA")

    methods = Methods(env, model, args, models_dir / "loras")
    methods.warm_caches(lora_names(n_loras))
    fwd = time_one_forward(model, methods)
    fit_k_list(args, fwd, time.perf_counter() - t_start)
    configs = ([("S", 0)] + [(m, k) for k in args.ks for m in COMPOSITE_METHODS if m in args.methods]
               + [(m, 0) for m in AUTOLORA_METHODS if m in args.methods])
    forwards = forwards_per_round(args, args.steps, args.ks)
    eta = estimate_seconds(args, args.ks, fwd)
    print(f"one bare UNet call (2 rows) took {fwd:.2f} s; {len(configs)} runs per round ≈ {forwards} UNet-call "
          f"equivalents; {0 if args.memory_only else args.repeats} timed rounds + 1 warm-up"
          f"{'' if args.no_memory else ' + memory children'}: estimated {eta / 60:.1f} min from here", flush=True)

    freeze_gc()
    if args.timing == "steady" and not args.memory_only:
        log = time_steady(methods, configs, args, t_start, lambda cfg: methods.prepare(*cfg))
        check_outputs(args, log.warm_outputs, args.ks)
    else:
        log = time_fresh(methods, configs, args, t_start)
    times, cuda_peaks = log.times, log.cuda_peaks
    for (m, k), rows in sorted(methods.rows_seen.items()):
        counts = ", ".join(f"{rows.count(n)} × {n}" for n in sorted(set(rows), reverse=True))
        print(f"rows per UNet call, {m} k={k} (warm-up run): {counts or 'no call'}"
              + ("" if set(rows) == {2 * k} else f"  NOTE: not one {2 * k}-row call per step (split for memory?)"))
    if args.torch_profile:
        k0 = min(args.ks, default=0)
        for m, k in (("S", 0), ("SB", k0), ("CU", k0), ("AU", 0), ("AG", 0)):
            if m in args.methods and (k or m in ("S", "AU", "AG")):
                label = {**COMPOSITE_METHODS, **AUTOLORA_METHODS}.get(m, S_LABEL)
                trace_sampling(methods, methods.prepare(m, k), label + (f" k={k}" if k else ""))
    methods.mm.unload_all_models()

    memory = {} if args.no_memory else measure_memory(args, models_dir)

    missed = [] if args.memory_only else print_time_tables(args, times)
    if memory:
        s_mem = memory["S"]
        one_copy = target_params * itemsize
        k = args.mem_k
        bound_comp = s_mem + k * lora_bytes + largest_layer
        bound_auto = s_mem + lora_bytes + largest_layer
        print()
        print(f"Peak RSS above the model + LoRA-files baseline, MiB (fresh child process per method, VmHWM after a "
              f"reset, "
              f"{args.mem_steps} steps; Composite k = {k}). One patched copy of the LoRA'd layers = "
              f"{one_copy / 2**20:.0f} MiB.")
        print(f"target: no k copies of the weights — at most S + LoRA tensors ({k} × {lora_bytes / 2**20:.1f} MiB "
              f"for Composite, 1× for AutoLoRA) + one layer ({largest_layer / 2**20:.1f} MiB): Composite ≤ "
              f"{bound_comp / 2**20:.0f} MiB, AutoLoRA ≤ {bound_auto / 2**20:.0f} MiB")
        mw = (31, 9, 10, 9, 11, 8)
        print(fmt_row(("method", "peak", "- S", "/ S", "- S copies", "verdict"), mw))
        labels = {"S": S_LABEL, **COMPOSITE_METHODS, **AUTOLORA_METHODS}
        for m in memory_jobs(args)[1:]:
            v = memory[m]
            bound = bound_comp if m in COMPOSITE_METHODS else bound_auto
            verdict = "" if m in ("S", "CH", "CR", "AC") else ("OK" if v <= bound else "OVER")
            print(fmt_row((labels[m], f"{v / 2**20:.1f}", f"{(v - s_mem) / 2**20:+.1f}", f"{v / s_mem:.2f}"
                           if s_mem > 0 else "n/a", f"{(v - s_mem) / one_copy:+.2f}", verdict), mw))
        print("  (- S copies = (peak − S) / one patched copy; the unmerged strategies also hold k× the "
              "activations of one batch)")

    if cuda_peaks:
        print_cuda_peaks(configs, cuda_peaks)

    print()
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")
    missed_ks = [k for m, k in missed if m in COMPOSITE_METHODS]
    to_profile = [(m, min(missed_ks)) for m in ("CM", "CU") if m in args.methods] if missed_ks else []  # smallest k
    to_profile += [(m, k) for m, k in missed if m not in COMPOSITE_METHODS]
    if args.profile and not to_profile:
        to_profile = [(m, max(args.ks)) for m in ("CM", "CU") if args.ks and m in args.methods]
        to_profile += [(m, 0) for m in ("AM", "AG") if m in args.methods]
    if to_profile:
        print("profiling: " + ", ".join(f"{m} k={k}" if k else m for m, k in to_profile)
              + (" (missed a target)" if missed else ""))
        labels = {"S": S_LABEL, **COMPOSITE_METHODS, **AUTOLORA_METHODS}
        for m, k in to_profile:
            profile_run(methods, m, k, labels[m])


def _reset_peak_rss() -> bool:
    gc.collect()  # freed tensors leave RSS before the counter restarts
    return reset_peak_rss()


if __name__ == "__main__":
    main()
