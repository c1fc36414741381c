"""Which layers a training run adapts: presets by module name, plus the rank check per layer.

Presets (SD1.x / SD2 / SDXL UNet names; ComfyUI's own module paths):

* ``attention`` — every attention projection of the UNet's transformer blocks, self and cross:
  ``….attn1/attn2.{to_q,to_k,to_v,to_out.0}`` (DreamBooth-LoRA's and HyperDreamBooth's set).
* ``attention+FF`` — plus the transformer feed-forward ``….ff.net.0.proj`` and ``….ff.net.2``.
* ``attention+text encoder`` / ``attention+FF+text encoder`` — plus the CLIP text encoder(s):
  ``….self_attn.{q,k,v,out}_proj`` (and, with FF, ``….mlp.fc1/fc2``).
* ``B-LoRA (SDXL content+style)`` — only the attention projections inside SDXL's
  ``output_blocks.0.1`` (content) and ``output_blocks.1.1`` (style), trained jointly (B-LoRA,
  algorithms.md §6): the two blocks can be separated afterwards with ``LoraSetBlocks``.
* ``all linear+conv (like core)`` — every Linear and (ungrouped, zero-padded) Conv2d weight of the
  diffusion model: the layer set of ComfyUI core's ``TrainLoraNode`` (without its bias/norm diffs).
  It includes layers as narrow as the 4-channel output conv, so here (only) a rank above a layer's
  limit is capped to that limit for the layer (a full-rank, exact LoRA of it), and the report says so;
  every other preset refuses such a rank with an error.

A target knows its owner (``unet`` or ``clip``), its state-dict key, its module and how the
low-rank residual must be computed (``linear`` or ``conv`` with the module's stride/padding).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..patching import linear_like, model_family

TARGET_PRESETS = (
    "attention",
    "attention+FF",
    "attention+text encoder",
    "attention+FF+text encoder",
    "B-LoRA (SDXL content+style)",
    "all linear+conv (like core)",
)
BLORA_PRESET = "B-LoRA (SDXL content+style)"
BLORA_BLOCKS = ("output_blocks.0.1", "output_blocks.1.1")  # content, style

UNET = "unet"
CLIP = "clip"
DIFFUSION_PREFIX = "diffusion_model."

_UNET_ATTENTION = re.compile(r"\.attn\d*\.(to_q|to_k|to_v|to_out\.0)$")
_UNET_FF = re.compile(r"\.ff\.net\.(0\.proj|2)$")
_TE_ATTENTION = re.compile(r"\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$")
_TE_MLP = re.compile(r"\.mlp\.(fc1|fc2)$")


@dataclass(frozen=True)
class TargetLayer:
    """One adapted weight: ``key`` is its state-dict key in the owner's model (``….weight``)."""

    owner: str  # UNET or CLIP
    key: str
    module_path: str  # path of the module inside the owner's root module
    kind: str  # "linear" or "conv"
    out_features: int
    in_features: int  # for conv: in_channels (the kernel is kernel_size)
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()

    @property
    def max_rank(self) -> int:
        """The largest rank a LoRA of this layer can have: min(out, in·kh·kw)."""
        fan_in = self.in_features
        for k in self.kernel_size:
            fan_in *= k
        return min(self.out_features, fan_in)

    @property
    def down_shape(self) -> tuple[int, ...]:
        return (self.in_features, *self.kernel_size)


def _layer(owner: str, key_prefix: str, path: str, module: torch.nn.Module) -> TargetLayer | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    key = f"{key_prefix}{path}.weight"
    rank = len(weight.shape)  # the layer's shape: packed storage (GGUF) has another .ndim
    if linear_like(module) and rank == 2:
        return TargetLayer(owner, key, path, "linear", int(weight.shape[0]), int(weight.shape[1]))
    if (isinstance(module, torch.nn.Conv2d) and rank == 4 and module.groups == 1
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)):
        return TargetLayer(owner, key, path, "conv", int(weight.shape[0]), int(weight.shape[1]),
                           tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                           tuple(module.dilation))
    return None


def _unet_layers(model_patcher) -> list[TargetLayer]:
    diffusion_model = model_patcher.model.diffusion_model
    layers = []
    for path, module in diffusion_model.named_modules():
        layer = _layer(UNET, DIFFUSION_PREFIX, path, module)
        if layer is not None:
            layers.append(layer)
    return layers


