"""Composition nodes on the adapter runtime (Zhong et al. 2024)."""
from __future__ import annotations

from ..composition import autolora_guidance, composite_lora_set, switch_lora_set
from ..guidance import GAMMA_SCHEDULES, MIX_MODES, autolora_guider
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
                                                       "when it changes (fastest, exact; on a GPU it keeps one "
                                                       "patched copy of the LoRA'd weights in memory). "
                                                       "merged-lowvram: swapped in the model's own weights, their "
                                                       "originals in RAM (no copy in VRAM; equal up to rounding). "
                                                       "unmerged: add it to layer outputs, no weight copy. auto: "
                                                       "merged where that copy fits in free memory, else "
                                                       "merged-lowvram. Same images (up to GPU rounding)."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = ("The model with LoRA Switch attached.", "The CLIP with all text-encoder parts applied.",
                       "Per LoRA: weights matched.")
    FUNCTION = "switch"

    def switch(self, model, lora_set, switch_every, schedule, clip=None, strategy="auto"):
        new_model, new_clip, _runtime, lines = switch_lora_set(model, clip, lora_set, switch_every, schedule, strategy)
        return (new_model, new_clip, "\n".join(lines))


@register_node("LoraSetComposite", "LoRA Composite", "compose")
class LoraSetComposite:
    DESCRIPTION = ("LoRA Composite (Zhong et al. 2024): at every step each LoRA is evaluated on its own, on the "
                   "conditional and the unconditional branch, and the guided scores are averaged: "
                   "ε̃ = Σ_i w_i [ε_i(∅) + s(ε_i(c) − ε_i(∅))], w_i = 1/k (paper) or 'entry_weights' normalised to "
                   "sum to 1. Implemented by averaging each branch inside the model call, which is exactly the "
                   "same because CFG is linear, so it works with any sampler and other model patches. Costs k "
                   "network evaluations per model call; weight memory stays that of one static LoRA (no copy per "
                   "LoRA). With cfg = 1 the conditional branch alone is averaged.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to sample with."}),
            "lora_set": lora_set_input("The LoRAs to compose (each evaluated on its own every step)."),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Text encoder: all LoRAs' text-encoder parts are applied (summed)."}),
            "entry_weights": ("STRING", {"default": "", "tooltip": "Empty: uniform 1/k (paper). Otherwise one "
                                         "non-negative number per LoRA, e.g. '1, 1, 2'; normalised to sum 1."}),
            "strategy": (list(STRATEGIES), {"default": "auto", "advanced": True,
                                            "tooltip": "unmerged: one k-times batch with per-row LoRAs (split "
                                                       "to fit free memory). merged: k sequential passes, each "
                                                       "LoRA's weights recomputed in place. auto: unmerged "
                                                       "(measured faster on CPUs and GPUs). merged-lowvram: as "
                                                       "merged, in the model's own weights. None keeps a "
                                                       "weight copy per LoRA."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    FUNCTION = "composite"

    def composite(self, model, lora_set, clip=None, entry_weights="", strategy="auto"):
        new_model, new_clip, _runtime, lines = composite_lora_set(model, clip, lora_set, entry_weights, strategy)
        return (new_model, new_clip, "\n".join(lines))


@register_node("AutoLoraGuidance", "AutoLoRA guidance (model)", "guidance")
class AutoLoraGuidance:
    DESCRIPTION = ("AutoLoRA (Kasymov et al. 2024), shared-CFG form: ε = ε_base + γ·(ε_LoRA − ε_base) for each "
                   "branch (cond and uncond), then the sampler's CFG — equal to CFG on each branch followed by the "
                   "blend. ε_LoRA uses every LoRA of the set at its strength; ε_base none. γ = 1 is exactly plain "
                   "LoRA sampling, γ = 0 exactly the base model; γ in [0, 1] interpolates, γ > 1 extrapolates away "
                   "from the base. Sensible range documented as [-1, 3] (a warning outside). Costs 2 network "
                   "evaluations per model call. Use 'AutoLoRA guider' for separate CFG scales.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base diffusion model."}),
            "lora_set": lora_set_input("The LoRA(s) forming the LoRA branch."),
            "gamma": ("FLOAT", {"default": 0.5, "min": -10.0, "max": 10.0, "step": 0.05,
                                "tooltip": "γ: 0 = base model, 1 = LoRA model, between = trade-off."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Text encoder: the LoRAs' text-encoder parts are applied (summed)."}),
            "strategy": (list(STRATEGIES), {"default": "auto", "advanced": True,
                                            "tooltip": "merged: base and LoRA passes with swapped weights "
                                                       "(merged-lowvram: swapped in the model's own weights, no "
                                                       "copy). unmerged: one batch with per-row LoRAs. auto: "
                                                       "unmerged (measured faster), merged at γ = 0 or 1 (one pass)."}),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    FUNCTION = "guide"

    def guide(self, model, lora_set, gamma, clip=None, strategy="auto"):
        new_model, new_clip, _runtime, lines = autolora_guidance(model, clip, lora_set, gamma, strategy)
        return (new_model, new_clip, "\n".join(lines))


@register_node("AutoLoraGuider", "AutoLoRA guider", "guidance")
class AutoLoraGuider:
    DESCRIPTION = ("AutoLoRA as a GUIDER for SamplerCustomAdvanced, with separate CFG per branch: "
                   "ε̂_base = CFG(base; cfg_base), ε̂_LoRA = CFG(LoRA; cfg_lora), ε = ε̂_base + γ_t(ε̂_LoRA − ε̂_base) "
                   "('cfg-then-blend'); 'blend-then-cfg' blends cond and uncond first and applies cfg_lora once. "
                   "γ_t follows gamma_schedule: constant, or from gamma (first step) to gamma_end (last step) "
                   "linearly or by a cosine. Other packs' pre-/post-CFG patches run as in core guiders. "
                   "4 cond evaluations per step (one fewer per branch whose cfg is 1), in one batched network "
                   "call or one per branch (strategy).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The base diffusion model."}),
            "lora_set": lora_set_input("The LoRA(s) forming the LoRA branch."),
            "positive": ("CONDITIONING", {"tooltip": "Positive conditioning."}),
            "negative": ("CONDITIONING", {"tooltip": "Negative conditioning."}),
            "cfg_base": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "CFG scale of the base branch."}),
            "cfg_lora": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                   "tooltip": "CFG scale of the LoRA branch."}),
            "gamma": ("FLOAT", {"default": 0.5, "min": -10.0, "max": 10.0, "step": 0.05,
                                "tooltip": "γ at the first step (0 = base, 1 = LoRA)."}),
        }, "optional": {
            "gamma_schedule": (list(GAMMA_SCHEDULES), {"default": "constant",
                                                       "tooltip": "How γ moves from 'gamma' to 'gamma_end'."}),
            "gamma_end": ("FLOAT", {"default": 0.5, "min": -10.0, "max": 10.0, "step": 0.05,
                                    "tooltip": "γ at the last step (linear/cosine schedules)."}),
            "mix": (list(MIX_MODES), {"default": "cfg-then-blend", "tooltip": "Where the γ blend happens."}),
            "strategy": (list(STRATEGIES), {"default": "auto", "advanced": True,
                                            "tooltip": "merged: base and LoRA branches one after the other with "
                                                       "swapped weights (merged-lowvram: swapped in the model's own "
                                                       "weights, no copy). unmerged: both branches' cond and uncond "
                                                       "in one batch with per-row LoRAs. auto: unmerged (measured "
                                                       "faster), merged when γ stays 0 or 1 (one branch)."}),
        }}

    RETURN_TYPES = ("GUIDER",)
    RETURN_NAMES = ("guider",)
    FUNCTION = "guider"

    def guider(self, model, lora_set, positive, negative, cfg_base, cfg_lora, gamma, gamma_schedule="constant",
               gamma_end=0.5, mix="cfg-then-blend", strategy="auto"):
        end = gamma if gamma_schedule == "constant" else gamma_end
        return (autolora_guider(model, lora_set, positive, negative, cfg_base, cfg_lora, gamma, gamma_schedule, end,
                                mix, strategy),)
