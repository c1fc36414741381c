"""Per-layer plans for the unmerged runtime: which options (LoRAs) touch a layer, and how.

Plain LoRA/LoCon patches stay factorised (``kernels.lowrank``). Every other patch (LoHa, LoKr, DoRA,
OFT, offsets, full diffs) becomes an exact dense ΔW computed once with ComfyUI's own
``calculate_weight`` at the entry's strength (``kernels.dense``). Dense deltas are linear in the row
weight: exact for row weights 0/1 (routing), a linear blend otherwise — DoRA is not linear in its
strength, so for DoRA only 0/1 routing reproduces core exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.lora
import comfy.utils
import torch

from ...kernels.lowrank import ConvSpec, LowRankAdapter
from ..patching import delta_base

DENSE_BUDGET_BYTES = 2 * 1024**3  # refuse to build more dense deltas than this (clear error, not OOM)


class DenseBudgetError(MemoryError):
    pass


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

    def copy(self) -> "LayerPlan":
        """A copy with its own lists (the tensors are shared; they stay on the CPU between runs)."""
        return LayerPlan(self.key, self.module_path, self.conv, list(self.lowrank_columns), list(self.lowrank),
                         list(self.dense_columns), list(self.dense), list(self.bias_columns), list(self.bias))


def conv_spec(module: torch.nn.Module) -> ConvSpec | None:
    if isinstance(module, torch.nn.Conv2d):
        return ConvSpec(stride=tuple(module.stride), padding=tuple(module.padding),
                        dilation=tuple(module.dilation), groups=module.groups)
    return None


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
    return LowRankAdapter(down=down.float(), up=up.float(), mid=None if mid is None else mid.float(), scale=scale)


def exact_dense_delta(base_model, key: str, patch_list: list[tuple]) -> torch.Tensor:
    """ΔW of a patch list with core math, in fp32 on the CPU, from the weight as the layer computes with it: a
    quantized layer's (fp8 scaled) dequantized by its own ``convert_weight``, as core's patching does (DoRA's ΔW
    depends on the weight's norm); see ``patching.delta_base`` for weights only their own pack can read."""
    w32 = delta_base(base_model, key, patch_list).cpu()
    return comfy.lora.calculate_weight(patch_list, w32.clone(), key) - w32


def build_layer_plans(base_model, options: list[dict[str, list[tuple]]]) -> list[LayerPlan]:
    """One plan per patched key; column j of the routing weights is option j."""
    keys = sorted({k for opt in options for k in opt})
    plans: list[LayerPlan] = []
    dense_bytes = 0
    for key in keys:
        module_path, _, param = key.rpartition(".")
        module = comfy.utils.get_attr(base_model, module_path)
        weight = module.weight
        plan = LayerPlan(key=key, module_path=module_path, conv=conv_spec(module))
        for column, option in enumerate(options):
            patch_list = option.get(key)
            if not patch_list:
                continue
            if param == "bias":
                plan.bias_columns.append(column)
                plan.bias.append(exact_dense_delta(base_model, key, patch_list))
                continue
            factors = as_lowrank(patch_list[0], weight) if len(patch_list) == 1 else None
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
