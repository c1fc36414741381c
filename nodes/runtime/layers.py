"""Per-layer plans for the unmerged runtime: which options (LoRAs) touch a layer, and how.

Plain LoRA/LoCon patches stay factorised (``kernels.lowrank``). Every other patch (LoHa, LoKr, DoRA,
OFT, offsets, full diffs) becomes an exact dense ΔW computed once with ComfyUI's own
``calculate_weight`` at the entry's strength (``kernels.dense``). Dense deltas are linear in the row
weight: exact for row weights 0/1 (routing), a linear blend otherwise — DoRA is not linear in its
strength, so for DoRA only 0/1 routing reproduces core exactly.

Norm layers (LayerNorm, RMSNorm, GroupNorm) patched by LyCORIS ``w_norm`` / ``b_norm`` files (ComfyUI loads them as
``diff`` patches of the affine weight and bias) run exactly too: out = n(x)·w + b, so a Δw adds n(x)·Δw (the hook
re-normalises x once) and a Δb adds Δb. Layers no hook can run (3-D or grouped convs, parameters other than a
weight or bias) are named by :func:`unmerged_obstacle`; the binding then merges instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import comfy.lora
import torch
import torch.nn.functional as F

from ...kernels.lowrank import ConvSpec, LowRankAdapter
from ..patching import delta_base, linear_like, weight_independent
from .merged_swap import patched_keys, resolve_layers

DENSE_BUDGET_BYTES = 2 * 1024**3  # refuse to build more dense deltas than this (clear error, not OOM)


class DenseBudgetError(MemoryError):
    pass


@dataclass(frozen=True)
class NormSpec:
    """A LayerNorm's, RMSNorm's or GroupNorm's normalisation, n(x), without its affine weight and bias."""

    kind: str  # "layer" | "rms" | "group"
    shape: tuple[int, ...]  # layer / rms: normalized_shape; group: (channels,)
    groups: int
    eps: float | None  # RMSNorm's None: torch's default for the input's dtype, as the layer itself computes

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return F.layer_norm(x, self.shape, None, None, self.eps)
        if self.kind == "rms":
            return F.rms_norm(x, self.shape, None, self.eps)
        return F.group_norm(x, self.groups, None, None, self.eps)

    def per_row(self, values: torch.Tensor, ndim: int) -> torch.Tensor:
        """``[rows, *shape]`` per-row weight or bias values, shaped to broadcast against the layer's output."""
        rows = values.shape[0]
        if self.kind != "group":  # the normalised dims are the last ones
            return values.reshape(rows, *([1] * (ndim - 1 - len(self.shape))), *self.shape)
        return values.reshape(rows, -1, *([1] * (ndim - 2)))  # channels first


_RMS_NORM = getattr(torch.nn, "RMSNorm", None)  # torch ≥ 2.4; ComfyUI's RMSNorm layers subclass it there


def norm_spec(module: torch.nn.Module) -> NormSpec | None:
    if isinstance(module, torch.nn.LayerNorm) and module.elementwise_affine:
        return NormSpec("layer", tuple(module.normalized_shape), 1, float(module.eps))
    if _RMS_NORM is not None and isinstance(module, _RMS_NORM) and module.elementwise_affine:
        return NormSpec("rms", tuple(module.normalized_shape), 1, None if module.eps is None else float(module.eps))
    if isinstance(module, torch.nn.GroupNorm) and module.affine:
        return NormSpec("group", (int(module.num_channels),), int(module.num_groups), float(module.eps))
    return None