def _clip_layers(clip) -> list[TargetLayer]:
    layers = []
    for path, module in clip.cond_stage_model.named_modules():
        layer = _layer(CLIP, "", path, module)
        if layer is not None and layer.kind == "linear":
            layers.append(layer)
    return layers


def _unet_matches(path: str, preset: str) -> bool:
    dotted = "." + path
    if preset == "all linear+conv (like core)":
        return True
    if _UNET_ATTENTION.search(dotted):
        if preset == BLORA_PRESET:
            return any(path.startswith(block + ".") for block in BLORA_BLOCKS)
        return True
    return "FF" in preset and bool(_UNET_FF.search(dotted))


def trains_text_encoder(preset: str) -> bool:
    return preset.endswith("text encoder")


def select_targets(model_patcher, clip, preset: str) -> list[TargetLayer]:
    """The target layers of ``preset`` in the connected MODEL (and CLIP), in module order.

    Raises ValueError naming ``targets`` when the preset is unknown, needs a CLIP that is not
    connected, or matches nothing in this model (e.g. B-LoRA on a non-SDXL model).
    """
    if preset not in TARGET_PRESETS:
        raise ValueError(f"targets must be one of {', '.join(TARGET_PRESETS)}, got {preset!r}.")
    family = model_family(model_patcher)
    if preset == BLORA_PRESET:
        paths = {p for p, _ in model_patcher.model.diffusion_model.named_modules()}
        missing = [b for b in BLORA_BLOCKS if b not in paths]
        if missing or not family.startswith("SDXL"):
            raise ValueError(
                f"targets {preset!r} needs an SDXL UNet with transformer blocks {' and '.join(BLORA_BLOCKS)} "
                f"(content and style); the connected model is {family}"
                + (f" and has no {', '.join(missing)}." if missing else ".")
                + " Use 'attention' for other models.")
    targets = [t for t in _unet_layers(model_patcher) if _unet_matches(t.module_path, preset)]
    if trains_text_encoder(preset):
        if clip is None:
            raise ValueError(f"targets {preset!r} trains the text encoder: connect a CLIP.")
        te_pattern = (_TE_ATTENTION, _TE_MLP) if "FF" in preset else (_TE_ATTENTION,)
        te = [t for t in _clip_layers(clip) if any(p.search("." + t.module_path) for p in te_pattern)]
        if not te:
            raise ValueError(f"targets {preset!r}: the connected CLIP has no self_attn q/k/v/out_proj layers.")
        targets += te
    if not any(t.owner == UNET for t in targets):
        raise ValueError(f"targets {preset!r} matches no layer of the connected {family} model "
                         "(expected SD1.x/SD2/SDXL-style attention names such as '….attn1.to_q').")
    return targets


ALL_LAYERS_PRESET = "all linear+conv (like core)"


def layer_ranks(targets: list[TargetLayer], rank: int, preset: str) -> tuple[dict[str, int], list[str]]:
    """Rank per target key, and notes: capped at each layer's limit for the all-layers preset only."""
    if preset != ALL_LAYERS_PRESET:
        check_rank(targets, rank)
        return {t.key: rank for t in targets}, []
    if rank < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}.")
    ranks = {t.key: min(rank, t.max_rank) for t in targets}
    capped = [t for t in targets if t.max_rank < rank]
    notes = []
    if capped:
        notes.append(f"rank {rank} capped to each layer's limit on {len(capped)} narrow layer(s), e.g. "
                     f"{capped[0].key} (rank {capped[0].max_rank}, a full-rank LoRA of that layer).")
    return ranks, notes


def check_rank(targets: list[TargetLayer], rank: int, input_name: str = "rank") -> None:
    """Every target must allow ``rank`` (≤ min(out, in·kh·kw)); else a ValueError naming the layer."""
    if rank < 1:
        raise ValueError(f"{input_name} must be ≥ 1, got {rank}.")
    too_small = [t for t in targets if rank > t.max_rank]
    if too_small:
        worst = min(too_small, key=lambda t: t.max_rank)
        allowed = min(t.max_rank for t in targets)
        raise ValueError(
            f"{input_name} {rank} is larger than {len(too_small)} target layer(s) allow: e.g. {worst.key} "
            f"({worst.out_features}×{worst.in_features}{'×' + 'x'.join(map(str, worst.kernel_size)) if worst.kernel_size else ''}) "
            f"allows at most {worst.max_rank}. With these targets {input_name} can be at most {allowed}.")


def module_of(root: torch.nn.Module, path: str) -> torch.nn.Module:
    return root.get_submodule(path)
