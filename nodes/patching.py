"""Static application of a LORA_SET to a MODEL (+ CLIP): the paper's "LoRA Merge".

Each entry becomes ComfyUI weight-adapter patches (``comfy.lora.load_lora``, the code users' files
are tested against) added to one clone with ``add_patches(patches, strength)``. That is exactly what
a chain of core ``LoraLoader`` nodes does, so the patched weights are bit-identical to it.
What we add on top: key styles core lacks (``lora_keys``), block weights, shape checks before
anything is patched, and an honest report of matched and unmatched keys.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import comfy.lora
import torch
from comfy.model_patcher import get_key_weight

from .lora_blocks import check_blocks_exist
from .lora_format import TEXT_ENCODER_PREFIX, group_modules, guess_base_model
from .lora_keys import build_key_map, normalize_keys
from .lora_set import LoraEntry, LoraSet, require_nonempty

log = logging.getLogger("LoRA Composer")

UNMATCHED_SHOWN = 10


class LoraMismatchError(ValueError):
    """A LoRA does not fit the connected model (other architecture, or nothing matched)."""


@dataclass
class EntryPatches:
    """One entry's patches, split by target, with what did not match."""

    name: str
    model: dict = field(default_factory=dict)  # model key → adapter/tuple patch
    clip: dict = field(default_factory=dict)
    total_modules: int = 0
    unmatched: list[str] = field(default_factory=list)  # module prefixes nothing accepted
    text_encoder_ignored: int = 0  # text-encoder modules while no CLIP is connected
    skipped: list[str] = field(default_factory=list)  # model / CLIP keys left out: their shape differs (a variant)

    def describe(self) -> str:
        # weights, not patches: diffusers Flux / SD3 files patch slices of one fused weight (to_q / to_k / to_v → qkv)
        targets = (*self.model, *self.clip)
        slices = sum(1 for t in targets if target_parts(t)[1] is not None)
        weights = {part: len({target_parts(t)[0] for t in group}) for part, group in (("model", self.model),
                                                                                         ("clip", self.clip))}
        line = (f"{self.name}: {weights['model']} model + {weights['clip']} CLIP weights patched"
                + (f" ({slices} of the patches on slices of fused weights)" if slices else "")
                + f" from {self.total_modules} modules; {len(self.unmatched)} unmatched")
        if self.text_encoder_ignored:
            line += f"; {self.text_encoder_ignored} text-encoder modules ignored (no CLIP connected)"
        if self.skipped:
            line += (f"; {len(self.skipped)} layer(s) skipped, their shape differs from this model's "
                     f"({', '.join(self.skipped)}: a variant of the base model, e.g. inpainting / fill)")
        if self.unmatched:
            shown = ", ".join(self.unmatched[:UNMATCHED_SHOWN])
            line += f" ({shown}{' …' if len(self.unmatched) > UNMATCHED_SHOWN else ''})"
        return line


def model_family(model_patcher) -> str:
    return type(model_patcher.model.model_config).__name__ if model_patcher is not None else "none"


def target_parts(target) -> tuple[str, tuple[int, int, int] | None, object]:
    """``(key, offset, function)`` of a ``load_lora`` target: a weight key, or ``(key, (dim, start, size)[, fn])``
    when the patch covers a slice of the weight (core's mapping of fused layers, e.g. diffusers Flux files)."""
    if isinstance(target, str):
        return target, None, None
    return target[0], target[1] if len(target) > 1 else None, target[2] if len(target) > 2 else None


def plain_lora_weights(patch) -> tuple | None:
    """The weights ``(up, down, alpha, …)`` of a plain LoRA/LoCon patch (core's ``LoRAAdapter`` without a Tucker
    mid, DoRA scale or reshape); None for anything else."""
    weights = getattr(patch, "weights", None)
    if getattr(patch, "name", None) != "lora" or not isinstance(weights, tuple) or len(weights) < 5:
        return None
    reshape = weights[5] if len(weights) > 5 else None
    if weights[3] is not None or weights[4] is not None or reshape is not None:
        return None
    return weights


# Where each weight-independent adapter keeps its DoRA scale (``weights[i]``; None when it has none): core's
# LoRAAdapter / LoHaAdapter / LoKrAdapter add a ΔW that does not depend on the weight — unless DoRA rescales it.
_DORA_INDEX = {"lora": 4, "loha": 7, "lokr": 8}


