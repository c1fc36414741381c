"""Sampling helpers shared by the tests: sigmas of a schedule, one ``sample_custom`` call, and the step-by-step
reference for per-step LoRA schedules (Switch): before each step the base model is patched with that step's LoRA
alone by ComfyUI's own patching (``LoraSetLoad`` → ``LoraSetApply`` → core's ``add_patches``)."""
from __future__ import annotations

import torch

from .node_calls import call_node


def sigmas_for(model, steps, denoise=1.0):
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    full = comfy.samplers.calculate_sigmas(ms, "normal", int(steps / denoise) if denoise < 1 else steps)
    return full[-(steps + 1):]


def run_custom(model, sampler_name, sigmas, pos, neg, noise, latent, seed=3, cfg=4.0, callback=None):
    import comfy.sample
    import comfy.samplers

    return comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object(sampler_name), sigmas, pos, neg,
                                      latent, callback=callback, disable_pbar=True, seed=seed)


def reference(model, names, strengths, active, sampler_name, sigmas, pos, neg, latent, seed=3):
    """Step by step: before step i, patch the base model with LoRA active(i) alone (core patching)."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    x = latent
    for i in range(len(sigmas) - 1):
        j = active(i)
        (single,) = call_node("LoraSetLoad", lora_name=names[j], strength_model=strengths[j], strength_clip=1.0)
        patched = call_node("LoraSetApply", model=model, lora_set=single)[0]
        x = run_custom(patched, sampler_name, sigmas[i:i + 2], pos, neg, noise if i == 0 else torch.zeros_like(noise),
                       x, seed=seed)
    return x


def baked_model(engine, copy, lora_set):
    """``copy`` (a fresh ModelPatcher built like the model under test) with ``lora_set``'s model patches baked into
    its weights by core math (every entry's patch lists per key, in set order, through ``calculate_weight``); its
    BaseModel, ready for ``sampling_function``. ``lora_set`` None: the copy as built. ``engine``: ``env.engine``."""
    import comfy.lora
    import comfy.utils

    if lora_set is not None:
        patching = engine("nodes.patching")
        lists: dict = {}
        for e, p in patching.resolve_set(copy, None, lora_set):
            for k, v in patching.model_patch_lists(e, p).items():
                lists.setdefault(k, []).extend(v)
        for key, plist in lists.items():
            w = comfy.utils.get_attr(copy.model, key)
            comfy.utils.set_attr_param(copy.model, key, comfy.lora.calculate_weight(plist, w.float().clone(), key))
    copy.model.current_patcher = copy  # what ModelPatcher sets when it loads a model; calc_cond_batch reads it
    return copy.model


def cat_conds(seed: int = 52):
    """(positive, negative) conditioning from the tiny SD1.5 CLIP: "a cat" and the empty prompt."""
    from .tiny_models import build_sd15_clip

    clip = build_sd15_clip(seed=seed)
    return (clip.encode_from_tokens_scheduled(clip.tokenize("a cat")),
            clip.encode_from_tokens_scheduled(clip.tokenize("")))
