"""Merged-weight execution: the active LoRA is baked into the weights, swapped when it changes.

A swap computes each patched layer exactly as ComfyUI's ``ModelPatcher.patch_weight_to_device``
does (same compute dtype, ``comfy.lora.calculate_weight``, same stochastic rounding seed), from the
weight that was in the model when sampling started. So one active LoRA gives bit-identical weights
to static application, and switching never accumulates rounding error (no W + Δa − Δa).

Memory: the Parameter objects found at the start are kept by reference (as ComfyUI's own backup
does) and put back at the end, so besides the LoRA tensors we hold one patched copy per layer — the
same as one statically applied LoRA — plus scratch the size of the largest layer (at most 8 bytes per
element, see ``held_bytes``). On a GPU the fast path's LoRA factors are moved to it once per run, in one
copy (``LowRankTerms``: the LoRA tensors on the device). On a GPU that patched copy is one more than a static LoRA
holds (core keeps a static LoRA's originals on the offload device); ``inplace_swap.InPlaceSwapper`` is the form
without it. Only Parameters this swapper made are ever rewritten in place.

Speed: a switch is paid inside the sampling loop, and on a GPU its arithmetic is small (21 ms of device
time for 4 swaps of 192 layers of an 859 M UNet on an H100) while its host time was not: kernel launches
and Python per layer. So plain low-rank patches (the common case; fp32, fp16 or bf16 weights, any compute
dtype core uses) take a fast path: one ``mm`` per layer into scratch, then the scaling, casts and additions
for a whole group of layers as ``torch._foreach_*`` calls, written into the previous patched copy in place,
in exactly core's operation order and dtypes (bit-identical). Everything an option's activation needs
besides the arithmetic (which layers, their terms on the device, scratch views) is worked out on its first
activation in a run and kept as its *plan*. Everything else goes through ``calculate_weight``.

Quantized layers (core's fp8 scaled / ``QuantizedTensor`` weights) are merged as core merges them: dequantized by
the layer's ``convert_weight``, patched, and quantized back by its ``set_weight`` with the key's seed, so the result
is the static LoRA's bit for bit. Weights in a form only another pack can patch (``merge_obstacle``) run unmerged.
"""
from __future__ import annotations

import inspect
import weakref

import comfy.lora
import comfy.model_management as mm
import comfy.utils
import torch
from comfy.model_patcher import string_to_seed

from ..patching import foreign_storage
from .lowrank_terms import LowRankTerms

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
    copy of every patched weight (plus one per cached set) and the scratch ``_group`` allocates, the largest layer
    in at most 8 bytes per element (the fp32 product, plus either an fp32 work copy or the fp16 scaled product and
    fp16 work copy when core computes in fp16)."""
    weights = [layer.original for layer in resolve_layers(base_model, patched_keys(patches_per_option))]
    copy = sum(map(stored_bytes, weights))
    largest = max((w.numel() for w in weights), default=0)
    return copy * (1 + cached_sets) + 2 * 4 * largest


def resolve_layers(model: torch.nn.Module, keys: list[str]) -> "list[_Layer]":
    """``_Layer`` s for ``keys``, their modules found through one ``named_modules`` walk: resolving every path with
    ``get_attr`` and core's ``get_key_weight`` (two failing attribute lookups per layer) took 30 µs a key, ≈ 6 ms per
    run for SD1.5's 192 LoRA'd layers, each time a run starts swapping."""
    modules = dict(model.named_modules())
    return [_Layer(model, key, modules) for key in keys]


def _layer_method(module: torch.nn.Module, attribute: str):
    """``getattr(module, attribute)`` where the layer defines it (class or instance), else None: what core's
    ``get_key_weight`` finds by catching AttributeError, without raising one per layer."""
    if hasattr(type(module), attribute) or attribute in module.__dict__:
        return getattr(module, attribute)
    return None


def merge_obstacle(base_model: torch.nn.Module, patches_per_option: list[dict[str, list]]) -> str | None:
    """Why these weights cannot be merged by a swapper (None if they can): the first ``layer_merge_obstacle``."""
    for layer in resolve_layers(base_model, patched_keys(patches_per_option)):
        obstacle = layer_merge_obstacle(layer)
        if obstacle is not None:
            return obstacle
    return None


def layer_merge_obstacle(layer: "_Layer") -> str | None:
    """Why a swapper cannot merge into this layer (None if it can). Core's quantized layers (fp8 scaled,
    ``QuantizedTensor``) are merged the way core merges them, through the layer's own ``set_weight``; a weight some
    other pack stores in its own form (a tensor subclass or an integer dtype without ``set_weight``, as GGUF's packed
    blocks) only that pack knows how to patch: a merge would write garbage into it. The forward hooks see only the
    layer's output, so those layers run unmerged."""
    weight = layer.original
    if layer.set_func is not None:
        if "return_weight" not in inspect.signature(layer.set_func).parameters:
            return f"{layer.key} is quantized by a layer whose set_weight cannot hand back the patched weight"
    elif foreign_storage(weight, convert=layer.convert):
        return f"{layer.key} is stored as {type(weight).__name__} / {weight.dtype}, a form only its own loader patches"
    return None


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds: for a wrapper subclass (core 0.9.x's ``QuantizedTensor``: fp8 data and a scale, while
    it reports the dtype it computes in) the tensors it flattens into, by PyTorch's subclass protocol."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is not None:
        names, _context = flatten()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _compute_dtype(device) -> torch.dtype:
    # 0.9.2 may compute LoRA patches in fp16 on GPUs; 0.3.64 always used fp32. Match the running core.
    return mm.lora_compute_dtype(device) if hasattr(mm, "lora_compute_dtype") else torch.float32


