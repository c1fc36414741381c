"""Running a hypernet: ``CLIP_VISION_OUTPUT`` → LiDB weights → one in-memory ``LORA_SET`` entry.

The decoder is small (HyperDreamBooth's is ≈ tens of MB), so it runs on the CPU in float32: the
generated LoRA is then the same on every machine, GPU or not. Several images in one
``CLIP_VISION_OUTPUT`` batch are read as one longer token sequence (several views of one subject;
cross-attention is indifferent to the token count).
"""
from __future__ import annotations

import hashlib
import json

import torch

from ..lora_set import LoraEntry, LoraSet
from ..patching import model_family, state_shapes
from .file_format import LoraHypernet
from .lidb import LidbSpec, lora_entry_from_factors, materialize, split_flat

MISSING_SHOWN = 5


def feature_tokens(clip_vision_output, source: str, input_name: str) -> torch.Tensor:
    """The ``[batch, tokens, dim]`` float32 CPU tokens of one ``CLIP_VISION_OUTPUT`` field."""
    if clip_vision_output is None:
        raise ValueError(f"{input_name} is missing: connect a 'CLIP Vision Encode' output.")
    try:
        tokens = clip_vision_output[source]
    except (KeyError, AttributeError, TypeError):
        tokens = None
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise ValueError(f"{input_name} has no {source!r} tokens [batch, tokens, dim]; connect the output of "
                         "'CLIP Vision Encode' (a CLIP-vision model, not a style/unCLIP embedding).")
    tokens = tokens.detach().to("cpu", torch.float32)
    if not torch.isfinite(tokens).all():
        raise ValueError(f"{input_name} contains NaN or Inf values.")
    return tokens.clone()  # a normal tensor even when made under inference_mode


def check_feature_dim(hypernet: LoraHypernet, tokens: torch.Tensor, input_name: str) -> None:
    if tokens.shape[-1] != hypernet.config.feature_dim:
        raise ValueError(f"{input_name}: the CLIP-vision model gives {hypernet.config.feature_source} features of "
                         f"dimension {tokens.shape[-1]}, but {hypernet.name} was trained on dimension "
                         f"{hypernet.config.feature_dim}; use the CLIP-vision model it was trained with.")


def image_tokens(hypernet: LoraHypernet, clip_vision_output, input_name: str = "clip_vision_output") -> torch.Tensor:
    """``[1, n·T, F]``: every image of the batch as one token sequence."""
    if hypernet.config.variant != "image":
        raise ValueError(f"{hypernet.name} is a before/after (LoRA of Change) hypernet; use "
                         "'Generate LoRA from image pair (hypernet)'.")
    tokens = feature_tokens(clip_vision_output, hypernet.config.feature_source, input_name)
    check_feature_dim(hypernet, tokens, input_name)
    return tokens.reshape(1, -1, tokens.shape[-1])


def pair_tokens(hypernet: LoraHypernet, before, after) -> torch.Tensor:
    """``[1, n·T, 2F]``: before and after tokens concatenated per token (LoC), pairs in sequence."""
    if hypernet.config.variant != "pair":
        raise ValueError(f"{hypernet.name} is a single-image (HyperDreamBooth) hypernet; use "
                         "'Generate LoRA from image (hypernet)'.")
    source = hypernet.config.feature_source
    a = feature_tokens(before, source, "before")
    b = feature_tokens(after, source, "after")
    check_feature_dim(hypernet, a, "before")
    check_feature_dim(hypernet, b, "after")
    if a.shape != b.shape:
        raise ValueError(f"before and after features have shapes {tuple(a.shape)} and {tuple(b.shape)}; encode both "
                         "with the same CLIP-vision model, crop setting and batch size.")
    return torch.cat([a, b], dim=-1).reshape(1, -1, 2 * a.shape[-1])


