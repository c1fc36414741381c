"""Mapping LoRA file keys to model weights: ComfyUI's own key maps first, plus what core lacks.

What core lacks (each covered by a test in tests/integration/test_key_styles.py):
* diffusers/PEFT attention keys *without* ``.processor`` (``unet.…attn1.to_q.lora_A.weight``,
  ``….to_out.0.…``): core only maps the ``….processor.to_q`` spelling for SD1.x/SDXL UNets, so files
  saved by diffusers ≥ 0.22 (PEFT backend) and B-LoRA author files load with zero matched UNet keys.
* B-LoRA author files use a doubled ``unet.unet.`` prefix (liusida/ComfyUI-B-LoRA issue #4).
* raw PEFT adapter files prefix the UNet with ``base_model.model.``.
"""
from __future__ import annotations

import comfy.lora
import comfy.lora_convert
import comfy.utils
import torch

_PREFIX_REWRITES: tuple[tuple[str, str], ...] = (
    ("unet.unet.", "unet."),  # B-LoRA author files
    ("base_model.model.", "unet."),  # raw PEFT adapters of a diffusers UNet
)


def normalize_keys(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rewrite known non-core prefixes; tensors are shared, not copied. Then core's own converters."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        for old, new in _PREFIX_REWRITES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = tensor
    return comfy.lora_convert.convert_lora(out)


def _diffusers_unet_keys(base_model) -> dict[str, str]:
    """``unet.<diffusers module>`` → model key, for UNet models (what core maps only with ``.processor``)."""
    unet_config = getattr(base_model.model_config, "unet_config", {})
    if "num_res_blocks" not in unet_config:  # not a UNet (DiT families have their own maps in core)
        return {}
    extra: dict[str, str] = {}
    for diffusers_key, sgm_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if diffusers_key.endswith(".weight"):
            module = diffusers_key[: -len(".weight")]
            extra[f"unet.{module}"] = f"diffusion_model.{sgm_key}"
    return extra


def build_key_map(model_patcher, clip=None) -> dict[str, str]:
    """LoRA module prefix → model/CLIP state-dict key, for one MODEL (and optional CLIP).

    Core maps come first and win; our additions only fill names core does not know.
    """
    key_map: dict[str, str] = {}
    if model_patcher is not None:
        comfy.lora.model_lora_keys_unet(model_patcher.model, key_map)
        for k, v in _diffusers_unet_keys(model_patcher.model).items():
            key_map.setdefault(k, v)
    if clip is not None:
        comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return key_map


def kohya_names(model_patcher, clip=None) -> dict[str, str]:
    """Model/CLIP key → the kohya-style module name used when saving (inverse of the key map).

    Preference: ``lora_unet_<sgm path>`` / ``lora_te…`` names (what kohya and ComfyUI write), else
    the generic ``diffusion_model.<path>`` / ``text_encoders.<path>`` form that core always maps.
    """
    def rank(name: str, model_key: str) -> int:
        if model_key.startswith("diffusion_model.") and name == "lora_unet_" + model_key[16:-7].replace(".", "_"):
            return 0
        if name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
            return 0
        if name.startswith(("diffusion_model.", "text_encoders.")):
            return 1
        return 2

    inverse: dict[str, str] = {}
    for lora_name, model_key in build_key_map(model_patcher, clip).items():
        if not isinstance(model_key, str):
            continue  # (key, offset) tuples: fused layers, saved under the generic name instead
        best = inverse.get(model_key)
        if best is None or (rank(lora_name, model_key), lora_name) < (rank(best, model_key), best):
            inverse[model_key] = lora_name
    if model_patcher is not None:
        for key in model_patcher.model.state_dict():
            if key.endswith(".weight"):
                inverse.setdefault(key, key[: -len(".weight")])
    return inverse
