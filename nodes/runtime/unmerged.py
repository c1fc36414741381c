"""Unmerged execution: LoRAs added to layer outputs with per-batch-row weights (forward hooks).

``out[n] += Σ_a w[n, a] · ΔLayer_a(x[n])``. The routing weights ``w`` ([rows, options]) are set by
the policy before each model call (``Routing.set``); the hooks exist only while a sampling run is
in progress (installed and removed by the binding, in a ``finally``), so nothing leaks.

A forward pass runs a couple of hundred hooks, so each does only arithmetic: the low-rank factors are
prepared once per run (``kernels.lowrank_routed.PreparedLowRank``), dense deltas and bias offsets cast
and uploaded once per run, the rows grouped once per model call and column set (``Routing.segments``,
``Routing.on_device``); the kernel backend is chosen once, at install. The plans' tensors stay on the
CPU: each hook builds its copies at its first call, in the dtype and on the device that layer computes
in (so an fp16 GPU run holds the LoRA tensors once, in fp16, and offloaded layers work too). The low-rank factors of
every layer reach that device together, in one copy from page-locked memory (``staging.PackedUpload``): one copy
per factor waited for the GPU each time (777 synchronous copies per run on an H100 for two LoRAs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import comfy.utils
import torch

from ...kernels import dense as dense_kernels
from ...kernels import dispatch, lowrank_routed
from .layers import LayerPlan
from .staging import PackedUpload, StagedTensors


def _autocast_checker():
    """``() → bool``: whether autocast is on for any device, resolved once (the hooks ask per layer call: 0.15 µs,
    where ``torch.is_autocast_enabled(x.device.type)`` with its device lookup took 0.5). Under autocast ``mm`` /
    ``bmm`` run in the autocast dtype while the in-place ``addmm_`` / ``baddbmm_`` / ``index_add_`` the kernels
    accumulate with do not (a dtype error): the hooks then run with autocast off for their device, in the dtypes
    they were prepared for, and the output is cast back."""
    any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)
    if any_enabled is not None:
        return any_enabled
    return lambda: torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()  # pragma: no cover - older torch


_autocast_on = _autocast_checker()


# The hooks read per-run state (prepared factors, the call's routing) that a torch.compile'd model (core's
# TorchCompileModel) would otherwise bake into a graph traced in one run and replay in the next: they run eagerly,
# a graph break per hooked layer (tests/integration/test_compiled.py).
_not_traced = getattr(getattr(torch, "compiler", None), "disable", None) or (lambda fn: fn)


@dataclass
class Routing:
    """Row weights for the current model call: [rows, options], or one row broadcast to every row."""

    weights: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict)
    _segments: dict = field(default_factory=dict)
    _on_device: dict = field(default_factory=dict)
    _used: dict = field(default_factory=dict)

    def set(self, weights: torch.Tensor | None) -> None:
        self.weights = weights
        self._cache.clear()
        self._segments.clear()
        self._on_device.clear()
        self._used.clear()

    def segments(self, rows: int, columns: tuple[int, ...], ranks: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> tuple[lowrank_routed.RowSegment, ...]:
        """The rows grouped by weight vector for a layer with these columns and adapter ranks (cached until the
        next ``set``; layers of one model call mostly share one key). Empty when no row uses these columns."""
        key = (rows, columns, ranks, dtype, device)
        hit = self._segments.get(key)
        if hit is None:
            w = self.for_rows(rows, columns)
            hit = () if w is None else lowrank_routed.plan_rows(w, ranks, dtype, device)
            self._segments[key] = hit
        return hit

    def on_device(self, rows: int, columns: "list[int] | tuple[int, ...]", dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor | None:
        """``for_rows`` in ``dtype`` on ``device`` (uploaded once per model call); None when no row uses these
        columns."""
        key = (rows, tuple(columns), dtype, device)
        if key not in self._on_device:
            w = self.used_rows(rows, columns)
            self._on_device[key] = None if w is None else w.to(device=device, dtype=dtype)
        return self._on_device[key]

    def used_rows(self, rows: int, columns: "list[int] | tuple[int, ...]") -> torch.Tensor | None:
        """``for_rows``, or None when no row uses these columns (checked once per model call)."""
        key = (rows, tuple(columns))
        if key not in self._used:
            w = self.for_rows(rows, columns)
            self._used[key] = None if w is None or not bool(w.any()) else w
        return self._used[key]

    def for_rows(self, rows: int, columns: "list[int] | tuple[int, ...]") -> torch.Tensor | None:
        """[rows, len(columns)] float32 weights on the CPU (the kernels read them on the host)."""
        if self.weights is None:
            return None
        key = (rows, tuple(columns))
        hit = self._cache.get(key)
        if hit is None:
            w = self.weights[:, list(columns)]
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

    def __init__(self, plans: list[LayerPlan], routing: Routing, upload: PackedUpload | None = None):
        """``upload``: ``lowrank_upload(plans)``, or one kept from an earlier run over the same factors (its
        page-locked copy is made once)."""
        self.plans = plans
        self.routing = routing
        self.handles: list = []
        self._add_routed = lowrank_routed.add_routed
        self.upload = upload if upload is not None else lowrank_upload(plans)
        self._staged: dict[torch.device, StagedTensors] = {}

    def staged(self, device: torch.device) -> StagedTensors:
        """Every plan's low-rank factors on ``device`` (uploaded together at the first request of a run)."""
        hit = self._staged.get(device)
        if hit is None:
            hit = self._staged[device] = StagedTensors(self.upload, device)
        return hit

    def _hook(self, plan: LayerPlan):
        prepared: dict = {}  # (what, dtype, device) → tensors ready to run, built at the first call of the run
        ranks = tuple(a.rank for a in plan.lowrank)
        columns = tuple(plan.lowrank_columns)

        def ready(what: str, dtype: torch.dtype, device: torch.device, build):
            hit = prepared.get((what, dtype, device))
            if hit is None:
                hit = prepared[(what, dtype, device)] = build(dtype, device)
            return hit

        def lowrank_factors(dtype, device):
            staged = self.staged(device)
            adapters = [dataclasses.replace(a, down=staged.get(a.down), up=staged.get(a.up),
                                            mid=None if a.mid is None else staged.get(a.mid)) for a in plan.lowrank]
            return lowrank_routed.PreparedLowRank(adapters, plan.conv, dtype, device)

        def dense_deltas(dtype, device):
            return [t.to(device=device, dtype=dtype) for t in plan.dense]

        def per_channel(tensors):  # [options, channels]: bias offsets, a norm layer's Δw (flattened)
            return lambda dtype, device: torch.stack([t.reshape(-1) for t in tensors]).to(device=device, dtype=dtype)

        bias_offsets, norm_scales = per_channel(plan.bias), per_channel(plan.dense)

        def per_row(values, ndim):  # [rows, channels] → broadcastable against the output
            if plan.norm is not None:
                return plan.norm.per_row(values, ndim)
            rows = values.shape[0]
            return values.reshape((rows, -1, *([1] * (ndim - 2))) if plan.conv is not None
                                  else (rows, *([1] * (ndim - 2)), -1))

        @_not_traced
        def add_adapters(module, inputs, output):
            x = inputs[0]
            if _autocast_on():  # (rare: no sampler autocasts; another pack might) — then again, without it
                with torch.autocast(x.device.type, enabled=False):
                    return add_adapters(module, inputs, output)
            rows = x.shape[0]
            in_place = output.dtype == x.dtype and not output.requires_grad
            # at least fp32 (fp64 stays fp64: .float() rounded a float64 layer's whole output, delta included)
            target = output if in_place else output.to(torch.promote_types(output.dtype, torch.float32))
            if plan.lowrank:
                segments = self.routing.segments(rows, columns, ranks, x.dtype, x.device)
                if segments:
                    factors = ready("lowrank", x.dtype, x.device, lowrank_factors)
                    if in_place:
                        self._add_routed(factors, x, target, segments)
                    else:
                        delta = torch.zeros(output.shape, dtype=x.dtype, device=x.device)
                        target += self._add_routed(factors, x, delta, segments).to(target.dtype)
            if plan.dense and plan.norm is not None:  # out = n(x)·w + b: a Δw adds n(x)·Δw
                w = self.routing.on_device(rows, plan.dense_columns, x.dtype, x.device)
                if w is not None:
                    scales = ready("norm", x.dtype, x.device, norm_scales)  # [options, channels]
                    target += (plan.norm.normalize(x) * per_row(w @ scales, output.ndim)).to(target.dtype)
            elif plan.dense:
                w = self.routing.used_rows(rows, plan.dense_columns)
                if w is not None:
                    deltas = ready("dense", x.dtype, x.device, dense_deltas)
                    target += dense_kernels.dense_delta(x, deltas, w, conv=plan.conv).to(target.dtype)
            if plan.bias:
                w = self.routing.on_device(rows, plan.bias_columns, target.dtype, x.device)
                if w is not None:
                    offsets = ready("bias", target.dtype, x.device, bias_offsets)  # [options, out]
                    target += per_row(w @ offsets, output.ndim)
            return output if in_place else target.to(output.dtype)
        return add_adapters

    def install(self, base_model: torch.nn.Module, device) -> None:
        self.remove()
        _, self._add_routed = dispatch.select("lowrank_routed", device)
        seen: dict[str, LayerPlan] = {}
        for plan in (p.copy() for p in self.plans):
            merged = seen.get(plan.module_path)
            if merged is None:  # weight and bias plans of one module share one hook
                seen[plan.module_path] = plan
                continue
            for name in ("lowrank_columns", "lowrank", "dense_columns", "dense", "bias_columns", "bias"):
                getattr(merged, name).extend(getattr(plan, name))
            merged.conv = merged.conv or plan.conv
            merged.norm = merged.norm or plan.norm
        modules = dict(base_model.named_modules())  # one walk: get_attr per layer cost ≈ 30 µs each, per run
        for path, plan in seen.items():
            module = modules.get(path)
            if module is None:
                module = comfy.utils.get_attr(base_model, path)
            self.handles.append(module.register_forward_hook(self._hook(plan)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._staged.clear()
        self.upload.release()


def lowrank_sources(plans: list[LayerPlan]) -> list[torch.Tensor]:
    """The low-rank factors of ``plans``, in a fixed order (what ``lowrank_upload`` packs)."""
    return [t for plan in plans for a in plan.lowrank for t in (a.down, a.up, a.mid) if t is not None]


def lowrank_upload(plans: list[LayerPlan], kept: PackedUpload | None = None) -> PackedUpload:
    """A ``PackedUpload`` of the plans' factors: ``kept`` when it packs exactly these tensors (an earlier run's)."""
    sources = lowrank_sources(plans)
    return kept if kept is not None and kept.matches(sources) else PackedUpload(sources)
