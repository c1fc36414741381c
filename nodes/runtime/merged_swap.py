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

from collections import OrderedDict

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

    def __init__(self, base_model: torch.nn.Module, patches_per_option: list[dict[str, list]], cached_sets: int = 0):
        """``patches_per_option[j][key]`` is the ComfyUI patch list (as in ``ModelPatcher.patches``).

        ``cached_sets``: how many computed weight sets to keep for instant re-activation. Each costs one
        patched copy of the LoRA'd layers (what one statically applied LoRA holds); 0 recomputes.
        """
        self.base_model = base_model
        self.options = patches_per_option
        self.keys = sorted({k for opt in patches_per_option for k in opt})
        self.originals: dict[str, torch.nn.Parameter] = {}
        self.active = None
        self.cached_sets = cached_sets
        self._cache: "OrderedDict[object, dict[str, torch.nn.Parameter]]" = OrderedDict()

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

    def activate(self, option: "int | tuple[float, ...] | None") -> bool:
        """Bake an option into the weights; returns whether anything changed.

        ``option`` is an entry index, ``None`` (no LoRA: the original Parameters, free), or a tuple of
        per-entry weights (several LoRAs at once: their patch lists concatenated, strengths scaled).
        """
        if isinstance(option, tuple) and sum(1 for w in option if w != 0) == 1 and max(option) == 1.0:
            option = option.index(1.0)  # a one-hot vector is that entry: share its exact patch lists
        if isinstance(option, tuple) and not any(option):
            option = None
        if option == self.active:
            return False
        cached = self._cache.get(option)
        if cached is not None:
            self._cache.move_to_end(option)
            for key, param in cached.items():
                comfy.utils.set_attr(self.base_model, key, param)
        else:
            for key in self.keys:
                self._set(key, self.patch_lists(option, key))
            if option is not None and self.cached_sets > 0:
                self._cache[option] = {k: comfy.utils.get_attr(self.base_model, k) for k in self.keys}
                while len(self._cache) > self.cached_sets:
                    self._cache.popitem(last=False)
        self.active = option
        return True

    def patch_lists(self, option, key: str) -> list | None:
        if option is None:
            return None
        if isinstance(option, int):
            return self.options[option].get(key)
        lists = []
        for weight, entry_option in zip(option, self.options):
            if weight != 0:
                lists += [(p[0] * weight, *p[1:]) for p in entry_option.get(key, [])]
        return lists or None

    def restore(self) -> None:
        """Put back exactly the Parameter objects that were there before (bit-identical weights)."""
        for key, original in self.originals.items():
            comfy.utils.set_attr(self.base_model, key, original)
        self.originals.clear()
        self._cache.clear()
        self.active = None
