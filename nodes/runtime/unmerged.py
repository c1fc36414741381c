"""Unmerged execution: LoRAs added to layer outputs with per-batch-row weights (forward hooks).

``out[n] += Σ_a w[n, a] · ΔLayer_a(x[n])``. The routing weights ``w`` ([rows, options]) are set by
the policy before each model call (``Routing.set``); the hooks exist only while a sampling run is
in progress (installed and removed by the binding, in a ``finally``), so nothing leaks.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import comfy.utils
import torch

from ...kernels import dense as dense_kernels
from ...kernels import lowrank
from .layers import LayerPlan


@dataclass
class Routing:
    """Row weights for the current model call: [rows, options], or one row broadcast to every row."""

    weights: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)

    def set(self, weights: torch.Tensor | None) -> None:
        self.weights = weights
        self._cache.clear()

    def for_rows(self, rows: int, columns: list[int]) -> torch.Tensor | None:
        """[rows, len(columns)] float32 weights on the CPU (the kernels read them on the host)."""
        if self.weights is None:
            return None
        key = (rows, tuple(columns))
        hit = self._cache.get(key)
        if hit is None:
            w = self.weights[:, columns]
            if w.shape[0] == 1 and rows != 1:
                w = w.expand(rows, -1)
            elif w.shape[0] != rows:
                if rows % w.shape[0]:
                    raise RuntimeError(f"routing has {w.shape[0]} rows but a layer saw {rows}")
                w = w.repeat_interleave(rows // w.shape[0], dim=0)  # a block that folded tokens into the batch
            hit = self._cache[key] = w.float().contiguous()
        return hit


class UnmergedAdapters:
    """Forward hooks that add the planned adapters to each layer's output."""

    def __init__(self, plans: list[LayerPlan], routing: Routing):
        self.plans = plans
        self.routing = routing
        self.handles: list = []
        self._device_plans: list[LayerPlan] = []

    def _hook(self, plan: LayerPlan):
        def add_adapters(module, inputs, output):
            x = inputs[0]
            rows = x.shape[0]
            delta = None
            if plan.lowrank:
                w = self.routing.for_rows(rows, plan.lowrank_columns)
                if w is not None and bool(w.any()):
                    delta = lowrank.lowrank_delta(x, plan.lowrank, w, conv=plan.conv)
            if plan.dense:
                w = self.routing.for_rows(rows, plan.dense_columns)
                if w is not None and bool(w.any()):
                    d = dense_kernels.dense_delta(x, [t.to(x.dtype) for t in plan.dense], w, conv=plan.conv)
                    delta = d if delta is None else delta + d
            if plan.bias:
                w = self.routing.for_rows(rows, plan.bias_columns)
                if w is not None and bool(w.any()):
                    b = w.to(device=x.device, dtype=x.dtype) @ torch.stack([t.to(x.dtype).reshape(-1) for t in plan.bias])  # [rows, out]
                    b = b.reshape(rows, -1, *([1] * (output.ndim - 2))) if plan.conv else b.reshape(
                        rows, *([1] * (output.ndim - 2)), -1)
                    delta = b if delta is None else delta + b
            return output if delta is None else output + delta.to(output.dtype)
        return add_adapters

    def install(self, base_model: torch.nn.Module, device) -> None:
        self.remove()
        self._device_plans = [p.to(device) for p in self.plans]
        seen: dict[str, LayerPlan] = {}
        for plan in self._device_plans:
            merged = seen.get(plan.module_path)
            if merged is None:  # weight and bias plans of one module share one hook
                seen[plan.module_path] = plan
                continue
            for name in ("lowrank_columns", "lowrank", "dense_columns", "dense", "bias_columns", "bias"):
                getattr(merged, name).extend(getattr(plan, name))
            merged.conv = merged.conv or plan.conv
        for path, plan in seen.items():
            module = comfy.utils.get_attr(base_model, path)
            self.handles.append(module.register_forward_hook(self._hook(plan)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._device_plans = []
