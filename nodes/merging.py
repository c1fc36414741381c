"""Merge a LORA_SET into one LoRA, in weight-delta space (algorithms.md §10).

Every method starts from each entry's exact per-layer delta ΔW_i, computed with ComfyUI's own
weight-adapter math against the connected model (so LoHa, LoKr, DoRA, OFT… all merge), at the
entry's strength and block weight. Methods:

* ``linear``  ΔW = Σ ΔW_i exactly. Stored as stacked low-rank factors where every contribution is a
  plain LoRA/LoCon (exact, rank Σ r_i), as a dense ``diff`` otherwise.
* ``concat``  exact rank stacking B_cat A_cat = Σ c_i B_i A_i; only plain low-rank inputs on 2-D / 4-D weights.
  Weights with no low-rank form (biases, norm weights, 3-D / 5-D convs) are stored as exact dense diffs.
* ``svd``     ΔW = Σ ΔW_i re-compressed to ``rank`` per layer (best rank-r in Frobenius norm); the
  relative error per layer is reported.
* ``ties``    trim each ΔW_i to ``density``, elect the sign, disjoint mean (weights = strengths).
* ``dare``    drop with keep-probability ``density``, rescale by 1/density, weighted sum (seeded).

TIES/DARE act on whole deltas, never on up/down factors separately: factor-wise variants (PEFT's
``ties``/``dare_linear``) create cross terms and prune the wrong thing for independent LoRAs.
Their result is then SVD-compressed to ``rank`` (``rank`` 0 keeps the dense delta).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import comfy.lora
import comfy.utils
import torch

from ..kernels import merge_math
from .lora_keys import kohya_names
from .lora_set import LoraEntry, LoraSet, memory_entry, require_nonempty
from .patching import (delta_base, group_by_block_weight, model_family, plain_lora_weights, resolve_set,
                       target_parts)

MERGE_METHODS = ("linear", "concat", "svd", "ties", "dare")
METHODS_WITH_RANK = ("svd", "ties", "dare")


@dataclass
class Contribution:
    entry: LoraEntry
    patch: object
    strength: float  # strength × block weight (model) or clip strength (text encoder)


@dataclass
class MergeResult:
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    report: list[str] = field(default_factory=list)


def original_weight(patcher, key: str) -> torch.Tensor:
    """The unpatched weight, even while a LoRA'd clone of the same module is loaded."""
    backup = patcher.backup.get(key)
    weight = backup.weight if backup is not None else comfy.utils.get_attr(patcher.model, key)
    return weight.detach()


def layer_contributions(model, clip, lora_set: LoraSet) -> dict[str, tuple[object, list[Contribution]]]:
    """Per target key: (the patcher that owns it, every entry's patch with its effective strength)."""
    layers: dict[str, tuple[object, list[Contribution]]] = {}
    text_encoder_only = True  # no entry patches the model: said so, rather than "every strength is 0"
    for entry, patches in resolve_set(model, clip, lora_set):
        text_encoder_only = text_encoder_only and not patches.model
        owners = []
        if entry.strength_model != 0:
            for weight, group in group_by_block_weight(entry, patches.model).items():
                owners.append((model, group, entry.strength_model * weight))
        if clip is not None and entry.strength_clip != 0:
            owners.append((clip.patcher, patches.clip, entry.strength_clip))
        for owner, group, strength in owners:
            if strength == 0:
                continue
            for target, patch in group.items():
                key, patch = _whole_weight_patch(entry, owner, target, patch)
                layers.setdefault(key, (owner, []))[1].append(Contribution(entry, patch, strength))
    if not layers:
        if text_encoder_only and clip is None:
            raise ValueError("lora_set: its LoRAs patch no weight of this model (text-encoder LoRAs?): connect the "
                             "CLIP input to merge their text-encoder parts.")
        raise ValueError("lora_set: every strength or block weight is 0, nothing to merge.")
    return layers


