"""Attach trainable low-rank residuals to a clone of the MODEL (and CLIP) and take them off again.

Mechanism (everything is undone in ``__exit__``, also after errors and interrupts):

* the MODEL (and, when the text encoder trains, the CLIP) is **cloned**; a rank-relaxed run adds
  the initial LoRA to the clone as ordinary weight patches (``apply_lora_set``), so ComfyUI
  computes W + ΔW0 exactly as *Load LoRA* would and restores W from its backup on unload;
* the clone is loaded with ``load_models_gpu(force_full_load=True)`` like core's ``TrainLoraNode``;
* a **forward hook** on each target module adds ``scale · up(down(x))`` (``F.linear`` or
  ``F.conv2d`` with the module's stride/padding) — the low-rank residual is never materialised as
  a dense matrix and no gradient w.r.t. the base weight is computed (core's weight-adapter path
  rebuilds W + BA densely every forward and back-propagates a dense weight gradient into it);
* base parameters get ``requires_grad = False`` for the run (the previous flags are restored);
* weights created under ``torch.inference_mode`` (every model ComfyUI loads in a graph) cannot be
  saved for backward, nor can such weights after ComfyUI moved them to the GPU (``autograd_alias``).
  After loading, each such parameter is swapped for a zero-copy **alias** (a
  normal tensor on the same storage, ``Tensor.set_``) for the run and put back before unloading,
  so no weight is copied (core's path holds a W + BA copy of every layer for the backward pass).
  Tensor subclasses (quantised weights) cannot be aliased: they get an identity weight wrapper
  (``add_weight_wrapper``), which makes ``comfy.ops`` cast a fresh copy per forward;
* when the text encoder trains, its LayerNorms get a pre-hook cloning their input: ComfyUI's CLIP
  layers add the residual in place, which autograd refuses once a norm saved its input;
* optional **gradient checkpointing**: the UNet's highest non-container modules (res blocks,
  transformers…, the same granularity as core) run under ``torch.utils.checkpoint``; their
  ``forward`` is overridden on the instance and restored afterwards;
* finally the clone is unloaded (weights restored bit for bit from ComfyUI's backup) and dropped
  from ComfyUI's loaded-model list, and the wrappers are removed from the modules.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import comfy.model_management as mm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from ..patching import apply_lora_set
from .autograd_alias import alias, aliasable, untracked_by_autograd
from .targets import CLIP, UNET, TargetLayer

log = logging.getLogger("LoRA Composer")

PRECISIONS = ("auto", "fp32", "bf16")


class _FreshWeight:
    """Identity weight/bias function: its presence makes comfy.ops copy the weight each forward."""

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return weight


_FRESH = _FreshWeight()


class _LoraHook:
    """Forward hook adding the current low-rank residual of one layer to its output."""

    def __init__(self, factors: dict, layer: TargetLayer):
        self.factors = factors
        self.layer = layer

    def __call__(self, module, args, output):
        current = self.factors.get(self.layer.key)
        if current is None:
            return None
        up, down, scale = current
        x = args[0]
        compute = None if _autocast_on(x.device.type) else x.dtype
        cast = (lambda t: t.to(compute)) if compute is not None else (lambda t: t)
        if self.layer.kind == "linear":
            h = F.linear(x, cast(down))
            if scale != 1.0:
                h = h * scale
            delta = F.linear(h, cast(up))
        else:
            lay = self.layer
            h = F.conv2d(x, cast(down), None, lay.stride, lay.padding, lay.dilation)
            if scale != 1.0:
                h = h * scale
            delta = F.conv2d(h, cast(up))
        return output + delta.to(output.dtype)


def _clone_input(module, args):
    """Pre-hook for text-encoder norms: ComfyUI's CLIP layers update the residual in place
    (``x += self_attn(layer_norm1(x))``), which autograd refuses once the norm saved ``x``."""
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (args[0].clone(),) + tuple(args[1:])
    return None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """Highest non-container modules with parameters (core's ``find_all_highest_child_module_with_forward``)."""
    found: list[torch.nn.Module] = []

    def walk(module: torch.nn.Module) -> None:
        for child in module.children():
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)):
                walk(child)
            elif next(child.parameters(), None) is not None:
                found.append(child)

    walk(root)
    return found


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = run in fp32 / the model's dtype)."""
    if precision not in PRECISIONS:
        raise ValueError(f"training_dtype must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


class TrainingSession:
    """Context manager: a trainable view of ``model`` (+ ``clip``) whose residuals are ``factors``.

    ``factors`` maps a target key to ``(up, down, scale)``; assign a new dict to ``.factors``
    contents each step (``set_factors``). Use ``predict_x0`` for forward passes.
    """

    def __init__(self, model, clip, targets: list[TargetLayer], *, gradient_checkpointing: bool = False,
                 precision: str = "auto", initial_set=None):
        self.source_model = model
        self.source_clip = clip
        self.targets = targets
        self.gradient_checkpointing = gradient_checkpointing
        self.precision = precision
        self.initial_set = initial_set
        self.trains_clip = any(t.owner == CLIP for t in targets)
        self.factors: dict = {}
        self.model = None
        self.clip = None
        self.autocast_dtype: torch.dtype | None = None
        self._hooks: list = []
        self._forwards: list[tuple[torch.nn.Module, object]] = []
        self._grad_flags: list[tuple[torch.nn.Parameter, bool]] = []
        self._patchers: list = []
        self._aliased: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []

    # ------------------------------------------------------------------ set-up / tear-down
    def __enter__(self) -> "TrainingSession":
        try:
            self._attach()
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._detach()

    @property
    def device(self) -> torch.device:
        return self.model.load_device

    @property
    def base_model(self):
        return self.model.model

    def _attach(self) -> None:
        if self.initial_set is not None:
            self.model, self.clip, _ = apply_lora_set(self.source_model, self.source_clip, self.initial_set)
        else:
            self.model = self.source_model.clone()
            self.clip = self.source_clip
        if self.trains_clip and self.clip is self.source_clip:
            self.clip = self.source_clip.clone()
        self.autocast_dtype = resolve_precision(self.precision, self.model.load_device)
        if self.autocast_dtype is None and self.model.model_dtype() != torch.float32:
            # fp16 weights without autocast would back-propagate fp16 gradients: compute in fp32
            self.model.set_model_compute_dtype(torch.float32)
        self._patchers = [self.model] + ([self.clip.patcher] if self.trains_clip else [])
        for patcher in self._patchers:
            self._add_fresh_weight_wrappers(patcher)  # only tensor subclasses; plain tensors are aliased
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        # like core: training needs every byte ComfyUI can free, and the model fully loaded. Loaded under
        # inference mode, as ComfyUI's executor loads: a device move made with autograd on leaves weights made
        # under inference mode without a version counter, unusable even for inference (autograd_alias).
        with torch.inference_mode():
            mm.load_models_gpu(self._patchers, memory_required=1e20, force_full_load=True)
        for patcher in self._patchers:
            self._alias_untracked_parameters(patcher.model)
        for patcher in self._patchers:
            for p in patcher.model.parameters():
                self._grad_flags.append((p, p.requires_grad))
                p.requires_grad_(False)
        roots = {UNET: self.model.model.diffusion_model, CLIP: self.clip.cond_stage_model if self.clip else None}
        for layer in self.targets:
            module = roots[layer.owner].get_submodule(layer.module_path)
            self._hooks.append(module.register_forward_hook(_LoraHook(self.factors, layer)))
        if self.trains_clip:
            for module in self.clip.cond_stage_model.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    self._hooks.append(module.register_forward_pre_hook(_clone_input))
        if self.gradient_checkpointing:
            for module in checkpoint_modules(self.model.model.diffusion_model):
                previous = module.__dict__.get("forward")
                self._forwards.append((module, previous))
                module.forward = functools.partial(_checkpointed, module.forward)

    @staticmethod
    def _add_fresh_weight_wrappers(patcher) -> None:
        for name, module in patcher.model.named_modules():
            if not hasattr(module, "weight_function"):
                continue
            for attr in ("weight", "bias"):
                tensor = getattr(module, attr, None)
                if isinstance(tensor, torch.Tensor) and untracked_by_autograd(tensor) and not aliasable(tensor):
                    patcher.add_weight_wrapper(f"{name}.{attr}", _FRESH)

    def _alias_untracked_parameters(self, root: torch.nn.Module) -> None:
        for module in root.modules():
            for attr, tensor in list(module._parameters.items()):
                if tensor is not None and untracked_by_autograd(tensor) and aliasable(tensor):
                    module._parameters[attr] = torch.nn.Parameter(alias(tensor), requires_grad=False)
                    self._aliased.append((module, attr, tensor))

    def _detach(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module, previous in reversed(self._forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = previous
        self._forwards.clear()
        with torch.inference_mode():  # inference tensors accept requires_grad=True only in inference mode
            for p, flag in self._grad_flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
        self._grad_flags.clear()
        for module, attr, original in reversed(self._aliased):
            module._parameters[attr] = original
        self._aliased.clear()
        extra = [self.clip.patcher] if self.clip is not None and self.clip is not self.source_clip else []
        for patcher in self._patchers + [p for p in extra if p not in self._patchers]:
            unload_patcher(patcher)  # our clones only (a LoRA-patched CLIP clone gets loaded by encoding)
            for module in patcher.model.modules():
                for attr in ("weight_function", "bias_function"):
                    functions = module.__dict__.get(attr)
                    if functions and any(f is _FRESH for f in functions):
                        setattr(module, attr, [f for f in functions if f is not _FRESH])
        self._patchers = []
        self.factors.clear()

    # ------------------------------------------------------------------ forward
    def set_factors(self, factors: dict) -> None:
        self.factors.clear()
        self.factors.update(factors)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def predict_x0(self, x_t: torch.Tensor, sigma: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The model's denoised prediction (x0) for noisy ``x_t`` at ``sigma``, through ``apply_model``."""
        options = dict(self.model.model_options.get("transformer_options", {}))
        options["sigmas"] = sigma
        options["cond_or_uncond"] = [0]
        with self.autocast():
            out = self.base_model.apply_model(x_t, sigma, transformer_options=options, **kwargs)
        return out.float()


def unload_patcher(patcher) -> None:
    """Unload one patcher (weights restored from ComfyUI's backup) and forget it in model management."""
    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is patcher:
            try:
                with torch.inference_mode():  # the move back to the offload device, as ComfyUI makes it
                    loaded.model_unload()
            finally:
                mm.current_loaded_models.pop(i)
