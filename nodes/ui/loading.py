"""Nodes that build and inspect a LORA_SET: load, stack conversion, block weights, info."""
from __future__ import annotations

import os

import folder_paths

from ..lora_blocks import PRESETS, parse_block_weights
from ..lora_info import describe_set
from ..lora_set import LORA_SET_TYPE, LoraSet, check_strength, file_entry, require_nonempty, with_blocks
from ..registry import register_node
from .common import (LORA_STACK_TYPE, file_signature, lora_name_input, lora_path, lora_set_input,
                     strength_input)


@register_node("LoraSetLoad", "Load LoRA (set)", "sets")
class LoraSetLoad:
    DESCRIPTION = ("Adds one LoRA file to a LORA_SET (an ordered list of LoRAs with strengths). Chain several to "
                   "build a set; apply it with 'Apply LoRA set', or compose it with Switch/Composite. The file is "
                   "read once and cached by path and modification time.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_name": lora_name_input(),
                             "strength_model": strength_input(1.0, "diffusion model"),
                             "strength_clip": strength_input(1.0, "text encoder (CLIP)")},
                "optional": {"lora_set": lora_set_input("A set to append this LoRA to (optional).")}}

    RETURN_TYPES = (LORA_SET_TYPE,)
    RETURN_NAMES = ("lora_set",)
    OUTPUT_TOOLTIPS = ("The incoming set with this LoRA appended.",)
    FUNCTION = "load"

    @classmethod
    def IS_CHANGED(cls, lora_name="", **_inputs):
        """Re-run when the file changes on disk (same name, new contents); other inputs ComfyUI tracks itself."""
        return file_signature("loras", lora_name)

    def load(self, lora_name, strength_model, strength_clip, lora_set=None):
        entry = file_entry(lora_path(lora_name), strength_model, strength_clip)
        return ((lora_set or LoraSet()).appended(entry),)


@register_node("LoraSetFromStack", "LoRA stack → set", "sets")
class LoraSetFromStack:
    DESCRIPTION = ("Converts a community LORA_STACK (a list of (lora_name, model_strength, clip_strength), as made "
                   "by Efficiency/Comfyroll stackers) into a LORA_SET. Entries named 'None' are skipped.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_stack": (LORA_STACK_TYPE, {"tooltip": "A LORA_STACK from a stacker node."})},
                "optional": {"lora_set": lora_set_input("A set to append the stack to (optional).")}}

    RETURN_TYPES = (LORA_SET_TYPE,)
    RETURN_NAMES = ("lora_set",)
    FUNCTION = "convert"

    def convert(self, lora_stack, lora_set=None):
        result = lora_set or LoraSet()
        for i, item in enumerate(lora_stack or []):
            if not isinstance(item, (tuple, list)) or len(item) != 3:
                raise ValueError(f"lora_stack item {i} is {item!r}; expected (lora_name, model_strength, clip_strength).")
            name, sm, sc = item
            if name in (None, "None", ""):
                continue
            try:
                result = result.appended(file_entry(lora_path(name), sm, sc))
            except ValueError as e:  # a bad strength or file: say which item of the stack
                raise ValueError(f"lora_stack item {i} ({name!r}): {e}") from e
        return (require_nonempty(result, "lora_stack"),)


@register_node("LoraSetToStack", "LoRA set → stack", "sets")
class LoraSetToStack:
    DESCRIPTION = ("Converts a LORA_SET back into a community LORA_STACK list of (lora_name, model_strength, "
                   "clip_strength). Only file entries can be expressed; block weights are dropped (a stack "
                   "cannot carry them), which is reported as an error rather than silently ignored.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_set": lora_set_input()}}

    RETURN_TYPES = (LORA_STACK_TYPE,)
    RETURN_NAMES = ("lora_stack",)
    FUNCTION = "convert"

    def convert(self, lora_set):
        stack = []
        for entry in require_nonempty(lora_set):
            if entry.path is None:
                raise ValueError(f"{entry.name} lives in memory (a merge or generated LoRA); save it with "
                                 "'Save LoRA set' before turning the set into a LORA_STACK.")
            if entry.blocks is not None and not entry.blocks.changes_nothing:
                raise ValueError(f"{entry.name} has block weights ({entry.blocks.describe()}); a LORA_STACK "
                                 "cannot carry them.")
            stack.append((_relative_lora_name(entry.path), entry.strength_model, entry.strength_clip))
        return (stack,)