def normalize_option(option):
    """An option in its canonical form: a one-hot weight vector is that entry (its exact patch lists), an all-zero
    one is ``None`` (no LoRA)."""
    if isinstance(option, tuple) and sum(1 for w in option if w != 0) == 1 and max(option) == 1.0:
        return option.index(1.0)
    if isinstance(option, tuple) and not any(option):
        return None
    return option


def option_patch_lists(options: list[dict[str, list]], option, key: str) -> list | None:
    """The patch list ``option`` applies to ``key``: an entry's own, or for a weight vector every entry's lists
    with their strengths scaled by the entry's weight (several LoRAs at once); None where nothing patches it."""
    if option is None:
        return None
    if isinstance(option, int):
        return options[option].get(key)
    lists = []
    for weight, entry_option in zip(option, options):
        if weight != 0:
            lists += [(p[0] * weight, *p[1:]) for p in entry_option.get(key, [])]
    return lists or None


def core_patched_weight(key: str, original: torch.Tensor, patches: list, convert=None,
                        set_func=None) -> torch.Tensor:
    """``original`` with ``patches`` applied exactly as ``ModelPatcher.patch_weight_to_device`` does: a copy in the
    LoRA compute dtype, ``calculate_weight``, then core's rounding back to the weight's dtype (``stochastic_rounding``
    with the key's seed; a plain cast for fp32, fp16 and bf16, where its seed does not matter) — or, for a quantized
    layer, its own ``set_weight`` with that seed (``return_weight=True``: the stored form it would set, not set)."""
    temp = original.to(_compute_dtype(original.device), copy=True)
    if convert is not None:
        temp = convert(temp, inplace=True)
    out = comfy.lora.calculate_weight(patches, temp, key)
    if set_func is not None:
        return set_func(out, inplace_update=False, seed=string_to_seed(key), return_weight=True)
    if comfy_float is not None and original.dtype not in _FAST_DTYPES:
        return comfy_float.stochastic_rounding(out, original.dtype, seed=string_to_seed(key))
    return out.to(original.dtype)


class _Layer:
    """One patched weight: where it sits in the model and the Parameter found there at the start of the run, with
    its layer's ``set_<name>`` / ``convert_<name>`` as core's ``get_key_weight`` finds them."""

    __slots__ = ("key", "module", "name", "original", "convert", "set_func")

    def __init__(self, model: torch.nn.Module, key: str, modules: dict[str, torch.nn.Module] | None = None):
        self.key = key
        module_path, _, name = key.rpartition(".")
        module = modules.get(module_path) if modules is not None else None
        if module is None:
            module = comfy.utils.get_attr(model, module_path) if module_path else model
        self.module, self.name = module, name
        self.set_func = _layer_method(module, f"set_{name}")
        self.convert = _layer_method(module, f"convert_{name}")
        self.original = getattr(module, name)  # the Parameter itself

    def current(self):
        return getattr(self.module, self.name)

    def put(self, param) -> None:
        setattr(self.module, self.name, param)


