"""Multi-LoRA composition on the adapter runtime: LoRA Switch, LoRA Composite, AutoLoRA guidance.

All three return a clone of the input MODEL with an ``AdapterRuntime`` attached; text-encoder parts
of every LoRA are applied statically (summed), as the references do.
"""
from __future__ import annotations

import logging
import math
import re
from functools import partial

from .lora_set import LoraSet, require_nonempty
from .patching import model_patch_lists, patched_clip, report_lines, resolve_set
from .runtime.binding import AdapterRuntime
from .runtime.schedules import switch_index

log = logging.getLogger("LoRA Composer")

GAMMA_SENSIBLE = (-1.0, 3.0)  # outside this, AutoLoRA still runs but we warn


def _resolve(model_patcher, clip, lora_set: LoraSet):
    lora_set = require_nonempty(lora_set)
    resolved = resolve_set(model_patcher, clip, lora_set)
    options = [model_patch_lists(entry, patches) for entry, patches in resolved]
    return lora_set, resolved, options


def switch_lora_set(model_patcher, clip, lora_set: LoraSet, switch_every: int, schedule: str,
                    strategy: str = "auto"):
    """LoRA Switch: one LoRA active per sampler step, cycling in set order every ``switch_every`` steps.

    Returns ``(model, clip, runtime, report_lines)``.
    """
    require_nonempty(lora_set)
    switch_index(0, len(lora_set), switch_every, schedule)  # validates the arguments up front
    lora_set, resolved, options = _resolve(model_patcher, clip, lora_set)
    runtime = AdapterRuntime(options, select=partial(switch_index, count=len(lora_set), every=switch_every,
                                                     schedule=schedule), strategy=strategy, label="switch")
    return runtime.attach(model_patcher), patched_clip(clip, resolved), runtime, report_lines(resolved)


def parse_entry_weights(text: str, count: int) -> list[float]:
    """``""`` → uniform 1/k (the paper). Otherwise k non-negative numbers, normalised to sum to 1."""
    if not text.strip():
        return [1.0 / count] * count
    try:
        values = [float(v) for v in re.split(r"[,\s;]+", text.strip()) if v]
    except ValueError as e:
        raise ValueError(f"entry_weights: {e}; write k numbers such as '1, 1, 2'.") from e
    if len(values) != count:
        raise ValueError(f"entry_weights has {len(values)} numbers but the set has {count} LoRAs.")
    if any(not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"entry_weights must be finite, non-negative and not all zero, got {values}.")
    total = sum(values)
    if not math.isfinite(total):  # finite weights whose sum overflows (1e308, 1e308): only their ratios count
        peak = max(values)
        values = [v / peak for v in values]
        total = sum(values)
    return [v / total for v in values]


def composite_lora_set(model_patcher, clip, lora_set: LoraSet, entry_weights: str = "", strategy: str = "auto",
                       free_memory=None):
    """LoRA Composite: every model call evaluates each LoRA on its own and averages the predictions.

    ε̃ = Σ_i w_i [ε_i(∅) + s(ε_i(c) − ε_i(∅))] with Σ w_i = 1 (paper: w_i = 1/k). CFG is linear, so
    averaging each branch inside the model call and letting the sampler apply CFG is exactly this,
    for any sampler, scheduler and CFG patch. Returns ``(model, clip, runtime, report_lines)``.
    """
    lora_set, resolved, options = _resolve(model_patcher, clip, lora_set)
    weights = parse_entry_weights(entry_weights, len(lora_set))
    components = [(w, i) for i, w in enumerate(weights) if w != 0]
    # no weight set is cached: k patched copies of the weights is what the runtime exists to avoid (auto runs
    # one batch with per-row adapters on a CPU; merged passes recompute the next LoRA's weights in place)
    runtime = AdapterRuntime(options, mixture=lambda step: components, strategy=strategy, label="composite",
                             free_memory=free_memory)
    return runtime.attach(model_patcher), patched_clip(clip, resolved), runtime, report_lines(resolved)


def check_gamma(gamma: float, input_name: str = "gamma") -> float:
    gamma = float(gamma)
    if not math.isfinite(gamma):
        raise ValueError(f"{input_name} must be a finite number, got {gamma}.")
    lo, hi = GAMMA_SENSIBLE
    if not lo <= gamma <= hi:
        log.warning("[LoRA Composer] %s = %g is outside the documented sensible range [%g, %g]; running anyway.",
                    input_name, gamma, lo, hi)
    return gamma


def autolora_mixture(gamma: float, count: int) -> list[tuple[float, object]]:
    """ε = ε_base + γ(ε_LoRA − ε_base) as components; γ = 0 / 1 evaluate one branch only (exact)."""
    all_loras = tuple([1.0] * count)
    if gamma == 0.0:
        return [(1.0, None)]
    if gamma == 1.0:
        return [(1.0, all_loras)]
    return [(1.0 - gamma, None), (gamma, all_loras)]


def autolora_guidance(model_patcher, clip, lora_set: LoraSet, gamma: float, strategy: str = "auto"):
    """AutoLoRA, shared-CFG form: each branch's prediction is mixed inside the model call.

    ε = ε_base + γ(ε_LoRA − ε_base) per branch; the sampler's CFG then applies to the mixture, which
    equals CFG on each branch followed by the mix (same scale, linear). Returns
    ``(model, clip, runtime, report_lines)``.
    """
    gamma = check_gamma(gamma)
    lora_set, resolved, options = _resolve(model_patcher, clip, lora_set)
    components = autolora_mixture(gamma, len(lora_set))
    # the LoRA weight set is cached: swapping base ↔ LoRA costs pointer moves, and memory equals one
    # statically applied LoRA (its patched copy next to the originals)
    runtime = AdapterRuntime(options, mixture=lambda step: components, strategy=strategy, label="autolora",
                             cached_sets=1, combined_rows=True)
    return runtime.attach(model_patcher), patched_clip(clip, resolved), runtime, report_lines(resolved)
