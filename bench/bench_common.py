"""What every benchmark script shares: the SD1.5-shaped UNet layout, the LoRA target layers, the Linux
counters the peak-memory children read, table and GC helpers, and for the sampling benchmarks the device /
timing options (``--device``, ``--keep-loaded``, ``--timing``, ``--budget-s``) with the clocks and loops behind
them and the common part of their method sets (``SamplingMethods``).

Each ``bench_*.py`` runs as a script, so its folder is first on ``sys.path`` and ``import bench_common`` works.
"""
from __future__ import annotations

import gc
import logging
import sys
from pathlib import Path

# SD1.5 layout (4 levels, 2 res blocks each, attention on the first 3 levels, conv proj_in/out), only narrower:
# comfy's UNetModel pops one transformer_depth entry per input res block and one transformer_depth_output entry
# per output block, exactly like the real SD1.5 config.
SD15_LAYOUT = {"channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
               "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
               "transformer_depth_middle": 1, "context_dim": 768, "image_size": 64}

# LoRA targets: every attention projection, proj_in/proj_out and the feed-forward layers.
TARGET_MARKERS = (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v.", ".attn1.to_out.0.",
                  ".attn2.to_q.", ".attn2.to_k.", ".attn2.to_v.", ".attn2.to_out.0.",
                  ".proj_in.", ".proj_out.", ".ff.net.0.proj.", ".ff.net.2.")


def proc_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes; KeyError if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM; ru_maxrss is not reset) where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- device

