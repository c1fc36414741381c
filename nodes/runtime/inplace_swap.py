"""Low-VRAM merged execution: the active LoRA written into the model's own weights, swapped as W += ΔW_new − ΔW_old.

``MergedSwapper`` keeps the weights found at the start of a run on the device beside one patched copy, so that
every swap is exact (bit-identical to core's static patching). On a GPU that is one copy of the LoRA'd layers
more than a static LoRA holds — ComfyUI keeps a static LoRA's originals on the offload device — 1.2 GB for an
SD1.5-sized UNet in fp32. ``InPlaceSwapper`` holds what a static LoRA holds:

* the originals of the patched layers in host memory (page-locked for a CUDA device), copied there at the run's
  first activation and copied back at its end, so the weights after the run are bit-identical to before;
* the patched weights in the model's own Parameters, rewritten in place. Plain LoRA / LoCon patches (the common
  case) are swapped with ``addmm_`` straight into the weight: ``W.addmm_(up_old, down_old, alpha=−f_old)``, then
  ``W.addmm_(up_new, down_new, alpha=f_new)`` — no scratch, a GEMM of rank r per term. Anything else (LoHa, LoKr,
  DoRA, a Tucker mid, slices, offsets) is not additive in low rank: that layer's original is copied back from
  host memory and the new patch list applied from it with core's own arithmetic (``core_patched_weight``).

Every incremental update rounds once, so the weights drift from ``W0 + ΔW`` by about one unit in the last place
per update, systematically in the worst elements (measured on a 640×640 layer, rank 16, cycling 3 LoRAs: max error
4e-7 of max|W| after 16 swaps in fp32, 3e-3 in fp16, 2e-2 in bf16). So every ``refresh_every``-th update of a layer
rewrites it from its original instead (default 16 updates for fp32 weights, 2 for half precision); tests bound the
error against core's static patching. The result equals core's up to that rounding — not bit for bit, which is
what ``MergedSwapper`` is for where its copy fits.
"""
from __future__ import annotations

import torch

from .lowrank_terms import LowRankTerms
from .merged_swap import (_FAST_DTYPES, _Layer, core_patched_weight, layer_merge_obstacle, normalize_option,
                          option_patch_lists, patched_keys, resolve_layers)

REFRESH_EVERY = {torch.float32: 16}  # incremental updates of a layer between rewrites from its original
HALF_REFRESH_EVERY = 2  # fp16 / bf16: an update's rounding is 2^13 (2^16) times coarser than fp32's
_ALIGN = 64  # bytes: every layer's backup starts aligned in the flat host buffer


def in_place_obstacle(base_model: torch.nn.Module, patches_per_option: list[dict[str, list]]) -> str | None:
    """Why the model's weights cannot be swapped in place (None if they can): a weight stored in another form than
    it computes in (quantized layers, ``set_func`` / ``convert``), or two keys sharing one tensor (tied weights
    would be patched twice); and whatever no swapper can merge (``merge_obstacle``)."""
    seen: dict[int, str] = {}
    for layer in resolve_layers(base_model, patched_keys(patches_per_option)):
        key = layer.key
        obstacle = layer_merge_obstacle(layer)
        if obstacle is not None:
            return obstacle
        if layer.set_func is not None or layer.convert is not None:
            return f"{key} is stored in another form than it computes in (quantized)"
        pointer = layer.original.data_ptr()
        if pointer in seen:
            return f"{key} and {seen[pointer]} share one tensor"
        seen[pointer] = key
    return None


def backup_bytes(base_model: torch.nn.Module, patches_per_option: list[dict[str, list]]) -> int:
    """Host memory an ``InPlaceSwapper`` holds during a run: the originals of every patched layer (aligned)."""
    return sum(_aligned(layer.original) for layer in resolve_layers(base_model, patched_keys(patches_per_option)))