class _LowRankGroup:
    """Layers whose patch is plain low rank, written together: ``original + Σ factor · (up @ down)`` in exactly
    core's operations, order and dtypes (``patch_weight_to_device`` → ``calculate_weight`` →
    ``LoRAAdapter.calculate_weight``): the weight in ComfyUI's LoRA compute dtype (fp32, or fp16 where 0.9.x's
    ``lora_compute_dtype`` picks it on a GPU), each fp32 product scaled once and cast to that dtype, added, the sum
    cast back to the weight's dtype (``stochastic_rounding`` is a plain cast for fp32, fp16 and bf16).

    On a GPU a swap's cost is launches, not arithmetic, so everything but the products runs as ``torch._foreach_*``
    calls over the whole group (one launch for many layers, the same per-element arithmetic as the plain ops).
    The group's layers together fit the scratch (the largest layer), so memory stays one layer's worth.
    Single-term layers are grouped; a layer with several terms is a group of its own (terms added one by one).
    """

    __slots__ = ("layers", "terms", "compute", "factors", "originals", "products", "products_2d", "deltas", "works")

    def __init__(self, views: "_ScratchViews", terms: list[list[tuple[float, torch.Tensor, torch.Tensor]]]):
        self.layers, self.terms, self.compute = views.layers, terms, views.compute
        self.factors = [layer_terms[0][0] for layer_terms in terms]
        self.originals = [layer.original for layer in self.layers]
        self.products, self.products_2d, self.deltas, self.works = (
            views.products, views.products_2d, views.deltas, views.works)

    def write(self, buffers: list[torch.Tensor]) -> None:
        originals = self.originals
        if len(self.terms) == 1 and len(self.terms[0]) > 1:
            self._write_terms(originals[0], buffers[0])
            return
        for (_factor, up, down), product in zip((t[0] for t in self.terms), self.products_2d):
            torch.mm(up, down, out=product)
        torch._foreach_mul_(self.products, self.factors)
        if self.compute == torch.float32:  # the weight's cast to fp32 is exact: add promotes, then casts back
            _foreach_copy(buffers, originals)
            torch._foreach_add_(buffers, self.products)
            return
        _foreach_copy(self.deltas, self.products)
        if self.works:  # fp16 compute for an fp32 or bf16 weight: core rounds the weight to fp16 before adding
            _foreach_copy(self.works, originals)
            torch._foreach_add_(self.works, self.deltas)
            _foreach_copy(buffers, self.works)
        else:
            _foreach_copy(buffers, originals)
            torch._foreach_add_(buffers, self.deltas)

    def _write_terms(self, original: torch.Tensor, buffer: torch.Tensor) -> None:
        compute = self.compute
        work = self.works[0] if self.works else buffer
        work.copy_(original)
        for factor, up, down in self.terms[0]:
            torch.mm(up, down, out=self.products_2d[0])
            self.products[0].mul_(factor)
            if compute == torch.float32:
                work.add_(self.products[0])
            else:
                work.add_(self.deltas[0].copy_(self.products[0]))
        if work is not buffer:
            buffer.copy_(work)


class _ScratchViews:
    """A group's layers laid out one after another in the shared scratch: each layer's views of the fp32 product,
    the product in the compute dtype and the weight in the compute dtype. The same for every option that groups
    the same layers, so made once per run and layer list (tensor views cost host time too)."""

    __slots__ = ("layers", "compute", "products", "products_2d", "deltas", "works")

    def __init__(self, layers: list[_Layer], compute: torch.dtype, scratch: "dict[str, torch.Tensor]"):
        self.layers, self.compute = layers, compute
        self.products, self.products_2d, self.deltas, self.works = [], [], [], []
        offset = 0
        for layer in layers:
            original = layer.original
            n = original.numel()
            self.products.append(scratch["product"][offset:offset + n].view(original.shape))
            self.products_2d.append(self.products[-1].view(original.shape[0], -1))
            if compute != torch.float32:
                self.deltas.append(scratch["delta"][offset:offset + n].view(original.shape))
            if compute != original.dtype:  # the sum is formed in the compute dtype, then cast to the weight's
                self.works.append(scratch["work"][offset:offset + n].view(original.shape))
            offset += n


def _foreach_copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):  # torch ≥ 2.1
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


