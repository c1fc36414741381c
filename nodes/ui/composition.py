"""Composition nodes on the adapter runtime (Zhong et al. 2024)."""
from __future__ import annotations

from ..composition import switch_lora_set
from ..registry import register_node
from ..runtime.binding import STRATEGIES
from ..runtime.schedules import SWITCH_SCHEDULES
from .common import lora_set_input


@register_node("LoraSetSwitch", "LoRA Switch", "compose")
class LoraSetSwitch:
    DESCRIPTION = ("LoRA Switch (Zhong et al. 2024): exactly one LoRA of the set is active at each denoising step, "
                   "cycling in set order every 'switch_every' steps (τ, paper default 5). 'paper': LoRA "
                   "⌊step/τ⌋ mod k; 'reference-code': the official code's schedule, where the first LoRA runs τ+1 "
                   "steps. The step is the sampler's step (multi-evaluation samplers such as heun keep each "
                   "step's extra evaluations on the same LoRA) and is relative to the steps actually run "
                   "(denoise < 1, start_at_step). Works with KSampler, KSamplerAdvanced and SamplerCustom(Advanced). "
                   "Text-encoder parts of all LoRAs are applied statically (summed), as in the reference. "
                   "The input model is never modified; weights are restored after every run.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to sample with."}),
            "lora_set": lora_set_input("The LoRAs to cycle through, in order (the first one starts)."),
            "switch_every": ("INT", {"default": 5, "min": 1, "max": 1000,
                                     "tooltip": "τ: number of steps each LoRA stays active."}),
            "schedule": (list(SWITCH_SCHEDULES), {"default": "paper",
                                                  "tooltip": "paper: ⌊step/τ⌋ mod k. reference-code: first LoRA "
                                                             "gets τ+1 steps, as in the authors' code."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Text encoder: all LoRAs' text-encoder parts are applied (summed)."}),
            "strategy": (list(STRATEGIES), {"default": "auto", "advanced": True,
                                            "tooltip": "merged: bake the active LoRA into the weights, swapped "
                                                       "when it changes (fastest). unmerged: add it to layer "
                                                       "outputs. Both give the same images."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The model with LoRA Switch attached.", "The CLIP with all text-encoder parts applied.",
                       "Per LoRA: weights matched.")
    FUNCTION = "switch"

    def switch(self, model, lora_set, switch_every, schedule, clip=None, strategy="auto"):
        new_model, new_clip, _runtime, lines = switch_lora_set(model, clip, lora_set, switch_every, schedule, strategy)
        return (new_model, new_clip, "\n".join(lines))