def foreign_storage(weight: torch.Tensor, set_func=None, convert=None) -> bool:
    """Whether a weight is stored in a form only its own pack can read or patch: a tensor subclass or an integer
    dtype without core's ``set_weight`` / ``convert_weight`` (GGUF's packed blocks: a ``GGMLTensor`` of bytes)."""
    return set_func is None and convert is None and (
        type(weight) not in (torch.nn.Parameter, torch.Tensor) or not weight.dtype.is_floating_point)


def weight_independent(patch) -> bool:
    """Whether a patch's ΔW is the same whatever weight it is added to: a plain LoRA / LoCon, LoHa or LoKr without
    DoRA, or a ``diff``. (DoRA normalises by the patched weight; OFT / BOFT / GLoRA multiply it.)"""
    if isinstance(patch, tuple):
        return bool(patch) and patch[0] == "diff"
    index = _DORA_INDEX.get(getattr(patch, "name", None))
    weights = getattr(patch, "weights", ())
    return index is not None and (len(weights) <= index or weights[index] is None)


def delta_base(module: torch.nn.Module, key: str, patches: list,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 weight (on the device it is on) to compute the ΔW of ``patches`` (core patch tuples) from: the weight
    as its layer computes with it — a quantized layer's (fp8 scaled, ``QuantizedTensor``) dequantized by the layer's
    own ``convert_weight``, which is where core's patching starts (DoRA's ΔW depends on the weight's norm). For a
    weight only its own pack can read (``foreign_storage``): zeros of its (logical) shape when every patch's ΔW is
    independent of the weight — exact — and otherwise a clear error rather than a ΔW computed from packed bytes.
    ``weight``: another copy of the layer's weight to start from (a backup)."""
    current, set_func, convert = get_key_weight(module, key)
    stored = current if weight is None else weight
    if not foreign_storage(stored, set_func, convert):
        w32 = stored.detach().to(dtype=torch.float32, copy=True)
        return convert(w32, inplace=True) if convert is not None else w32
    dependent = [type(p[1]).__name__ for p in patches if not weight_independent(p[1])]
    if dependent:
        raise ValueError(
            f"{key} is stored as {type(stored).__name__} / {stored.dtype}, a form only its own loader can read, and "
            f"{dependent[0]} patches depend on the weight's values (DoRA, OFT, GLoRA): apply this LoRA statically "
            "with 'Apply LoRA set' (the model's own loader patches it), or use a plain LoRA / LoHa / LoKr.")
    return torch.zeros(tuple(stored.shape), dtype=torch.float32, device=stored.device)


def _target_name(target) -> str:
    return target_parts(target)[0]


def _patched_shape(target, weight_shape: torch.Size) -> torch.Size | None:
    """The shape a patch must fit, or None if its slice lies outside the weight. A target ``(key, (dim, start,
    size), …)`` patches a slice of the weight: core maps diffusers Flux/SD3 files' separate ``to_q``/``to_k``/
    ``to_v`` (and ``proj_mlp``) onto slices of the fused ``qkv`` / ``linear1`` weights that way."""
    offset = target_parts(target)[1]
    if offset is None:
        return weight_shape
    dim, start, size = offset
    if dim >= len(weight_shape) or start + size > weight_shape[dim]:
        return None
    shape = list(weight_shape)
    shape[dim] = size
    return torch.Size(shape)


def _fits(patch, target, weight_shape: torch.Size) -> bool:
    shape = _patched_shape(target, weight_shape)
    return shape is not None and _delta_shape_fits(patch, shape)


def _delta_shape_fits(patch, weight_shape: torch.Size) -> bool:
    """Cheap shape check for the low-rank families; other patch types are trusted to core."""
    name = getattr(patch, "name", None)
    try:
        if name == "lora":
            up, down, _alpha, mid = patch.weights[:4]
            reshape = patch.weights[5] if len(patch.weights) > 5 else None
            if reshape is not None:
                return True
            inner = down.flatten(1).shape[1] if mid is None else down.shape[1] * mid[0, 0].numel()
            return up.shape[0] == weight_shape[0] and up.shape[0] * inner == weight_shape.numel()
        if name == "loha":
            w1a, w1b, _alpha, _w2a, _w2b, t1 = patch.weights[:6]
            if t1 is not None:
                return w1a.shape[1] == weight_shape[0]
            return w1a.shape[0] == weight_shape[0] and w1a.shape[0] * w1b.shape[1] == weight_shape.numel()
        if name == "lokr":  # kron(w1, w2) is reshaped to the weight: its size must be the weight's
            # (a Tucker w2 was built whole by core_computable before this check)
            w1, w2, _alpha, w1a, w1b, w2a, w2b = patch.weights[:7]
            size1 = w1.numel() if w1 is not None else w1a.shape[0] * w1b.shape[1]
            size2 = w2.numel() if w2 is not None else w2a.shape[0] * w2b[0].numel()
            return size1 * size2 == weight_shape.numel()
    except (AttributeError, IndexError, TypeError):
        return True
    if isinstance(patch, tuple) and patch and patch[0] == "diff":
        return tuple(patch[1][0].shape) == tuple(weight_shape)
    return True


def core_computable(patch):
    """``patch`` in a form core's ``calculate_weight`` computes. A LyCORIS LoKr whose second factor is in Tucker form
    (``lokr_t2`` on a conv) fails there — ``torch.kron`` refuses the non-contiguous einsum result ("view size is not
    compatible…", logged, the layer left unpatched) in both supported versions — so that factor is built here as
    core would, ``einsum('i j k l, j r, i p -> p r k l', t2, w2_b, w2_a)`` made contiguous, with core's scale alpha /
    rank(w2_b) folded in (alpha then None: core's 1.0). Every other patch is returned as it is."""
    weights = getattr(patch, "weights", ())
    if getattr(patch, "name", None) != "lokr" or len(weights) < 8 or weights[7] is None or weights[1] is not None:
        return patch
    w1, _w2, alpha, w1_a, w1_b, w2_a, w2_b, t2 = weights[:8]
    w2 = torch.einsum("i j k l, j r, i p -> p r k l", t2.float(), w2_b.float(), w2_a.float())
    scale = 1.0 if alpha is None else float(alpha) / w2_b.shape[0]
    return type(patch)(patch.loaded_keys, (w1, (w2 * scale).contiguous(), None, w1_a, w1_b, None, None, None,
                                           *weights[8:]))


def broken_module(patch, weight_shape: torch.Size) -> str | None:
    """What makes a low-rank module unusable on its own terms (None if nothing): factors whose ranks disagree, rank
    0, a DoRA scale of neither the weight's output nor input size. Core's loader logs an error for such a layer and
    skips it while the rest applies, so the report would call it patched; we refuse the file, naming the layer."""
    name = getattr(patch, "name", None)
    weights = getattr(patch, "weights", ())
    try:
        if name == "lora":
            up, down, _alpha, mid = weights[:4]
            dora_scale = weights[4] if len(weights) > 4 else None
            if not up.ndim or not down.ndim or up.ndim < 2 or down.shape[0] == 0 or up.shape[1] == 0:
                return (f"rank 0 (up {_dims(up)}, down {_dims(down)})" if up.ndim >= 2 and down.ndim
                        else f"up {_dims(up)} / down {_dims(down)} are not matrices")
            if mid is None and up.shape[1] != down.shape[0]:
                return f"up {_dims(up)} has {up.shape[1]} columns but down {_dims(down)} has {down.shape[0]} rows"
            if mid is not None and (mid.ndim < 2 or mid.shape[0] != up.shape[1] or mid.shape[1] != down.shape[0]):
                return f"mid {_dims(mid)} does not join up {_dims(up)} and down {_dims(down)}"
            if dora_scale is not None and dora_scale.numel() not in (weight_shape[0], weight_shape[1:].numel()):
                return (f"dora_scale {_dims(dora_scale)} fits neither the weight's {weight_shape[0]} outputs nor "
                        f"its {weight_shape[1:].numel()} inputs")
        elif name == "loha":
            w1a, w1b, _alpha, w2a, w2b = weights[:5]
            tuckers = tuple(weights[5:7]) + (None, None)
            for a, b, t, which in ((w1a, w1b, tuckers[0], "hada_w1"), (w2a, w2b, tuckers[1], "hada_w2")):
                if t is not None:  # Tucker form: a and b are both [rank, features], joined through t
                    continue
                if a.ndim < 2 or b.ndim < 1 or a.shape[1] == 0 or a.shape[1] != b.shape[0]:
                    return f"{which}_a {_dims(a)} and {which}_b {_dims(b)} do not share a rank"
    except (AttributeError, IndexError, TypeError):
        return None
    return None


def _dims(tensor) -> str:
    return "×".join(map(str, getattr(tensor, "shape", ()))) or "scalar"


def keys_present(key_map: dict, tensors: dict) -> dict:
    """The part of ``key_map`` that can match anything in ``tensors``, in ``key_map``'s order.

    ``load_lora`` formats and probes a dozen tensor names for every key-map entry (tens of thousands
    for an SDXL model); every name it probes is ``"{prefix}." + suffix`` or ``"{prefix}_lora." + suffix``,
    so entries whose prefix is not such a start of some tensor name can never match. Filtering them
    first gives the same patches (same iteration order) in a fraction of the time.
    """
    starts = set()
    for name in tensors:
        start = name.find(".")
        while start != -1:
            starts.add(name[:start])
            start = name.find(".", start + 1)
        start = name.find("_lora.")
        while start != -1:
            starts.add(name[:start])
            start = name.find("_lora.", start + 1)
    return {prefix: target for prefix, target in key_map.items() if prefix in starts}


# A variant of a base model differs from it in its first layer: inpainting UNets' 9-channel conv_in, Flux Fill's and
# Kontext's img_in. A LoRA for the base model then applies everywhere else (as core's loader does, logging an error
# for the layer); more layers that do not fit mean another base model (SD2's cross-attention differs from SD1.5's in
# 32 layers), which is refused.
MAX_SKIPPED_LAYERS = 2


def resolve_entry(entry: LoraEntry, key_map: dict, model_sd: dict, clip_sd: dict | None,
                  family: str) -> EntryPatches:
    """Turn one entry into patches for the model and CLIP, checking names and shapes first. ``model_sd`` /
    ``clip_sd``: every state-dict key with its shape (``state_shapes``)."""
    tensors = normalize_keys(entry.tensors())
    patches = comfy.lora.load_lora(tensors, keys_present(key_map, tensors), log_missing=False)
    result = EntryPatches(name=entry.name)
    groups = group_modules(tensors)
    result.total_modules = len(groups)
    mismatched: list[str] = []
    for target, patch in patches.items():
        patch = core_computable(patch)
        key = _target_name(target)
        shape = model_sd.get(key) if key in model_sd else (clip_sd or {}).get(key)
        shape = None if shape is None else _patched_shape(target, shape)  # a fused weight's slice: the slice's
        problem = None if shape is None else broken_module(patch, shape)
        if problem is not None:
            raise LoraMismatchError(f"{entry.name}: the module for {key} is broken: {problem}. Nothing was applied "
                                    "(ComfyUI's own loader would skip this layer with an error line).")
        if key in model_sd:
            if not _fits(patch, target, model_sd[key]):
                mismatched.append(key)
                continue
            result.model[target] = patch
        elif clip_sd is not None and key in clip_sd:
            if not _fits(patch, target, clip_sd[key]):
                mismatched.append(key)
                continue
            result.clip[target] = patch
    accepted = {_target_name(t) for t in (*result.model, *result.clip, *mismatched)}
    for prefix in groups:
        target = key_map.get(prefix)
        if target is not None and _module_accepted(_target_name(target), accepted):
            continue
        if clip_sd is None and TEXT_ENCODER_PREFIX.match(prefix):
            result.text_encoder_ignored += 1
        else:
            result.unmatched.append(prefix)
    if mismatched and len(mismatched) <= MAX_SKIPPED_LAYERS and (result.model or result.clip):
        result.skipped = sorted(mismatched)  # core's loader skips them too (with an error line per key)
    elif mismatched:
        raise LoraMismatchError(
            f"{entry.name}: {len(mismatched)} of its layers do not fit the connected {family} model "
            f"(e.g. {mismatched[0]}); the file looks made for {guess_base_model(tensors, entry.metadata())}. "
            "Nothing was applied.")
    if not result.model and not result.clip and result.unmatched:
        shown = ", ".join(result.unmatched[:5])
        raise LoraMismatchError(
            f"{entry.name}: none of its {len(result.unmatched)} modules match the connected {family} model "
            f"(the file looks made for {guess_base_model(tensors, entry.metadata())}; first keys: {shown}). "
            "Nothing was applied.")
    return result


def _module_accepted(weight_key: str, accepted: set[str]) -> bool:
    """Whether a module's patches were taken: its weight's, or only its bias's (a ``diff_b`` / ``b_norm`` module that
    leaves the weight alone — it was reported unmatched, with a warning, while it applied)."""
    if weight_key in accepted:
        return True
    return weight_key.endswith(".weight") and weight_key[:-len("weight")] + "bias" in accepted


def linear_like(module: torch.nn.Module) -> bool:
    """A linear layer: ``torch.nn.Linear``, or a module that computes like one without subclassing it (ComfyUI 0.9.x's
    quantized Linear of ``mixed_precision_ops`` — fp8 scaled / nvfp4 checkpoints — is a plain ``Module`` with
    ``in_features`` / ``out_features``)."""
    return isinstance(module, torch.nn.Linear) or all(
        isinstance(getattr(module, name, None), int) for name in ("in_features", "out_features"))


def state_shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """Every state-dict key of ``module`` with the shape its layer computes with: a parameter's own shape where it
    has one. Quantized storage can differ in its state-dict entry — GGUF's packed blocks (a ``GGMLTensor`` reports its
    logical shape, its state-dict entry the packed bytes'), 0.9.x's packed nvfp4 weights — and every LoRA would then
    fail the shape check on such a model."""
    shapes = {key: value.shape for key, value in module.state_dict().items()}
    shapes.update((key, param.shape) for key, param in module.named_parameters())
    return shapes


def _state_dicts(model_patcher, clip) -> tuple[dict, dict | None]:
    model_sd = state_shapes(model_patcher.model) if model_patcher is not None else {}
    clip_sd = state_shapes(clip.cond_stage_model) if clip is not None else None
    return model_sd, clip_sd


def resolve_set(model_patcher, clip, lora_set: LoraSet) -> list[tuple[LoraEntry, EntryPatches]]:
    """Resolve every entry of a set against one model (and CLIP); raises before anything is patched."""
    require_nonempty(lora_set)
    key_map = build_key_map(model_patcher, clip)
    model_sd, clip_sd = _state_dicts(model_patcher, clip)
    family = model_family(model_patcher)
    resolved = []
    for entry in lora_set:
        if entry.blocks is not None and entry.blocks.rules and model_patcher is not None:
            check_blocks_exist(entry.blocks, model_sd.keys(), entry.name)
        resolved.append((entry, resolve_entry(entry, key_map, model_sd, clip_sd, family)))
    return resolved


def group_by_block_weight(entry: LoraEntry, patches: dict) -> dict[float, dict]:
    """Split model patches by the entry's block weight (1.0 for all when there is no filter)."""
    if entry.blocks is None:
        return {1.0: patches}
    groups: dict[float, dict] = {}
    for target, patch in patches.items():
        groups.setdefault(entry.blocks.weight_for(_target_name(target)), {})[target] = patch
    return groups


def model_patch_lists(entry: LoraEntry, patches: EntryPatches) -> dict[str, list[tuple]]:
    """The entry's model patches in ``ModelPatcher.patches`` form: key → [(strength, patch, 1.0, offset, fn)].

    Exactly what ``add_patches(group, strength_model × block weight)`` would store, so runtime code can
    hand them to ``comfy.lora.calculate_weight`` and get what static application computes.
    """
    lists: dict[str, list[tuple]] = {}
    if entry.strength_model == 0:
        return lists
    for weight, group in group_by_block_weight(entry, patches.model).items():
        if weight == 0:
            continue
        for target, patch in group.items():
            key, offset, function = target_parts(target)
            lists.setdefault(key, []).append((entry.strength_model * weight, patch, 1.0, offset, function))
    return lists


def patched_clip(clip, resolved: list[tuple[LoraEntry, EntryPatches]]):
    """A CLIP clone with every entry's text-encoder patches added at its clip strength (None stays None)."""
    if clip is None:
        return None
    new_clip = clip.clone()
    for entry, patches in resolved:
        if entry.strength_clip != 0 and patches.clip:
            new_clip.add_patches(patches.clip, entry.strength_clip)
    return new_clip


def report_lines(resolved: list[tuple[LoraEntry, EntryPatches]]) -> list[str]:
    """One line per entry, also written to the log (unmatched keys listed in full there)."""
    lines = []
    for entry, patches in resolved:
        line = patches.describe()
        if entry.blocks is not None:
            line += f"; blocks {entry.blocks.describe()}"
        if patches.unmatched:
            log.warning("[LoRA Composer] %s; all unmatched: %s", line, ", ".join(patches.unmatched))
        elif patches.skipped:
            log.warning("[LoRA Composer] %s", line)
        else:
            log.info("[LoRA Composer] %s", line)
        lines.append(line)
    return lines


def apply_lora_set(model_patcher, clip, lora_set: LoraSet):
    """Return ``(model, clip, report_lines)`` with every entry's patches added to fresh clones."""
    resolved = resolve_set(model_patcher, clip, lora_set)
    new_model = model_patcher.clone() if model_patcher is not None else None
    for entry, patches in resolved:
        if new_model is not None and entry.strength_model != 0:
            for weight, group in group_by_block_weight(entry, patches.model).items():
                if weight != 0:
                    new_model.add_patches(group, entry.strength_model * weight)
    return new_model, patched_clip(clip, resolved), report_lines(resolved)