def unmerged_obstacle(base_model: torch.nn.Module, options: list[dict[str, list[tuple]]],
                      combined_rows: bool = False) -> str | None:
    """Why the hooks cannot run these options' patches on this model (the first such layer), or None.

    ``combined_rows``: some rows apply several options at once (AutoLoRA's LoRA branch is the whole set). Core applies
    a set's LoRAs one after another, so a DoRA / OFT patch that follows another LoRA on the same layer changes the
    weight *that* LoRA made — not a sum of per-LoRA deltas of the base weight, which is what the hooks add (1e-3 off
    at γ = 1, found on a Flux qkv). Merging is exact there (core's order).

    The hooks add a layer's delta to its output, which they can for linear layers (also other packs' layers with a
    2-D weight), 2-D convs (groups 1, zero padding) and LayerNorm / RMSNorm / GroupNorm; a 1-D / 3-D / transposed or
    grouped conv, an embedding, another norm, or a parameter that is no layer's weight or bias (SD3's ``pos_embed``,
    Flux's RMSNorm ``scale``) has no such path here — merging them is exact (core's own math). Nor can they hold more
    exact dense deltas (LoHa / LoKr / DoRA on a large model) than ``DENSE_BUDGET_BYTES``."""
    dense = 0  # bytes of the exact dense deltas the hooks would build (fp32, per option and layer)
    for layer in resolve_layers(base_model, patched_keys(options)):
        key, module, param = layer.key, layer.module, layer.name
        kind = type(module).__name__
        dense += _dense_delta_bytes(layer, options)
        if param not in ("weight", "bias"):
            return f"{key} (a {kind}'s {param!r}, not a layer weight or bias)"
        if norm_spec(module) is not None:
            continue
        if isinstance(module, torch.nn.Conv2d):
            if module.groups == 1 and module.padding_mode == "zeros":
                continue
            return f"{key} (a Conv2d with groups {module.groups}, padding mode {module.padding_mode!r})"
        if isinstance(module, (torch.nn.modules.conv._ConvNd, torch.nn.Embedding)):  # Conv1d / 3d, transposed
            return f"{key} (a {kind})"
        weight = getattr(module, "weight", None)
        # other packs' layers with a 2-D weight (their quantized Linears) compute as linear layers
        if linear_like(module) or (isinstance(weight, torch.Tensor) and len(weight.shape) == 2):
            continue
        return f"{key} (a {kind})"
    if dense > DENSE_BUDGET_BYTES:
        return (f"non-low-rank LoRAs (LoHa / LoKr / DoRA / full diffs): their exact dense deltas need "
                f"{dense / 2**30:.1f} GiB, over the hooks' {DENSE_BUDGET_BYTES / 2**30:.0f} GiB budget")
    return _order_dependent_layer(options) if combined_rows else None


def _order_dependent_layer(options: list[dict[str, list[tuple]]]) -> str | None:
    """The first layer where a weight-dependent patch (DoRA, OFT, GLoRA) comes after another option's patch, which
    it then depends on (see ``unmerged_obstacle``); None if there is none."""
    for key in patched_keys(options):
        patching = [j for j, option in enumerate(options) if option.get(key)]
        for j in patching[1:]:
            if not all(weight_independent(p[1]) for p in options[j][key]):
                return (f"{key} (LoRA {j + 1}'s DoRA / OFT patch depends on the weight LoRA {patching[0] + 1} "
                        "patched before it, and a row here applies both)")
    return None


def _dense_delta_bytes(layer, options: list[dict[str, list[tuple]]]) -> int:
    """What ``build_layer_plans`` would hold for this layer as dense deltas: an fp32 ΔW per option whose patch list
    is not one plain LoRA (norm layers' and biases' deltas are the size of the parameter too)."""
    norm = norm_spec(layer.module)
    dense = sum(1 for option in options if option.get(layer.key) and (
        layer.name != "weight" or _plain_lowrank(option[layer.key], layer.original, norm) is None))
    return 4 * math.prod(layer.original.shape) * dense


@dataclass
class LayerPlan:
    key: str  # "<module>.weight" or "<module>.bias"
    module_path: str
    conv: ConvSpec | None
    lowrank_columns: list[int] = field(default_factory=list)
    lowrank: list[LowRankAdapter] = field(default_factory=list)
    dense_columns: list[int] = field(default_factory=list)
    dense: list[torch.Tensor] = field(default_factory=list)
    bias_columns: list[int] = field(default_factory=list)
    bias: list[torch.Tensor] = field(default_factory=list)
    norm: NormSpec | None = None  # a LayerNorm / RMSNorm / GroupNorm: dense deltas scale n(x), not x

    def copy(self) -> "LayerPlan":
        """A copy with its own lists (the tensors are shared; they stay on the CPU between runs)."""
        return LayerPlan(self.key, self.module_path, self.conv, list(self.lowrank_columns), list(self.lowrank),
                         list(self.dense_columns), list(self.dense), list(self.bias_columns), list(self.bias),
                         self.norm)


def conv_spec(module: torch.nn.Module) -> ConvSpec | None:
    if isinstance(module, torch.nn.Conv2d):
        return ConvSpec(stride=tuple(module.stride), padding=tuple(module.padding),
                        dilation=tuple(module.dilation), groups=module.groups)
    return None


_FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def as_lowrank(entry_patch: tuple, weight: torch.Tensor) -> LowRankAdapter | None:
    """A plain LoRA/LoCon patch as factors shaped for the layer; None when it is anything else."""
    strength, patch, strength_model, offset, function = entry_patch
    if getattr(patch, "name", None) != "lora" or offset is not None or function is not None or strength_model != 1.0:
        return None
    up, down, alpha, mid, dora_scale = patch.weights[:5]
    reshape = patch.weights[5] if len(patch.weights) > 5 else None
    if dora_scale is not None or reshape is not None:
        return None
    rank = down.shape[0]
    scale = float(strength) * (1.0 if alpha is None else float(alpha) / rank)
    shape = weight.shape  # the layer's; not .ndim, which packed storage (GGUF's GGMLTensor) reports for its bytes
    if len(shape) == 4:
        if mid is None:
            down = down.reshape(rank, *shape[1:])
        else:
            down = down.reshape(rank, shape[1], 1, 1)
            mid = mid.reshape(rank, rank, *shape[2:])
        up = up.reshape(shape[0], rank, 1, 1)
    elif len(shape) == 2 and mid is None:
        down, up = down.reshape(rank, -1), up.reshape(up.shape[0], rank)
    else:
        return None
    # Kept in the file's dtype where the hooks can cast from it (the factors themselves or views of them: no copy held
    # between runs; PreparedLowRank casts on the device); fp8 and other narrow forms become fp32 here.
    def usable(t):
        return t if t.dtype in _FACTOR_DTYPES else t.float()

    return LowRankAdapter(down=usable(down), up=usable(up), mid=None if mid is None else usable(mid), scale=scale)


def _plain_lowrank(patch_list: list[tuple], weight: torch.Tensor, norm: NormSpec | None) -> LowRankAdapter | None:
    """The factors the hooks run a weight's patch list as (one plain LoRA / LoCon on a layer that is no norm), or
    None where it becomes an exact dense delta."""
    return as_lowrank(patch_list[0], weight) if len(patch_list) == 1 and norm is None else None


def exact_dense_delta(base_model, key: str, patch_list: list[tuple]) -> torch.Tensor:
    """ΔW of a patch list with core math, in fp32 on the CPU, from the weight as the layer computes with it: a
    quantized layer's (fp8 scaled) dequantized by its own ``convert_weight``, as core's patching does (DoRA's ΔW
    depends on the weight's norm); see ``patching.delta_base`` for weights only their own pack can read.

    Computed where the weight is (on a GPU as core patches there, where this moved every weight to the CPU and did a
    LoHa's or LoKr's products there), one layer's worth of scratch at a time; the result is kept on the CPU until a
    hook casts it for the device it computes on (GPU memory as before). Not yet measured on a GPU."""
    w32 = delta_base(base_model, key, patch_list)
    return (comfy.lora.calculate_weight(patch_list, w32.clone(), key) - w32).cpu()


def build_layer_plans(base_model, options: list[dict[str, list[tuple]]],
                      lowrank_memo: dict | None = None) -> list[LayerPlan]:
    """One plan per patched key; column j of the routing weights is option j.

    ``lowrank_memo``: a dict kept by the caller across runs of the same options, so that each run's plans hold the
    same factor tensors (views of the LoRA's own, or fp32 copies of fp8 ones) and their packed upload is made once
    (``unmerged.lowrank_upload``). Dense deltas are computed per run: DoRA's depends on the weight's current value."""
    memo = {} if lowrank_memo is None else lowrank_memo
    plans: list[LayerPlan] = []
    dense_bytes = 0
    for layer in resolve_layers(base_model, patched_keys(options)):
        key, module, param = layer.key, layer.module, layer.name
        weight = module.weight
        norm = norm_spec(module)
        plan = LayerPlan(key=key, module_path=key.rpartition(".")[0], conv=conv_spec(module), norm=norm)
        for column, option in enumerate(options):
            patch_list = option.get(key)
            if not patch_list:
                continue
            if param == "bias":
                plan.bias_columns.append(column)
                plan.bias.append(exact_dense_delta(base_model, key, patch_list))
                continue
            memo_key = (key, column, tuple(weight.shape), id(patch_list[0][1]))
            factors = memo.get(memo_key)
            if factors is None:
                factors = memo[memo_key] = _plain_lowrank(patch_list, weight, norm)
            if factors is not None:
                plan.lowrank_columns.append(column)
                plan.lowrank.append(factors)
            else:
                delta = exact_dense_delta(base_model, key, patch_list)
                dense_bytes += delta.numel() * delta.element_size()
                if dense_bytes > DENSE_BUDGET_BYTES:
                    raise DenseBudgetError(
                        f"non-low-rank LoRAs (LoHa/LoKr/DoRA/OFT) need more than {DENSE_BUDGET_BYTES / 2**30:.0f} GiB "
                        "of exact dense deltas for the unmerged runtime; use the merged strategy or fewer LoRAs.")
                plan.dense_columns.append(column)
                plan.dense.append(delta)
        plans.append(plan)
    return plans
