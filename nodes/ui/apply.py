"""Static application of a LORA_SET ("LoRA Merge" in Zhong et al. 2024)."""
from __future__ import annotations

from ..patching import apply_lora_set
from ..registry import register_node
from .common import lora_set_input


@register_node("LoraSetApply", "Apply LoRA set", "apply")
class LoraSetApply:
    DESCRIPTION = ("Applies every LoRA of the set to the model (and CLIP) at its strengths: the sum of the "
                   "strength-scaled weight deltas (the paper's 'LoRA Merge'). Identical, bit for bit, to chaining "
                   "ComfyUI's own 'Load LoRA' nodes with the same files and strengths, plus key styles core "
                   "misses, block weights, and a report of matched/unmatched keys. A LoRA that fits nothing in "
                   "the model is an error that names the base model the file looks made for.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "The diffusion model to patch."}),
                             "lora_set": lora_set_input()},
                "optional": {"clip": ("CLIP", {"tooltip": "The text encoder to patch (optional)."})}}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The patched model (the input model is left untouched).",
                       "The patched CLIP (None when no CLIP was connected).",
                       "Per LoRA: weights patched, unmatched keys.")
    FUNCTION = "apply"

    def apply(self, model, lora_set, clip=None):
        new_model, new_clip, lines = apply_lora_set(model, clip, lora_set)
        return (new_model, new_clip, "\n".join(lines))