class _Plan:
    """What one option's activation does per layer, worked out at its first activation in a run."""

    __slots__ = ("restore", "groups", "general")

    def __init__(self):
        self.restore: list[_Layer] = []  # layers the option leaves unpatched
        self.groups: list[_LowRankGroup] = []
        self.general: list[tuple[_Layer, list]] = []  # layers only calculate_weight can patch


class MergedSwapper:
    """Swap per-layer patch lists into a loaded model and restore the original Parameters."""

    def __init__(self, base_model: torch.nn.Module, patches_per_option: list[dict[str, list]], cached_sets: int = 0,
                 terms: LowRankTerms | None = None):
        """``patches_per_option[j][key]`` is the ComfyUI patch list (as in ``ModelPatcher.patches``).

        ``cached_sets``: how many computed weight sets to keep for instant re-activation. Each costs one
        patched copy of the LoRA'd layers (what one statically applied LoRA holds); 0 recomputes.
        The first sets computed stay (no eviction): mixtures visit their options cyclically, and an
        LRU cache smaller than the cycle would miss on every access.
        ``terms``: the options' ``LowRankTerms``, kept by the caller across runs (made here if not given).
        """
        self.base_model = base_model
        self.options = patches_per_option
        self.keys = patched_keys(patches_per_option)
        self.terms = terms if terms is not None else LowRankTerms(patches_per_option)
        self.originals: dict[str, torch.nn.Parameter] = {}
        self.active = None
        self.cached_sets = cached_sets
        self.fast_writes = 0  # layers written by the low-rank fast path (diagnostics, tests)
        self._layers: list[_Layer] = []
        self._plans: dict[object, _Plan] = {}
        self._cache: dict[object, dict[str, torch.nn.Parameter]] = {}
        # Patched Parameters of ours that nothing else refers to (not in the model, not cached): reused in place.
        self._spare: dict[str, torch.nn.Parameter] = {}
        self._scratch: dict[str, torch.Tensor] = {}  # role → flat buffer the size of the largest patched layer
        self._capacity = 0  # elements of the largest patched layer: a group's layers fit in it together
        self._views: dict[tuple[str, ...], _ScratchViews] = {}  # per group's layer keys, shared by the options
        # id → every live Parameter this run made (weak: a dropped one leaves, so an id never names another object)
        self._owned: "weakref.WeakValueDictionary[int, torch.nn.Parameter]" = weakref.WeakValueDictionary()

    # -- plans: everything about an option that does not change between its activations in a run -----
    def _plan(self, option) -> _Plan:
        plan = self._plans.get(option)
        if plan is not None:
            return plan
        if not self._layers:  # the first activation: nothing swapped yet, so these are the originals
            self._layers = resolve_layers(self.base_model, self.keys)
            self.originals = {layer.key: layer.original for layer in self._layers}
            self._capacity = max((layer.original.numel() for layer in self._layers), default=0)
        plan = _Plan()
        pending: list[tuple[_Layer, list]] = []  # single-term layers waiting to fill a group
        filled = 0  # their elements
        for layer in self._layers:
            patches = option_patch_lists(self.options, option, layer.key)
            if not patches:
                plan.restore.append(layer)
                continue
            terms = self._device_terms(layer, option, patches)
            if terms is None:
                plan.general.append((layer, patches))
            elif len(terms) > 1:
                plan.groups.append(self._group([(layer, terms)]))
            else:
                if pending and filled + layer.original.numel() > self._capacity:
                    plan.groups.append(self._group(pending))
                    pending, filled = [], 0
                pending.append((layer, terms))
                filled += layer.original.numel()
        if pending:
            plan.groups.append(self._group(pending))
        if not isinstance(option, tuple):  # mixtures' weight vectors may change every step: not worth keeping
            self._plans[option] = plan
        return plan

    def _device_terms(self, layer: _Layer, option, patches: list):
        """The layer's patch list as (factor, up, down) on the weight's device, or None for the general path."""
        original = layer.original
        if layer.convert is not None or layer.set_func is not None or original.dtype not in _FAST_DTYPES:
            return None
        if _compute_dtype(original.device) not in _FAST_DTYPES or original.dim() == 0 or not original.shape[0]:
            return None
        shape = (original.shape[0], original.numel() // original.shape[0])
        return self.terms.on_device(option, layer.key, patches, original.device, torch.float32, shape)

    def _group(self, members: list[tuple[_Layer, list]]) -> _LowRankGroup:
        like = members[0][0].original
        compute = _compute_dtype(like.device)
        roles = {"product": torch.float32}
        if compute != torch.float32:
            roles["delta"] = compute
        if any(layer.original.dtype != compute for layer, _ in members):
            roles["work"] = compute
        for role, dtype in roles.items():  # at most 8 bytes per element of the largest layer (held_bytes)
            if role not in self._scratch:
                self._scratch[role] = torch.empty(self._capacity, dtype=dtype, device=like.device)
        layers = [m[0] for m in members]
        key = tuple(layer.key for layer in layers)
        views = self._views.get(key)
        if views is None:
            views = self._views[key] = _ScratchViews(layers, compute, self._scratch)
        return _LowRankGroup(views, [m[1] for m in members])

    # -- swapping ------------------------------------------------------------------------------------
    def activate(self, option: "int | tuple[float, ...] | None") -> bool:
        """Bake an option into the weights; returns whether anything changed.

        ``option`` is an entry index, ``None`` (no LoRA: the original Parameters, free), or a tuple of
        per-entry weights (several LoRAs at once: their patch lists concatenated, strengths scaled).
        """
        option = normalize_option(option)
        if option == self.active:
            return False
        cached = self._cache.get(option)
        if cached is not None:
            for layer in self._layers:
                self._release(layer)
                layer.put(cached[layer.key])
        else:
            with torch.no_grad():
                self._apply(self._plan(option))
            if option is not None and len(self._cache) < self.cached_sets:
                self._cache[option] = {layer.key: layer.current() for layer in self._layers}
        self.active = option
        return True

    def _apply(self, plan: _Plan) -> None:
        for layer in plan.restore:
            self._release(layer)
            if layer.current() is not layer.original:
                layer.put(layer.original)
        for group in plan.groups:
            buffers, fresh = [], []
            for layer in group.layers:
                current = self._release(layer)
                buffer = self._spare.pop(layer.key, None)
                if buffer is None:
                    buffer = self._new_buffer(layer)
                buffers.append(buffer)
                if buffer is not current:
                    fresh.append((layer, buffer))
            group.write(buffers)
            self.fast_writes += len(buffers)
            for layer, buffer in fresh:
                layer.put(buffer)
        for layer, patches in plan.general:
            self._set_general(layer, patches)

    def _new_buffer(self, layer: _Layer) -> torch.nn.Parameter:
        """A Parameter for the layer's patched copy (allocated once per run and layer, then rewritten in place)."""
        return self._own(torch.empty_like(layer.original))

    def _own(self, tensor: torch.Tensor) -> torch.nn.Parameter:
        """A Parameter of ours: only these are ever rewritten in place (see ``_release``)."""
        param = torch.nn.Parameter(tensor, requires_grad=False)
        self._owned[id(param)] = param
        return param

    def _release(self, layer: _Layer):
        """The layer's current patched Parameter, if it is ours and free to rewrite (made by this swapper, not
        cached). Anything else in the model — the original, or a Parameter someone else put there — is never
        written to."""
        current = layer.current()
        if self._owned.get(id(current)) is not current or self._is_cached(layer.key, current):
            return None
        self._spare[layer.key] = current
        return current

    def _is_cached(self, key: str, param) -> bool:
        return any(cached.get(key) is param for cached in self._cache.values())

    def _set_general(self, layer: _Layer, patches: list) -> None:
        self._release(layer)
        out = core_patched_weight(layer.key, layer.original, patches, layer.convert, layer.set_func)
        buffer = self._spare.pop(layer.key, None)
        if layer.set_func is not None:  # a quantized weight's scales live in the tensor: never copied into another
            layer.put(self._own(out))
        elif buffer is not None and buffer.shape == out.shape and buffer.dtype == out.dtype:
            buffer.copy_(out)  # our previous copy takes the result: never two per layer
            if layer.current() is not buffer:
                layer.put(buffer)
        else:
            layer.put(self._own(out))

    def restore(self) -> None:
        """Put back exactly the Parameter objects that were there before (bit-identical weights)."""
        for layer in self._layers:
            layer.put(layer.original)
        self._layers = []
        self._plans.clear()
        self.originals.clear()
        self._cache.clear()
        self._spare.clear()
        self._owned.clear()
        self._views.clear()
        self._scratch = {}
        self.terms.release()
        self.active = None
