"""Merged-weight execution: the active LoRA is baked into the weights, swapped when it changes.

A swap computes each patched layer exactly as ComfyUI's ``ModelPatcher.patch_weight_to_device``
does (same compute dtype, ``comfy.lora.calculate_weight``, same stochastic rounding seed), from the
weight that was in the model when sampling started. So one active LoRA gives bit-identical weights
to static application, and switching never accumulates rounding error (no W + Δa − Δa).

Memory: the Parameter objects found at the start are kept by reference (as ComfyUI's own backup
does) and put back at the end, so besides the LoRA tensors we hold one patched copy per layer — the
same as one statically applied LoRA — plus one layer's temporary while computing. On a GPU the
fast path's LoRA factors are moved to it once per run (the LoRA tensors on the device).

Speed: a switch is paid inside the sampling loop, so plain low-rank patches (the common case; fp32,
fp16 or bf16 weights, any compute dtype core uses) take a fast path that rewrites the previous patched
copy in place — ``copy_`` of the original, then ``up @ down`` scaled and added in exactly core's
operation order and dtypes (still bit-identical) — instead of allocating a fresh copy per layer and
going through ``calculate_weight`` (fresh allocations page-fault on first touch, which on CPU costs as
much as the arithmetic; on a GPU core's path re-uploads the LoRA factors for every layer and swap).
Everything else goes through ``calculate_weight``.
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


_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def patched_keys(patches_per_option: list[dict[str, list]]) -> list[str]:
    """Every weight key some option patches, in a fixed order."""
    return sorted({k for opt in patches_per_option for k in opt})


def held_bytes(base_model: torch.nn.Module, patches_per_option: list[dict[str, list]], cached_sets: int = 0) -> int:
    """Upper bound of what a ``MergedSwapper`` over these options holds beside the model's own weights: one patched
    copy of every patched weight (plus one per cached set) and the two scratch buffers of ``_scratch_for``, counted
    as the largest layer in fp32 each (the "work" one is only needed, and narrower, when core computes in another
    dtype)."""
    weights = [comfy.utils.get_attr(base_model, k) for k in patched_keys(patches_per_option)]
    copy = sum(w.numel() * w.element_size() for w in weights)
    largest = max((w.numel() for w in weights), default=0)
    return copy * (1 + cached_sets) + 2 * 4 * largest


def _compute_dtype(device) -> torch.dtype:
    # 0.9.2 may compute LoRA patches in fp16 on GPUs; 0.3.64 always used fp32. Match the running core.
    return mm.lora_compute_dtype(device) if hasattr(mm, "lora_compute_dtype") else torch.float32


class MergedSwapper:
    """Swap per-layer patch lists into a loaded model and restore the original Parameters."""

    def __init__(self, base_model: torch.nn.Module, patches_per_option: list[dict[str, list]], cached_sets: int = 0):
        """``patches_per_option[j][key]`` is the ComfyUI patch list (as in ``ModelPatcher.patches``).

        ``cached_sets``: how many computed weight sets to keep for instant re-activation. Each costs one
        patched copy of the LoRA'd layers (what one statically applied LoRA holds); 0 recomputes.
        The first sets computed stay (no eviction): mixtures visit their options cyclically, and an
        LRU cache smaller than the cycle would miss on every access.
        """
        self.base_model = base_model
        self.options = patches_per_option
        self.keys = patched_keys(patches_per_option)
        self.originals: dict[str, torch.nn.Parameter] = {}
        self.active = None
        self.cached_sets = cached_sets
        self._cache: dict[object, dict[str, torch.nn.Parameter]] = {}
        # Patched Parameters of ours that nothing else refers to (not in the model, not cached): reused in place.
        self._spare: dict[str, torch.nn.Parameter] = {}
        self._scratch: dict[str, torch.Tensor] = {}  # one layer's fp32 ΔW ("product") / cast weight ("work")
        # Fast-path factors moved to the weights' device once per run (the LoRA tensors on the device: without
        # this every swap re-uploads them, measured as most of a swap's cost on a GPU).
        self._device_factors: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _set(self, key: str, patches: list | None) -> None:
        weight, set_func, convert_func = get_key_weight(self.base_model, key)
        if key not in self.originals:
            self.originals[key] = comfy.utils.get_attr(self.base_model, key)
        original = self.originals[key]
        current = comfy.utils.get_attr(self.base_model, key)
        if current is not original and not self._is_cached(key, current):
            self._spare[key] = current  # about to be replaced: free for in-place reuse
        if not patches:
            comfy.utils.set_attr(self.base_model, key, original)
            return
        if set_func is not None:
            raise NotImplementedError(f"{key}: quantized weights need the unmerged runtime")
        if convert_func is None and self._fast_lowrank(key, original, patches):
            return
        temp = original.to(_compute_dtype(original.device), copy=True)
        if convert_func is not None:
            temp = convert_func(temp, inplace=True)
        out = comfy.lora.calculate_weight(patches, temp, key)
        if comfy_float is not None and original.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            out = comfy_float.stochastic_rounding(out, original.dtype, seed=string_to_seed(key))
        else:  # stochastic_rounding is a plain cast for these dtypes (its seed only matters for fp8)
            out = out.to(original.dtype)
        self._spare.pop(key, None)
        comfy.utils.set_attr_param(self.base_model, key, out)

    def _is_cached(self, key: str, param) -> bool:
        return any(cached.get(key) is param for cached in self._cache.values())

    def _fast_lowrank(self, key: str, original: torch.Tensor, patches: list) -> bool:
        """``original + Σ strength·scale·(up @ down)`` into a reused buffer; False if not plain LoRA.

        Same operations in the same order and dtypes as ``patch_weight_to_device`` → ``calculate_weight`` →
        ``LoRAAdapter.calculate_weight``: the weight cast to ComfyUI's LoRA compute dtype (fp32, or fp16 where
        0.9.2's ``lora_compute_dtype`` picks it on a GPU), the fp32 product scaled once, cast to that dtype and
        added, the sum cast back to the weight's dtype (``stochastic_rounding`` is a plain cast for fp32, fp16
        and bf16). So the result is bit-identical, with no per-layer allocation besides the fp32 product.
        """
        compute = _compute_dtype(original.device)
        if original.dtype not in _FAST_DTYPES or compute not in _FAST_DTYPES:
            return False
        factors = []
        for p in patches:
            strength, adapter, strength_model, offset, function = p[:5]
            if strength_model != 1.0 or offset is not None or function is not None:
                return False
            if getattr(adapter, "name", None) != "lora" or not isinstance(getattr(adapter, "weights", None), tuple):
                return False
            w = adapter.weights
            if len(w) < 5 or w[3] is not None or w[4] is not None or (len(w) > 5 and w[5] is not None):
                return False  # mid (Tucker), DoRA or reshape: the general path
            if not isinstance(w[2], (float, int, type(None))):
                return False
            up, down = self._factors_on(original.device, w[0], w[1])
            if up.shape[0] * down.shape[1] != original.numel():
                return False
            scale = 1.0 if w[2] is None else w[2] / w[1].shape[0]
            factors.append((strength * scale, up, down))
        buffer = self._spare.pop(key, None)
        if buffer is None or buffer.shape != original.shape or buffer.device != original.device:
            buffer = torch.nn.Parameter(torch.empty_like(original), requires_grad=False)
        product = self._scratch_for(original, "product", torch.float32)
        if compute == original.dtype:
            work = buffer
        else:
            work = self._scratch_for(original, "work", compute).view(original.shape)
        with torch.no_grad():
            work.copy_(original)  # the cast to the compute dtype, when it differs
            for factor, up, down in factors:
                delta = product.view(up.shape[0], down.shape[1])
                torch.mm(up, down, out=delta)
                delta.mul_(factor)
                delta = delta.view(original.shape)
                work.add_(delta if compute == torch.float32 else delta.to(compute))
            if work is not buffer:
                buffer.copy_(work)
        comfy.utils.set_attr(self.base_model, key, buffer)
        return True

    def _factors_on(self, device: torch.device, up: torch.Tensor, down: torch.Tensor):
        """``up``/``down`` as flattened fp32 matrices on ``device``, moved once per run and then reused."""
        if up.device == device and down.device == device:
            return up.to(torch.float32).flatten(1), down.to(torch.float32).flatten(1)
        hit = self._device_factors.get(id(up))
        if hit is None or hit[0] is not up:  # keyed by identity; the source is held so the id stays its own
            hit = (up, up.to(device, torch.float32).flatten(1), down.to(device, torch.float32).flatten(1))
            self._device_factors[id(up)] = hit
        return hit[1], hit[2]

    def _scratch_for(self, like: torch.Tensor, role: str, dtype: torch.dtype) -> torch.Tensor:
        """A flat ``dtype`` buffer of ``like.numel()`` elements for ``role`` (the fp32 product, or the weight cast
        to the compute dtype), sized once to the largest patched layer."""
        scratch = self._scratch.get(role)
        if scratch is None or scratch.numel() < like.numel() or scratch.device != like.device or scratch.dtype != dtype:
            largest = max((comfy.utils.get_attr(self.base_model, k).numel() for k in self.keys), default=0)
            scratch = torch.empty(max(largest, like.numel()), dtype=dtype, device=like.device)
            self._scratch[role] = scratch
        return scratch[:like.numel()]

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
            for key, param in cached.items():
                current = comfy.utils.get_attr(self.base_model, key)
                if current is not self.originals.get(key, current) and not self._is_cached(key, current):
                    self._spare[key] = current
                comfy.utils.set_attr(self.base_model, key, param)
        else:
            for key in self.keys:
                self._set(key, self.patch_lists(option, key))
            if option is not None and len(self._cache) < self.cached_sets:
                self._cache[option] = {k: comfy.utils.get_attr(self.base_model, k) for k in self.keys}
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
        self._spare.clear()
        self._device_factors.clear()
        self._scratch = {}
        self.active = None