def factors_from_flat(spec: LidbSpec, flat: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One example's flat LiDB weights ``[L, P]`` → key → (up, down) (``lidb.materialize``)."""
    down_w, up_w = split_flat(spec, flat)
    keys = spec.keys
    return materialize(spec, dict(zip(keys, down_w)), dict(zip(keys, up_w)))


def generate_factors(hypernet: LoraHypernet, tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the decoder (CPU, fp32, no grad) and materialise the LoRA factors of every target layer."""
    with torch.no_grad():
        flat = hypernet.network(tokens.to(torch.float32))[0]
    if not torch.isfinite(flat).all():
        raise ValueError(f"{hypernet.name} produced NaN or Inf weights; the hypernet file is broken "
                         "(retrain it or load an earlier checkpoint).")
    return factors_from_flat(hypernet.spec, flat)


def check_model_fits(hypernet: LoraHypernet, model=None, clip=None) -> None:
    """Raise if the connected MODEL (and CLIP) lacks layers the hypernet targets, naming them."""
    if model is None:
        return
    family = model_family(model)
    if hypernet.config.base_model and hypernet.config.base_model != family:
        raise ValueError(f"{hypernet.name} was trained for {hypernet.config.base_model} models; the connected model is "
                         f"{family}.")
    shapes = {k: tuple(v) for k, v in state_shapes(model.model).items()}  # as computed, not as stored (quantized)
    if clip is not None:
        shapes.update({k: tuple(v) for k, v in state_shapes(clip.cond_stage_model).items()})
    missing, wrong = [], []
    for layer in hypernet.spec.layers:
        if layer.is_text_encoder and clip is None:
            continue  # text-encoder layers simply stay unused without a CLIP
        shape = shapes.get(layer.key)
        if shape is None:
            missing.append(layer.key)
        elif shape != (layer.out_features, layer.in_features):
            wrong.append(f"{layer.key} is {shape}, hypernet expects {(layer.out_features, layer.in_features)}")
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} target layers are missing: {', '.join(missing[:MISSING_SHOWN])}"
                         + (" …" if len(missing) > MISSING_SHOWN else ""))
        if wrong:
            parts.append(f"{len(wrong)} have other shapes: {'; '.join(wrong[:MISSING_SHOWN])}")
        raise ValueError(f"{hypernet.name} does not fit the connected {family} model ("
                         + "; ".join(parts) + "). It was trained for another base model or layer set.")


def entry_name(hypernet: LoraHypernet, tokens: torch.Tensor, kind: str) -> str:
    """``<hypernet>-<kind>-<8 hex of the features>``: distinct inputs give distinct, stable names."""
    digest = hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:8]
    return f"{hypernet.name}-{kind}-{digest}"


def generated_entry(hypernet: LoraHypernet, tokens: torch.Tensor, kind: str, strength_model: float,
                    strength_clip: float) -> LoraEntry:
    factors = generate_factors(hypernet, tokens)
    name = entry_name(hypernet, tokens, kind)
    metadata = {"lora_composer_method": f"hypernet-{hypernet.config.variant}",
                "lora_composer_hypernet": hypernet.name,
                "lora_composer_base_model": hypernet.config.base_model,
                "lora_composer_lidb": json.dumps({"rank": hypernet.spec.rank, "down_dim": hypernet.spec.down_dim,
                                                  "up_dim": hypernet.spec.up_dim, "layers": len(hypernet.spec.layers)}),
                "lora_composer_sources": json.dumps([{"name": name, "hypernet": hypernet.name}])}
    return lora_entry_from_factors(name, factors, strength_model=strength_model, strength_clip=strength_clip,
                                   metadata=metadata)


def generate_from_image(hypernet: LoraHypernet, clip_vision_output, strength_model: float = 1.0,
                        strength_clip: float = 1.0, lora_set: LoraSet | None = None, model=None,
                        clip=None) -> LoraSet:
    """HyperDreamBooth: one image (or several views) → a LORA_SET with one generated entry appended."""
    check_model_fits(hypernet, model, clip)
    tokens = image_tokens(hypernet, clip_vision_output)
    entry = generated_entry(hypernet, tokens, "image", strength_model, strength_clip)
    return (lora_set or LoraSet()).appended(entry)


def generate_from_pair(hypernet: LoraHypernet, before, after, strength_model: float = 1.0,
                       strength_clip: float = 1.0, lora_set: LoraSet | None = None, model=None,
                       clip=None) -> LoraSet:
    """LoRA of Change: before/after → the LoRA of the edit (apply at −1 for the reverse edit)."""
    check_model_fits(hypernet, model, clip)
    tokens = pair_tokens(hypernet, before, after)
    entry = generated_entry(hypernet, tokens, "edit", strength_model, strength_clip)
    return (lora_set or LoraSet()).appended(entry)
