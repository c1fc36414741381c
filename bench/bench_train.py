#!/usr/bin/env python3
"""Benchmark: ``LoraTrain`` training steps/second against core ``TrainLoraNode`` (same rank, batch, steps).

Usage::

    python bench/bench_train.py [--channels 96] [--latent 32] [--steps 3] [--rounds 3] [--rank 8] [--batch 1]
                                [--quick] [--threads 1] [--gradient-checkpointing]

What is measured (one process, real ComfyUI from ``tests/harness/comfy_env``):

* A mid-size SD1.5-shaped UNet (bench_apply's layout: 4 levels, 2 res blocks each, attention on the first
  three levels, context 768) with ``--channels`` model channels (96 ≈ 78 M parameters; ``--quick``: 32 ≈
  9 M), built under ``torch.inference_mode`` like every model ComfyUI loads in a graph, and a one-layer
  CLIP-L-shaped text encoder (width 768) to encode the prompt. 4 random training latents of
  ``--latent``² (32 → 256 px).
* Methods, each a full node call, run under ``torch.inference_mode`` as ComfyUI's executor does:

  - ``core``: core ``TrainLoraNode`` (LoRA algorithm, MSE, AdamW, fp32 training and LoRA dtypes on the
    CPU / bf16 on CUDA). It adapts every Linear/Conv weight and adds bias/norm diffs — it has no choice
    of targets;
  - ``ours-all``: ``LoraTrain`` with targets ``all linear+conv (like core)`` (the same weight layers);
  - ``ours-attn``: ``LoraTrain`` with targets ``attention`` (what DreamBooth-LoRA trains).

* Steps/second are *marginal*: each method runs with 1 step and with 1 + ``--steps`` steps, and the
  rate is ``steps / (t(1 + steps) − t(1))``, so per-call set-up (adapter creation, model loading,
  encoding) cancels. Rounds interleave the methods, alternating their order; medians are reported
  with the ratio ours/core (> 1 = ours faster; target ≥ 1.0), and whole-call times are shown too.
* Peak memory per call (1 + ``--steps`` steps): on CUDA ``max_memory_allocated`` over the call, in this
  process; on the CPU one fresh child process per method (after the timings): it builds the same model,
  resets the kernel's peak-RSS counter (``/proc/self/clear_refs`` ← 5) and reports ``VmHWM`` after the
  call minus RSS before it.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))  # the `harness` package

from bench_common import SD15_LAYOUT, RunMeter, proc_status, reset_peak_rss as _reset_peak_rss  # noqa: E402
from harness import comfy_env, tiny_models  # noqa: E402

METHODS = ("core", "ours-all", "ours-attn")
PROMPT = "a photo of sks dog"


class Bench:
    def __init__(self, env, args):
        import comfy.model_management as mm
        import comfy.sd
        import comfy.sd1_clip
        import comfy.supported_models_base
        import nodes
        import torch

        self.torch, self.mm, self.args = torch, mm, args
        config = dict(SD15_LAYOUT, model_channels=args.channels)
        with torch.inference_mode():
            self.model = tiny_models.build_unet("sd15", seed=0, config_overrides=config)
            self.clip = comfy.sd.CLIP(
                target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
                model_options={"clip_l_model_config": {"hidden_size": 768, "intermediate_size": 512,
                                                       "num_attention_heads": 12, "num_hidden_layers": 1,
                                                       "projection_dim": 768}})
            tiny_models.init_weights_(self.clip.cond_stage_model, 1, scale=0.02)
            self.positive = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(PROMPT))
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(4, 4, args.latent, args.latent, generator=g)
        self.n_params = sum(p.numel() for p in self.model.model.diffusion_model.parameters())
        self.core_cls = nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
        self.ours_cls = nodes.NODE_CLASS_MAPPINGS["LoraTrain"]
        self.cuda = self.model.load_device.type == "cuda"
        self.dtype = "bf16" if self.cuda else "fp32"

    def core(self, steps: int):
        args = dict(model=self.model, latents={"samples": self.latents}, positive=self.positive,
                    batch_size=self.args.batch, steps=steps, grad_accumulation_steps=1, learning_rate=1e-4,
                    rank=self.args.rank, optimizer="AdamW", loss_function="MSE", seed=0, training_dtype=self.dtype,
                    lora_dtype=self.dtype, algorithm="LoRA", gradient_checkpointing=self.args.gradient_checkpointing,
                    existing_lora="[None]")
        if hasattr(self.core_cls, "define_schema"):  # V3 (0.9.2): list inputs
            args["bucket_mode"] = False
            return self.core_cls.execute(**{k: [v] for k, v in args.items()})
        return self.core_cls().train(**args)

    def ours(self, steps: int, targets: str):
        return self.ours_cls().train(
            model=self.model, clip=self.clip, instance_prompt=PROMPT, identifier="sks",
            parameterisation="standard LoRA", targets=targets, rank=self.args.rank, alpha=0.0, steps=steps,
            learning_rate=1e-4, batch_size=self.args.batch, optimizer="AdamW", lambda_prior=0.0, seed=0,
            gradient_checkpointing=self.args.gradient_checkpointing, training_dtype="auto" if self.cuda else "fp32",
            resolution=0, checkpoint_every=0, checkpoint_prefix="bench/train", latents={"samples": self.latents})

    def call(self, method: str, steps: int) -> tuple[float, int | None]:
        import gc

        torch, mm = self.torch, self.mm
        gc.collect()
        mm.unload_all_models()
        if self.cuda:
            base = torch.cuda.memory_allocated()
        else:
            resettable = _reset_peak_rss()
            base = _proc_status("VmRSS")
        with RunMeter("cuda" if self.cuda else "cpu") as meter, torch.inference_mode():
            if method == "core":
                out = self.core(steps)
            else:
                out = self.ours(steps, "all linear+conv (like core)" if method == "ours-all" else "attention")
        seconds = meter.wall
        if self.cuda:
            peak = meter.peak - base
        else:
            hwm = _proc_status("VmHWM")
            peak = hwm - base if (resettable and hwm is not None and base is not None) else None
            peak = peak if self.args.child else None  # in a long-lived process RSS only tells the first call
        del out
        mm.unload_all_models()
        return seconds, peak


def run(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="lora-composer-bench-train-"))
    try:
        env = comfy_env.start(models_dir=work / "models", quiet=True)
        import comfy.utils
        import torch

        comfy.utils.PROGRESS_BAR_ENABLED = False
        bench = Bench(env, args)
        device = torch.cuda.get_device_name() if bench.cuda else f"CPU, {torch.get_num_threads()} thread(s)"
        print(f"ComfyUI: {env.describe()}")
        print(f"Python {platform.python_version()}, torch {torch.__version__}, {device}")
        print(f"UNet: {bench.n_params / 1e6:.1f} M parameters (model_channels {args.channels}), latents "
              f"{args.latent}×{args.latent}, rank {args.rank}, batch {args.batch}, {args.steps} measured steps, "
              f"{args.rounds} rounds, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
              f"{bench.dtype}")
        for method in METHODS:  # warm-up (first-call costs: kernels, allocator, imports)
            bench.call(method, 1)
        rates: dict[str, list[float]] = {m: [] for m in METHODS}
        whole: dict[str, list[float]] = {m: [] for m in METHODS}
        peaks: dict[str, list[int]] = {m: [] for m in METHODS}
        for r in range(args.rounds):
            order = METHODS if r % 2 == 0 else tuple(reversed(METHODS))
            for method in order:
                t1, _ = bench.call(method, 1)
                tn, peak = bench.call(method, 1 + args.steps)
                rates[method].append(args.steps / max(tn - t1, 1e-9))
                whole[method].append(tn)
                if peak is not None:
                    peaks[method].append(peak)
            print(f"  round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.3f} steps/s" for m in METHODS))
        med = {m: statistics.median(rates[m]) for m in METHODS}
        if not bench.cuda:  # peak RSS in fresh processes (see the module docstring)
            for m in METHODS:
                peak = child_peak(args, m)
                peaks[m] = [peak] if peak is not None else []
        memory = "peak CUDA memory (median)" if bench.cuda else "peak RSS increase (fresh process)"
        print(f"\nmethod      steps/s (median, marginal)   whole call with 1+steps (median s)   {memory}")
        for m in METHODS:
            mem = f"{statistics.median(peaks[m]) / 2**20:.0f} MiB" if peaks[m] else "n/a"
            print(f"{m:<11} {med[m]:>10.3f}                  {statistics.median(whole[m]):>10.2f}"
                  f"                       {mem}")
        print("\nratios ours/core (steps/s; ≥ 1.0 = not slower; target ≥ 1.0):")
        for m in METHODS[1:]:
            per_round = [a / b for a, b in zip(rates[m], rates["core"])]
            print(f"  {m:<10} median-of-rates {med[m] / med['core']:.2f}×   median per-round "
                  f"{statistics.median(per_round):.2f}×   (same layers as core: {'yes' if m == 'ours-all' else 'no'})")
        if peaks["core"] and peaks["ours-all"]:
            print("peak memory ours/core: " + ", ".join(
                f"{m} {statistics.median(peaks[m]) / max(1, statistics.median(peaks['core'])):.2f}×"
                for m in METHODS[1:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def child_peak(args, method: str) -> int | None:
    cmd = [sys.executable, __file__, "--child", method, "--channels", str(args.channels), "--latent",
           str(args.latent), "--steps", str(args.steps), "--rank", str(args.rank), "--batch", str(args.batch),
           "--threads", str(args.threads)] + (["--gradient-checkpointing"] if args.gradient_checkpointing else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("CHILD "):
            return json.loads(line[6:])["peak"]
    print(f"  (memory child for {method} failed: {out.stderr.strip().splitlines()[-1:]})")
    return None


def child_main(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="lora-composer-bench-train-"))
    try:
        env = comfy_env.start(models_dir=work / "models", quiet=True)
        import comfy.utils

        comfy.utils.PROGRESS_BAR_ENABLED = False
        bench = Bench(env, args)
        _, peak = bench.call(args.child, 1 + args.steps)
        print("CHILD " + json.dumps({"peak": peak}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, default=96, help="UNet model channels (96 ≈ 78 M parameters)")
    p.add_argument("--latent", type=int, default=32, help="latent side (32 → 256 px images)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per call (beyond the first)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quick", action="store_true", help="≈9 M-parameter UNet, 16×16 latents (smoke test)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.channels, args.latent = 32, 16
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        child_main(args)
        return
    run(args)


def _proc_status(field: str) -> int | None:
    """``bench_common.proc_status``, or None where /proc is unreadable (the memory column then says n/a)."""
    try:
        return proc_status(field)
    except (OSError, KeyError):
        return None


if __name__ == "__main__":
    main()