def _whole_weight_patch(entry: LoraEntry, owner, target, patch) -> tuple[str, object]:
    """``(key, patch)`` on the whole weight. A target ``(key, (0, start, size))`` — core's mapping of diffusers
    Flux/SD3 ``to_q``/``to_k``/``to_v``/``proj_mlp`` onto the fused ``qkv``/``linear1`` rows — becomes the same
    LoRA with its up factor zero-padded to the fused rows: exactly the same ΔW, so the slices of one fused weight
    merge like any other LoRAs on it (concat stacks them exactly)."""
    key, offset, function = target_parts(target)
    if offset is None and function is None:
        return key, patch
    weights = plain_lora_weights(patch)
    if function is comfy.utils.swap_scale_shift and offset is None and weights is not None:
        # diffusers' norm_out / last norm1_context: core swaps ΔW's two row halves (shift, scale → scale, shift);
        # ΔW = up @ down, so swapping up's halves is the same ΔW, exactly
        return key, type(patch)(patch.loaded_keys, (function(weights[0]), *weights[1:]))
    if function is not None or weights is None or offset[0] != 0:
        what = (f"with core's {getattr(function, '__name__', 'function')} on" if function is not None
                else "on a slice of")
        raise ValueError(f"{entry.name}: merging a {_patch_kind(patch)} patch {what} {key} is not supported; apply "
                         "this LoRA with 'Apply LoRA set' instead.")
    _dim, start, size = offset
    up = weights[0]
    rows = original_weight(owner, key).shape[0]
    padded = torch.zeros((rows, *up.shape[1:]), dtype=up.dtype)
    padded[start:start + size] = up
    return key, type(patch)(patch.loaded_keys, (padded, *weights[1:]))


def exact_delta(patcher, key: str, contribution: Contribution, strength: float | None = None) -> torch.Tensor:
    """ΔW of one patch in fp32, with ComfyUI's own ``calculate_weight`` (handles every adapter type)."""
    s = contribution.strength if strength is None else strength
    patches = [(s, contribution.patch, 1.0, None, None)]
    base = delta_base(patcher.model, key, patches, original_weight(patcher, key))
    patched = comfy.lora.calculate_weight(patches, base.clone(), key)
    return patched.float() - base


def scaled_factors(contribution: Contribution) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """(up, down, c) with ΔW = c·up@down for plain LoRA/LoCon patches; None for anything else."""
    weights = plain_lora_weights(contribution.patch)
    if weights is None:
        return None
    up, down, alpha = weights[:3]
    scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
    return up.float(), down.float(), contribution.strength * scale


def _patch_kind(patch) -> str:
    """A patch's format for messages: a weight adapter's name, or a tuple patch's tag ("diff", …)."""
    if isinstance(patch, tuple) and patch and isinstance(patch[0], str):
        return patch[0]
    return getattr(patch, "name", type(patch).__name__)