def add_device_arguments(parser) -> None:
    """``--device`` and ``--keep-loaded``, shared by the sampling benchmarks."""
    import argparse

    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu (default) or cuda (ComfyUI's own GPU choice; sets LORA_COMPOSER_DEVICE). On cuda "
                             "the clocks wait for the GPU and each run's peak CUDA memory is reported")
    parser.add_argument("--keep-loaded", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the model loaded between runs (default: on cuda, where uploading the whole model "
                             "in every run would dominate it, as ComfyUI keeps it loaded between prompts; on the CPU "
                             "every run starts from an unloaded model)")
    parser.add_argument("--exact", action="store_true",
                        help="cuda: true fp32 everywhere (TF32 off for convolutions and matmuls, ComfyUI's LoRA "
                             "patches computed in fp32), so that the 1e-4 correctness guards apply there as on the "
                             "CPU. Without it the GPU keeps PyTorch's and ComfyUI's defaults, whose roundings make "
                             "merged and unmerged strategies differ by more; the guards then only report")
    parser.add_argument("--dtype", choices=tuple(UNET_DTYPES), default="fp32",
                        help="the UNet's weight and compute dtype (default fp32). ComfyUI runs an SD1.5 checkpoint in "
                             "fp16 on most GPUs, so fp16 there is what a user's run costs; the 1e-4 guards then only "
                             "report (a half-precision merged W + ΔW rounds differently from W plus a LoRA path)")


UNET_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def unet_dtype(args):
    """``--dtype`` as a torch dtype (fp32 where a script has no such option)."""
    import torch

    return getattr(torch, UNET_DTYPES[getattr(args, "dtype", "fp32")])


def select_device(args) -> None:
    """Before ComfyUI is imported: tell the harness which device to let ComfyUI use, and settle the options
    that depend on it (peak RSS says nothing about GPU memory: on cuda the runs record CUDA peaks instead)."""
    import os

    os.environ["LORA_COMPOSER_DEVICE"] = args.device
    if args.device == "cuda":
        args.no_memory = True
    if getattr(args, "timing", "fresh") == "steady":
        if args.keep_loaded is False:
            raise SystemExit("--timing steady samples the same loaded model repeatedly: drop --no-keep-loaded")
        args.keep_loaded = True
    if args.keep_loaded is None:
        args.keep_loaded = args.device == "cuda"


def runs_described(args) -> str:
    """What one timed run covers, for the results header."""
    if args.timing == "steady":
        return (f"sample {args.steps} steps with the MODEL/GUIDER built once beforehand (untimed), model kept loaded, "
                "runs of one method back to back")
    if args.keep_loaded:
        loaded = ("model kept loaded between runs: a run also pays for un-patching the weights the run before left "
                  "patched, as the next prompt does in ComfyUI")
    else:
        loaded = "model unloaded before each run, untimed"
    return f"build MODEL/GUIDER + sample {args.steps} steps; {loaded}"


def device_description(args) -> str:
    """The device and whether the model stays loaded between runs, for the header line."""
    import torch

    device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if args.device == "cuda" else "CPU"
    return f"{device}; model {'kept loaded between runs' if args.keep_loaded else 'unloaded before every run'}"


def lora_targets(model_sd: dict) -> list[str]:
    """The UNet weights every benchmark LoRA patches (``TARGET_MARKERS``)."""
    from harness import lora_factory  # the scripts put tests/ on sys.path before importing this module

    return [k for k in model_sd if k.startswith(lora_factory.DIFFUSION) and k.endswith(".weight")
            and any(m in k for m in TARGET_MARKERS)]


def freeze_gc() -> None:
    """Move ComfyUI's start-up objects (~0.5 M) out of the collector's reach (``gc.freeze``).

    Each run is preceded by ``gc.collect()`` so that a previous run's garbage never lands in a timed region; with
    everything frozen that costs milliseconds instead of ~0.4 s, for every method alike.
    """
    gc.collect()
    gc.freeze()


def fmt_row(cells, widths) -> str:
    """One table row: the first cell left-aligned, the others right-aligned."""
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def relative_difference(a, b) -> float:
    """max |a − b| / max |b| (the correctness guards' measure)."""
    return (a - b).abs().max().item() / max(b.abs().max().item(), 1e-30)


def abort_on_non_finite(outputs: dict) -> None:
    """Stop the benchmark when a method's warm-up output holds NaN / inf: its timings would compare runs nobody
    would use, and the correctness guards could not hold (an fp16 model whose activations overflow did that)."""
    bad = [cfg for cfg, out in outputs.items() if not out.isfinite().all()]
    if bad:
        raise SystemExit(f"ERROR: non-finite outputs from {', '.join(map(str, bad))}: no timing reported (a model "
                         "or LoRA that overflows this dtype is not a benchmark)")


class RunMeter:
    """Wall and process-CPU clocks around one run; on CUDA they wait for the GPU at both ends, and the run's
    peak of ``torch.cuda.max_memory_allocated`` (whole process, model included) is recorded as well. ``host``: the
    wall seconds until the block returned, before waiting for the GPU (the host's share of a GPU run)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.peak: int | None = None

    def __enter__(self):
        import time

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        import time

        import torch

        self.host = time.perf_counter() - self._t0
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0


class SamplingMethods:
    """The shared part of the sampling benchmarks' method sets: fixed noise, sigmas, random text conditioning and
    latent; core's LoRA state dicts loaded once (as core's loader nodes keep them); pack LoRA sets; guider sampling
    calls; and ``measure``, one run between the clocks with the model unloaded first (untimed) unless kept."""

    def __init__(self, env, model, args, loras_dir: Path, *, sampler: str, scheduler: str, seed: int):
        import comfy.model_management as mm
        import comfy.sample
        import comfy.samplers
        import torch

        self.env, self.mm, self.model, self.loras_dir = env, mm, model, loras_dir
        self.steps, self.device, self.keep_loaded = args.steps, args.device, args.keep_loaded
        self.seed = seed
        self.last_peak: int | None = None
        self.ms = model.get_model_object("model_sampling")
        self.sigmas = comfy.samplers.calculate_sigmas(self.ms, scheduler, self.steps)
        self.sampler = comfy.samplers.sampler_object(sampler)
        self.latent = torch.zeros(1, 4, args.latent, args.latent)
        self.noise = comfy.sample.prepare_noise(self.latent, seed)
        g = torch.Generator().manual_seed(7)
        context_dim = SD15_LAYOUT["context_dim"]
        self.positive = [[torch.randn(1, 77, context_dim, generator=g), {}]]
        self.negative = [[torch.randn(1, 77, context_dim, generator=g) * 0.5, {}]]
        self._lora_sd: dict[str, dict] = {}

    def lora_sd(self, name: str) -> dict:
        """Core's LoRA state dict, loaded once and kept (as core's LoraLoader/CreateHookLora nodes keep it)."""
        import comfy.utils

        if name not in self._lora_sd:
            self._lora_sd[name] = comfy.utils.load_torch_file(str(self.loras_dir / name), safe_load=True)
        return self._lora_sd[name]

    @staticmethod
    def lora_set(names):
        """A pack ``LORA_SET`` of these files (strength 1), through ``LoraSetLoad``."""
        from harness.node_calls import load_set

        return load_set(names)

    def warm_pack_cache(self, names) -> None:
        """Read the files into the pack's cache (a loaded prompt keeps them too)."""
        for entry in self.lora_set(names):
            entry.tensors()

    def sample_guider(self, guider):
        """The sampling call of a built GUIDER (noise, latent, sigmas and seed of this benchmark)."""
        def sample():
            out = guider.sample(self.noise, self.latent, self.sampler, self.sigmas, denoise_mask=None, callback=None,
                                disable_pbar=True, seed=self.seed)
            return out.to(self.mm.intermediate_device())
        return sample

    def measure(self, fn, *a):
        """(``RunMeter``, output) of ``fn(*a)``; its peak CUDA memory also in ``last_peak``."""
        if not self.keep_loaded:
            self.mm.unload_all_models()  # every run starts from an unloaded model (untimed)
        gc.collect()
        with RunMeter(self.device) as meter:
            out = fn(*a)
        self.last_peak = meter.peak
        return meter, out


