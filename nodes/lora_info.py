"""Human-readable summaries of a LORA_SET (what ``LoraSetInfo`` shows)."""
from __future__ import annotations

from .lora_format import summarize
from .lora_keys import build_key_map, normalize_keys
from .lora_set import LoraEntry, LoraSet
from .patching import model_family, resolve_entry, state_shapes


def describe_entry(entry: LoraEntry, model=None, clip=None) -> str:
    tensors = entry.tensors()
    summary = summarize(normalize_keys(tensors), entry.metadata(), file_keys=list(tensors))
    head = f"{entry.name} (model {entry.strength_model:g}, clip {entry.strength_clip:g})"
    if entry.blocks is not None:
        head += f" [blocks {entry.blocks.describe()}]"
    lines = [head, "  " + summary.describe()]
    if model is not None or clip is not None:
        model_sd = state_shapes(model.model) if model is not None else {}
        clip_sd = state_shapes(clip.cond_stage_model) if clip is not None else None
        try:
            patches = resolve_entry(entry, build_key_map(model, clip), model_sd, clip_sd, model_family(model))
            lines.append("  against the connected model: " + patches.describe())
        except ValueError as e:
            lines.append(f"  against the connected model: does not fit — {e}")
    return "\n".join(lines)


def describe_set(lora_set: LoraSet, model=None, clip=None) -> str:
    return "\n".join(describe_entry(e, model, clip) for e in lora_set)