def _relative_lora_name(path: str) -> str:
    """The name the loras combo shows for a file (relative to whichever loras folder holds it)."""
    for base in folder_paths.get_folder_paths("loras"):
        base = os.path.realpath(base)
        real = os.path.realpath(path)
        if real.startswith(base + os.sep):
            return os.path.relpath(real, base)
    return os.path.basename(path)


BLOCK_TARGETS = ("last entry", "all entries")


@register_node("LoraSetBlocks", "LoRA set block weights", "sets")
class LoraSetBlocks:
    DESCRIPTION = ("Restricts LoRAs to named blocks of the diffusion model, or weights blocks differently. Presets "
                   "cover SD1.x/SDXL input/middle/output and B-LoRA (SDXL content = output_blocks.0.1, style = "
                   "output_blocks.1.1). 'block_weights' adds rules such as 'output_blocks.0.1=0.8, input_blocks=0' "
                   "('*=…' sets all other blocks); the most specific block wins. Block names are checked against "
                   "the model when the set is applied. Text-encoder parts follow strength_clip.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_set": lora_set_input(),
            "preset": (list(PRESETS), {"default": "all", "tooltip": "Starting block selection."}),
            "block_weights": ("STRING", {"default": "", "multiline": True,
                                         "tooltip": "Extra rules 'block=weight', comma or newline separated; "
                                                    "'*=w' sets every other block."}),
            "apply_to": (list(BLOCK_TARGETS), {"default": "last entry",
                                               "tooltip": "Filter only the most recently added LoRA, or every LoRA."}),
        }}

    RETURN_TYPES = (LORA_SET_TYPE,)
    RETURN_NAMES = ("lora_set",)
    FUNCTION = "set_blocks"

    def set_blocks(self, lora_set, preset, block_weights, apply_to):
        lora_set = require_nonempty(lora_set)
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is unknown; choose one of: {', '.join(PRESETS)}.")
        if apply_to not in BLOCK_TARGETS:
            raise ValueError(f"apply_to must be one of {BLOCK_TARGETS}, got {apply_to!r}.")
        block_filter = parse_block_weights(block_weights or "", PRESETS[preset])
        for w in (*(w for _, w in block_filter.rules), block_filter.default):  # '*=…' sets the default
            check_strength(w, "block_weights")
        indices = range(len(lora_set)) if apply_to == "all entries" else [len(lora_set) - 1]
        for i in indices:
            lora_set = lora_set.replaced(i, with_blocks(lora_set.entries[i], block_filter))
        return (lora_set,)


@register_node("LoraSetInfo", "LoRA set info", "sets")
class LoraSetInfo:
    DESCRIPTION = ("Describes every LoRA in a set: network type (LoRA/LoCon/LoHa/LoKr/DoRA…), key style, rank(s), "
                   "alpha, the base model it looks made for and trigger words from its training metadata. With a "
                   "MODEL (and CLIP) connected it also counts matched and unmatched keys.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"lora_set": lora_set_input()},
                "optional": {"model": ("MODEL", {"tooltip": "Count matched keys against this model (optional)."}),
                             "clip": ("CLIP", {"tooltip": "Count matched text-encoder keys (optional)."})}}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    OUTPUT_NODE = True
    FUNCTION = "describe"

    def describe(self, lora_set, model=None, clip=None):
        text = describe_set(require_nonempty(lora_set), model, clip)
        return {"ui": {"text": [text]}, "result": (text,)}
