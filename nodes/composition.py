"""Multi-LoRA composition on the adapter runtime: LoRA Switch (and, later, Composite)."""
from __future__ import annotations

from functools import partial

from .lora_set import LoraSet, require_nonempty
from .patching import model_patch_lists, patched_clip, report_lines, resolve_set
from .runtime.binding import AdapterRuntime
from .runtime.schedules import switch_index


def switch_lora_set(model_patcher, clip, lora_set: LoraSet, switch_every: int, schedule: str,
                    strategy: str = "auto"):
    """LoRA Switch: one LoRA active per sampler step, cycling in set order every ``switch_every`` steps.

    Text-encoder parts of all LoRAs are applied statically (summed), as the reference does.
    Returns ``(model, clip, runtime, report_lines)``.
    """
    lora_set = require_nonempty(lora_set)
    switch_index(0, len(lora_set), switch_every, schedule)  # validates the arguments up front
    resolved = resolve_set(model_patcher, clip, lora_set)
    options = [model_patch_lists(entry, patches) for entry, patches in resolved]
    runtime = AdapterRuntime(options, partial(switch_index, count=len(lora_set), every=switch_every,
                                              schedule=schedule), strategy=strategy, label="switch")
    return runtime.attach(model_patcher), patched_clip(clip, resolved), runtime, report_lines(resolved)