def _aligned(weight: torch.Tensor) -> int:
    nbytes = weight.numel() * weight.element_size()
    return -(-nbytes // _ALIGN) * _ALIGN


def pinned_host_weights(weights: list[torch.Tensor]) -> bool:
    """Whether some weights live in page-locked host memory while CUDA is in use: ComfyUI 0.9.x pins offloaded
    (LowVram) weights in place and streams them to the GPU asynchronously, so a copy may still be reading one when
    the host is about to rewrite it."""
    return torch.cuda.is_available() and torch.cuda.is_initialized() and any(
        w.device.type == "cpu" and w.is_pinned() for w in weights)


def _host_buffer(nbytes: int, pinned: bool) -> torch.Tensor:
    """A flat byte buffer in host memory: page-locked when asked (copies to and from a GPU then run without the host
    waiting), pageable where none is to be had (the copies still work, the host waits)."""
    if pinned:
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(nbytes, dtype=torch.uint8)


class _Slot:
    """One patched weight, written in place: its Parameter, the original's host copy, and how far it has drifted."""

    __slots__ = ("layer", "weight", "matrix", "backup", "updates", "dirty", "refresh_every")

    def __init__(self, layer: _Layer, backup: torch.Tensor, refresh_every: int):
        self.layer, self.weight, self.backup = layer, layer.original, backup
        # the weight as [out, in·k·k] for addmm_ (a view: writes land in the Parameter); None if it cannot be one
        self.matrix = (self.weight.view(self.weight.shape[0], -1)
                       if self.weight.dim() >= 2 and self.weight.is_contiguous() else None)
        self.updates = 0  # incremental updates since the weight was last written from its original
        self.dirty = False  # the weight differs from its original
        self.refresh_every = refresh_every

    def reset(self) -> None:
        """Copy the original back (from host memory; stream-ordered before whatever the device does next)."""
        if self.dirty:
            self.weight.copy_(self.backup, non_blocking=self.backup.is_pinned())
        self.dirty, self.updates = False, 0


class _General:
    """A patch list only ``calculate_weight`` applies right: written from the layer's original every time."""

    __slots__ = ("patches",)

    def __init__(self, patches: list):
        self.patches = patches


class InPlaceSwapper:
    """Swap per-layer patch lists into a loaded model's own weights; same interface as ``MergedSwapper``."""

    def __init__(self, base_model: torch.nn.Module, patches_per_option: list[dict[str, list]],
                 terms: LowRankTerms | None = None):
        """``patches_per_option[j][key]`` is the ComfyUI patch list (as in ``ModelPatcher.patches``).
        ``terms``: the options' ``LowRankTerms``, kept by the caller across runs (made here if not given)."""
        self.base_model = base_model
        self.options = patches_per_option
        self.keys = patched_keys(patches_per_option)
        self.terms = terms if terms is not None else LowRankTerms(patches_per_option)
        self.active = None
        self.fast_writes = 0  # layers updated incrementally with addmm_ (diagnostics, tests)
        self.exact_writes = 0  # layers written from their original (general patches, refreshes)
        self._slots: list[_Slot] = []
        self._plans: dict[object, list] = {}  # option → per slot: None, [(factor, up, down)] or _General
        self._active_plan: list | None = None
        self._wait_for_device = False  # see pinned_host_weights: wait before rewriting host-resident weights

    # -- the run's start: host copies of the originals ----------------------------------------------
    def _start(self) -> None:
        layers = resolve_layers(self.base_model, self.keys)
        flat = _host_buffer(sum(_aligned(layer.original) for layer in layers),
                            pinned=any(layer.original.device.type == "cuda" for layer in layers))
        offset = 0  # every slot's backup is a view of the flat buffer (which those views keep alive)
        for layer in layers:
            weight = layer.original
            nbytes = weight.numel() * weight.element_size()
            backup = flat[offset:offset + nbytes].view(weight.dtype).view(weight.shape)
            offset += _aligned(weight)
            # page-locked: one asynchronous transfer, ordered before the writes that follow on the same stream
            backup.copy_(weight.detach(), non_blocking=backup.is_pinned())
            self._slots.append(_Slot(layer, backup, REFRESH_EVERY.get(weight.dtype, HALF_REFRESH_EVERY)))
        self._wait_for_device = pinned_host_weights([layer.original for layer in layers])

    # -- plans: an option's per-layer work, worked out at its first activation in a run ---------------
    def _plan(self, option) -> list | None:
        if option is None:
            return None
        plan = self._plans.get(option)
        if plan is not None:
            return plan
        plan = []
        for slot in self._slots:
            patches = option_patch_lists(self.options, option, slot.layer.key)
            if not patches:
                plan.append(None)
                continue
            terms = self._device_terms(slot, option, patches)
            plan.append(terms if terms is not None else _General(patches))
        if not isinstance(option, tuple):  # mixtures' weight vectors may change every step: not worth keeping
            self._plans[option] = plan
        return plan

    def _device_terms(self, slot: _Slot, option, patches: list):
        """The layer's patch list as (factor, up, down) in the weight's dtype on its device, or None."""
        weight = slot.weight
        if slot.matrix is None or weight.dtype not in _FAST_DTYPES:
            return None
        return self.terms.on_device(option, slot.layer.key, patches, weight.device, weight.dtype,
                                    tuple(slot.matrix.shape))

    # -- swapping ------------------------------------------------------------------------------------
    def activate(self, option: "int | tuple[float, ...] | None") -> bool:
        """Write an option into the weights (see ``MergedSwapper.activate``); returns whether anything changed."""
        option = normalize_option(option)
        if option == self.active:
            return False
        if not self._slots:
            if option is None:
                return False
            self._start()
        before, after = self._active_plan, self._plan(option)
        if self._wait_for_device:  # the previous model call's transfers from these weights must be done
            torch.cuda.synchronize()
        with torch.no_grad():
            for i, slot in enumerate(self._slots):
                self._swap(slot, before[i] if before else None, after[i] if after else None)
        self.active, self._active_plan = option, after
        return True

    def _swap(self, slot: _Slot, before, after) -> None:
        if before is None and after is None:
            return
        incremental = not isinstance(before, _General) and not isinstance(after, _General)
        if incremental and slot.updates < slot.refresh_every:
            for factor, up, down in before or ():
                slot.matrix.addmm_(up, down, alpha=-factor)
            for factor, up, down in after or ():
                slot.matrix.addmm_(up, down, alpha=factor)
            slot.updates += 1
            slot.dirty = True
            self.fast_writes += 1
            return
        slot.reset()  # from the original: no drift carried over
        self.exact_writes += 1
        if isinstance(after, _General):
            out = core_patched_weight(slot.layer.key, slot.weight, after.patches)
            if out.shape != slot.weight.shape:
                raise RuntimeError(f"{slot.layer.key}: its patched weight has shape {tuple(out.shape)}, the model's "
                                   f"{tuple(slot.weight.shape)}; strategy merged-lowvram cannot write it in place "
                                   "(use merged or unmerged).")
            slot.weight.copy_(out)
        elif after is not None:
            for factor, up, down in after:
                slot.matrix.addmm_(up, down, alpha=factor)
        else:
            return
        slot.dirty = True
        slot.updates = 1 if not isinstance(after, _General) else 0

    def restore(self) -> None:
        """Copy every original back into its Parameter (bit-identical weights; the Parameters were never replaced)."""
        if self._wait_for_device:
            torch.cuda.synchronize()
        with torch.no_grad():
            for slot in self._slots:
                slot.reset()
        # The page-locked buffer may be freed once the copies are queued: torch's host allocator does not hand it
        # out again before the transfers that read it have finished.
        self._slots = []
        self._wait_for_device = False
        self._plans.clear()
        self._active_plan = None
        self.terms.release()
        self.active = None
