"""Merging a set into one LoRA, and saving a set as a file."""
from __future__ import annotations

import os

import folder_paths

from ..lora_set import LORA_SET_TYPE
from ..merging import MERGE_METHODS, merged_entry
from ..saving import SAVE_DTYPES, save_lora_set
from ..registry import register_node
from .common import lora_set_input


@register_node("LoraSetMerge", "Merge LoRA set", "merge")
class LoraSetMerge:
    DESCRIPTION = ("Merges every LoRA of the set into one LoRA, working on the exact weight deltas (any LoRA "
                   "family) at each entry's strength and block weights. linear: exact sum. concat: exact rank "
                   "stacking (plain LoRA/LoCon only). svd: the sum re-compressed to 'rank' per layer, reporting the "
                   "relative error. ties: trim to 'density', elect signs, disjoint mean. dare: random drop with "
                   "keep-probability 'density' and rescale (seeded). ties/dare results are compressed to 'rank' "
                   "(0 keeps them dense). The model is needed to map keys and compute deltas; it is not modified.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base model the LoRAs belong to (read only)."}),
            "lora_set": lora_set_input(),
            "method": (list(MERGE_METHODS), {"default": "svd", "tooltip": "How to combine the weight deltas."}),
            "rank": ("INT", {"default": 32, "min": 0, "max": 1024,
                             "tooltip": "Target rank for svd/ties/dare (0 = keep ties/dare dense)."}),
            "density": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "ties/dare: fraction of delta entries kept."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "dare: random seed."}),
        }, "optional": {"clip": ("CLIP", {"tooltip": "Merge the text-encoder parts too (optional)."})}}

    RETURN_TYPES = (LORA_SET_TYPE, "STRING")
    RETURN_NAMES = ("lora_set", "report")
    OUTPUT_TOOLTIPS = ("A set holding the single merged LoRA (strength 1).", "What was merged, and SVD errors.")
    FUNCTION = "merge"

    def merge(self, model, lora_set, method, rank, density, seed, clip=None):
        return merged_entry(model, clip, lora_set, method, rank, density, seed)


@register_node("LoraSetSave", "Save LoRA set", "merge")
class LoraSetSave:
    DESCRIPTION = ("Writes a one-LoRA set (a merge or a generated LoRA) as an ordinary kohya-style .safetensors "
                   "file into the loras folder, with metadata (network type, rank, alpha, sources, method). The "
                   "file loads again with 'Load LoRA (set)' and with ComfyUI's own 'Load LoRA'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora_set": lora_set_input("A set holding exactly one LoRA at strength 1 (e.g. from 'Merge LoRA set')."),
            "filename_prefix": ("STRING", {"default": "lora_composer/merged",
                                           "tooltip": "Relative path inside the loras folder; a counter is added."}),
            "dtype": (list(SAVE_DTYPES), {"default": "fp16", "tooltip": "Precision of the saved weights."}),
        }}

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name, as the loras list shows it.",)
    OUTPUT_NODE = True
    FUNCTION = "save"

    def save(self, lora_set, filename_prefix, dtype):
        folder = folder_paths.get_folder_paths("loras")[0]
        path = save_lora_set(lora_set, folder, filename_prefix, dtype)
        name = os.path.relpath(path, folder)
        return {"ui": {"text": [f"saved {name}"]}, "result": (name,)}