def _lora_tensors(prefix: str, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
    rank = down.shape[0]
    return {f"{prefix}.lora_up.weight": up.contiguous().cpu(), f"{prefix}.lora_down.weight": down.contiguous().cpu(),
            f"{prefix}.alpha": torch.tensor(float(rank))}


def _stack_exactly(contribs: list[Contribution], weight_shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    factors = [scaled_factors(c) for c in contribs]
    if any(f is None for f in factors):
        return None
    ups = [f[0].reshape(f[0].shape[0], f[0].shape[1], *([1] * (len(weight_shape) - 2))) for f in factors]
    downs = [f[1] if f[1].ndim == len(weight_shape) else f[1].reshape(f[1].shape[0], *weight_shape[1:])
             for f in factors]
    return merge_math.concat_factors(ups, downs, [f[2] for f in factors])


def merge_lora_set(model, clip, lora_set: LoraSet, method: str, rank: int = 32, density: float = 0.5,
                   seed: int = 0) -> MergeResult:
    """Merge every entry of ``lora_set`` into one kohya-style LoRA state dict (see module docstring)."""
    require_nonempty(lora_set)
    if method not in MERGE_METHODS:
        raise ValueError(f"method must be one of {', '.join(MERGE_METHODS)}, got {method!r}.")
    if method in METHODS_WITH_RANK and method == "svd" and rank < 1:
        raise ValueError("rank must be ≥ 1 for the svd method.")
    if method in ("ties", "dare") and not (0.0 < density <= 1.0):
        raise ValueError(f"density must be in (0, 1] for {method}, got {density}.")
    layers = layer_contributions(model, clip, lora_set)
    names = kohya_names(model, clip)
    tensors: dict[str, torch.Tensor] = {}
    errors: list[tuple[float, str]] = []
    dense_layers = 0
    for index, key in enumerate(sorted(layers)):
        patcher, contribs = layers[key]
        is_bias = key.endswith(".bias")
        weight_key = key[: -len(".bias")] + ".weight" if is_bias else key
        prefix = names.get(weight_key, weight_key[: -len(".weight")])
        weight_shape = original_weight(patcher, key).shape
        if is_bias:  # biases (diff_b patches) are tiny: always exact and dense
            tensors[f"{prefix}.diff_b"] = sum(exact_delta(patcher, key, c) for c in contribs).cpu()
            continue
        if method in ("linear", "concat"):
            stacked = _stack_exactly(contribs, weight_shape) if len(weight_shape) in (2, 4) else None
            if stacked is not None:
                tensors.update(_lora_tensors(prefix, *stacked))
                continue
            if method == "concat" and len(weight_shape) in (2, 4):
                kinds = ", ".join(sorted({_patch_kind(c.patch) for c in contribs}))
                raise ValueError(f"concat merges plain LoRA/LoCon factors only; {key} has {kinds} patches "
                                 "(DoRA, Tucker, LoHa, LoKr…). Use 'svd' or 'linear' for these.")
            tensors[f"{prefix}.diff"] = sum(exact_delta(patcher, key, c) for c in contribs).cpu()
            dense_layers += 1
            continue
        if method == "svd":
            delta = sum(exact_delta(patcher, key, c) for c in contribs)
        else:
            unit = [exact_delta(patcher, key, c, strength=1.0) for c in contribs]
            weights = [c.strength for c in contribs]
            delta = (merge_math.ties_merge(unit, weights, density) if method == "ties"
                     else merge_math.dare_merge(unit, weights, density, seed=seed + index))
        if rank < 1 or delta.ndim not in (2, 4):
            tensors[f"{prefix}.diff"] = delta.cpu()
            dense_layers += 1
            continue
        up, down, rel_error = merge_math.svd_factorize(delta, rank)
        tensors.update(_lora_tensors(prefix, up, down))
        errors.append((rel_error, key))
    report = [f"merged {len(lora_set)} LoRAs with {method}: {len(layers)} layers"
              + (f", {dense_layers} stored dense" if dense_layers else "")]
    if errors:
        worst = max(errors)
        mean = sum(e for e, _ in errors) / len(errors)
        report.append(f"rank-{rank} relative error ‖ΔW − up·down‖/‖ΔW‖: mean {mean:.3e}, worst {worst[0]:.3e} "
                      f"({worst[1]})")
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(max(ranks) if ranks else 0),
        "ss_network_alpha": str(max(ranks) if ranks else 0),
        "lora_composer_method": method,
        "lora_composer_base_model": model_family(model),
        "lora_composer_sources": json.dumps([
            {"name": e.name, "strength_model": e.strength_model, "strength_clip": e.strength_clip,
             "blocks": e.blocks.describe() if e.blocks else None} for e in lora_set]),
    }
    if method in METHODS_WITH_RANK:
        metadata["lora_composer_rank"] = str(rank)
    if method in ("ties", "dare"):
        metadata["lora_composer_density"] = str(density)
    if method == "dare":
        metadata["lora_composer_seed"] = str(seed)
    return MergeResult(tensors=tensors, metadata=metadata, report=report)


def merged_entry(model, clip, lora_set: LoraSet, method: str, rank: int, density: float, seed: int):
    result = merge_lora_set(model, clip, lora_set, method, rank, density, seed)
    entry = memory_entry(f"merge-{method}-{len(lora_set)}loras", result.tensors, result.metadata)
    return LoraSet((entry,)), "\n".join(result.report)
