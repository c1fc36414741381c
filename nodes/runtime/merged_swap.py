"""Merged-weight execution: the active LoRA is baked into the weights, swapped when it changes.

A swap computes each patched layer exactly as ComfyUI's ``ModelPatcher.patch_weight_to_device``
does (same compute dtype, ``comfy.lora.calculate_weight``, same stochastic rounding seed), from the
weight that was in the model when sampling started. So one active LoRA gives bit-identical weights
to static application, and switching never accumulates rounding error (no W + Δa − Δa).

Memory: the Parameter objects found at the start are kept by reference (as ComfyUI's own backup
does) and put back at the end, so besides the LoRA tensors we hold one patched copy per layer — the
same as one statically applied LoRA — plus one layer's temporary while computing.
"""
from __future__ import annotations

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import torch
from comfy.model_patcher import get_key_weight, string_to_seed

try:
    import comfy.float as comfy_float
except ImportError:  # pragma: no cover - every supported ComfyUI has comfy.float
    comfy_float = None


def _compute_dtype(device) -> torch.dtype:
    # 0.9.2 may compute LoRA patches in fp16 on GPUs; 0.3.64 always used fp32. Match the running core.
    return mm.lora_compute_dtype(device) if hasattr(mm, "lora_compute_dtype") else torch.float32


class MergedSwapper:
    """Swap per-layer patch lists into a loaded model and restore the original Parameters."""

    def __init__(self, base_model: torch.nn.Module, patches_per_option: list[dict[str, list]]):
        """``patches_per_option[j][key]`` is the ComfyUI patch list (as in ``ModelPatcher.patches``)."""
        self.base_model = base_model
        self.options = patches_per_option
        self.keys = sorted({k for opt in patches_per_option for k in opt})
        self.originals: dict[str, torch.nn.Parameter] = {}
        self.active: int | None = None

    def _set(self, key: str, patches: list | None) -> None:
        weight, set_func, convert_func = get_key_weight(self.base_model, key)
        if key not in self.originals:
            self.originals[key] = comfy.utils.get_attr(self.base_model, key)
        original = self.originals[key]
        if not patches:
            comfy.utils.set_attr(self.base_model, key, original)
            return
        temp = original.to(_compute_dtype(original.device), copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(patches, temp, key)
        if set_func is not None:
            raise NotImplementedError(f"{key}: quantized weights need the unmerged runtime")
        if comfy_float is not None:
            out = comfy_float.stochastic_rounding(out, original.dtype, seed=string_to_seed(key))
        else:
            out = out.to(original.dtype)
        comfy.utils.set_attr_param(self.base_model, key, out)

    def activate(self, option: int | None) -> bool:
        """Bake option ``option`` (None = no LoRA) into the weights; returns whether anything changed."""
        if option == self.active:
            return False
        wanted = self.options[option] if option is not None else {}
        for key in self.keys:
            self._set(key, wanted.get(key))
        self.active = option
        return True

    def restore(self) -> None:
        """Put back exactly the Parameter objects that were there before (bit-identical weights)."""
        for key, original in self.originals.items():
            comfy.utils.set_attr(self.base_model, key, original)
        self.originals.clear()
        self.active = None