def trace_sampling(methods: "SamplingMethods", sample, title: str) -> None:
    """torch.profiler over one warm run of ``sample`` (a method's sampling call): the top operators by host (self
    CPU) time and, on cuda, by device time, and how busy the device was (its kernel time over the run's wall time:
    near 1 the run is device-bound; well below, the host's launches and Python keep the device waiting)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = methods.device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    methods.measure(sample)  # warm
    with profile(activities=activities) as prof:
        meter, _out = methods.measure(sample)
    events = prof.key_averages()
    print(f"\n=== torch.profiler, one warm run of {title}: wall {meter.wall:.3f} s ===")
    if cuda:
        kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        print(f"device kernel time {kernels / 1e6:.3f} s = {kernels / 1e6 / meter.wall:.2f} of the wall time")
        waits = {e.key: e.count for e in events if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                                "cudaMemcpyAsync", "cudaMemcpy", "cudaEventSynchronize")}
        print("host waits and copies (calls): " + (", ".join(f"{k} {v}" for k, v in sorted(waits.items())) or "none"))
        print(events.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


def profile_one_run(methods: "SamplingMethods", run, title: str, points):
    """One call of ``run`` (a whole method run, model unloaded first) under cProfile: prints the cumulative time of
    each of ``points`` (``(label, file suffix, function name)``; of same-named functions in one file, the outermost)
    and returns the stats for the caller's own tables."""
    import cProfile
    import os
    import pstats
    import time

    methods.mm.unload_all_models()
    gc.collect()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    run()
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    print(f"\n=== cProfile of one {title} run: {wall:.2f} s under the profiler ===")
    print("where the time goes (cumulative seconds, calls):")
    for label, suffix, func in points:
        hits = [(v[3], v[1]) for (path, _line, name), v in stats.stats.items()
                if name == func and path.replace(os.sep, "/").endswith(suffix)]
        if hits:
            ct, calls = max(hits)
            print(f"  {label:<50} {ct:8.3f} s  {calls:6d} calls  ({100 * ct / wall:5.1f} %)")
        else:
            print(f"  {label:<50}      n/a")
    return stats


def start_sampling_bench(args, title: str, name: str):
    """Start ComfyUI over a fresh models folder and print the run's header; returns ``(env, models_dir)``."""
    import os
    import platform
    import tempfile

    from harness import comfy_env

    models_dir = Path(tempfile.mkdtemp(prefix=f"lora-composer-bench-{name}-")) / "models"
    env = comfy_env.start(models_dir=models_dir, quiet=False)
    import comfy.ldm.modules.attention as comfy_attention
    import torch

    args.roundings = gpu_roundings(args)
    print(f"{title} — ComfyUI {env.version} ({env.describe()})")
    print(f"Python {platform.python_version()}, torch {torch.__version__}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} CPUs, attention {comfy_attention.optimized_attention.__name__}, UNet "
          f"{getattr(args, 'dtype', 'fp32')}, "
          f"{device_description(args)}")
    for why in args.roundings:
        print(f"NOTE: beyond fp32 rounding: {why}; the 1e-4 guards only report"
              f"{'' if getattr(args, 'dtype', 'fp32') != 'fp32' else ' (--exact makes them hold)'}")
    return env, models_dir


def gpu_roundings(args) -> list[str]:
    """After ComfyUI's import: apply ``--exact``, and say which GPU settings round beyond fp32 (empty on the CPU).

    Both are defaults a user has, so the timings keep them: cuDNN runs fp32 convolutions in TF32 (10-bit mantissa),
    which rounds a merged ``W + ΔW`` differently from ``W`` plus a separate LoRA path; and ComfyUI 0.9.x patches
    weights in ``lora_compute_dtype`` (fp16 on such GPUs, also for fp32 weights), which our merged strategy follows
    bit for bit (it equals core's static LoRA) while the unmerged one and core's hook LoRAs stay fp32.
    """
    import comfy.model_management as mm
    import torch

    half = [] if getattr(args, "dtype", "fp32") == "fp32" else [
        f"a {args.dtype} UNet (merged weights round W + ΔW to {args.dtype}; unmerged paths add the LoRA to the output)"]
    if args.device != "cuda":
        return half
    device = mm.get_torch_device()
    if args.exact:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        if hasattr(mm, "LORA_COMPUTE_DTYPES"):  # core's per-device cache of its own choice
            for key in (device, torch.device("cuda", torch.cuda.current_device())):
                mm.LORA_COMPUTE_DTYPES[key] = torch.float32
        return half
    why = list(half)
    if torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32:
        why.append("TF32 convolutions/matmuls (PyTorch's cuDNN default)")
    if hasattr(mm, "lora_compute_dtype") and mm.lora_compute_dtype(device) != torch.float32:
        why.append(f"ComfyUI patches fp32 weights in {mm.lora_compute_dtype(device)} on this GPU (lora_compute_dtype): "
                   "merged strategies (like core's static LoRA) round every patched weight to it, unmerged ones do not")
    return why


def guard_verdict(args, difference: float, tolerance: float) -> str:
    """``OK``/``FAILED`` against ``tolerance``; only ``(info: GPU rounding)`` where ``gpu_roundings`` found some."""
    if difference <= tolerance:
        return "OK"
    return "(info: GPU rounding, see NOTE)" if getattr(args, "roundings", None) else "FAILED"


def add_budget_argument(parser) -> None:
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-time budget in seconds: stop timing after the last round that fits (at least one), "
                             "so that a run under a hard time limit still prints its tables")


def out_of_budget(args, t_start: float, round_seconds: float, done: int) -> bool:
    """After round ``done`` (0 = the warm-up) took ``round_seconds``: would the next round pass ``--budget-s``?

    Shrinks ``args.repeats`` to the rounds actually timed and says so, so the tables print the true count.
    """
    import time

    if not args.budget_s or done < 1 or done >= args.repeats:
        return False
    if time.perf_counter() - t_start + round_seconds <= args.budget_s:
        return False
    print(f"NOTE: stopping after {done} of {args.repeats} timed rounds: another round ({round_seconds:.0f} s) "
          f"would pass --budget-s {args.budget_s:g}", flush=True)
    args.repeats = done
    return True


def add_timing_argument(parser) -> None:
    parser.add_argument("--timing", choices=("fresh", "steady"), default="fresh",
                        help="fresh (default): every run builds its MODEL/GUIDER and samples, methods interleaved "
                             "round by round (what a changed prompt costs). steady: each method is built once, then "
                             "sampled warm-up + --repeats times in a row with the model kept loaded (what sampling "
                             "the same graph again costs; on a GPU the fresh runs are dominated by ComfyUI reloading "
                             "the model whenever the patched clone changes)")


def steady_repeats(args, t_start: float, configs_left: int, run_seconds: float) -> int:
    """Timed repeats for the next method in ``--timing steady`` under ``--budget-s`` (at least one)."""
    import time

    if not args.budget_s or run_seconds <= 0:
        return args.repeats
    left = args.budget_s - (time.perf_counter() - t_start)
    fit = int(left / (configs_left * run_seconds)) - 1  # one warm-up per method
    if fit >= args.repeats:
        return args.repeats
    fit = max(1, fit)
    print(f"NOTE: --budget-s: {fit} timed repeat(s) for the remaining {configs_left} method(s)", flush=True)
    return fit


class RunLog:
    """What the timing loops record: per config its timed runs, its peak CUDA memory, its warm-up output."""

    def __init__(self):
        self.times: dict = {}
        self.cuda_peaks: dict = {}
        self.warm_outputs: dict = {}

    def add(self, cfg, warm_up: bool, seconds, out, peak: int | None) -> None:
        if peak is not None:
            self.cuda_peaks[cfg] = max(self.cuda_peaks.get(cfg, 0), peak)
        if warm_up:
            self.warm_outputs[cfg] = out
        else:
            self.times.setdefault(cfg, []).append(seconds)


def time_steady(methods, configs, args, t_start: float, prepare) -> RunLog:
    """``--timing steady``: each config built once (``prepare(cfg)`` → sampling call, untimed), then sampled
    warm-up + repeats times in a row through ``methods.timed``."""
    import statistics
    import time

    def wall(t):  # bench_switch records (wall, CPU) pairs, bench_composite wall seconds
        return t[0] if isinstance(t, tuple) else t

    log = RunLog()
    run_seconds = 0.0
    for i, cfg in enumerate(configs):
        sample = prepare(cfg)
        repeats = steady_repeats(args, t_start, len(configs) - i, run_seconds)
        for rnd in range(repeats + 1):
            seconds, out = methods.timed(sample)
            log.add(cfg, rnd == 0, seconds, out, methods.last_peak)
        run_seconds = statistics.mean(statistics.mean(wall(t) for t in v) for v in log.times.values())  # so far
    print(f"all methods timed ({time.perf_counter() - t_start:.0f} s since start)", flush=True)
    args.repeats = min(len(v) for v in log.times.values())
    return log


def setup_process(threads: int, attention: str) -> None:
    """Quiet ComfyUI's start-up, pin torch threads, and choose the attention before comfy is imported."""
    logging.getLogger().setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(threads)
    if attention == "pytorch":
        from harness import comfy_env  # the caller put tests/ on sys.path

        root = comfy_env.locate_comfyui()
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from comfy.cli_args import args as comfy_args

        comfy_args.use_pytorch_cross_attention = True
