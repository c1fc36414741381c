"""How the trained low-rank residual of each target layer is parameterised.

Every parameterisation gives, per target layer, factors ``(up, down, scale)`` whose product is the
layer's trainable weight residual ``ΔW = scale · up @ down`` (conv: ``down`` is a
``[r, in, kh, kw]`` kernel and ``up`` a ``[out, r, 1, 1]`` one). The factors are recomputed once
per optimisation step (``factors()``, differentiable) and read by the forward hooks.

* ``standard LoRA`` — ``down`` and ``up`` are the parameters; ``down`` ~ U(−1/√fan_in, 1/√fan_in)
  (kohya/PEFT's kaiming-uniform with a = √5), ``up`` = 0, ``scale = alpha / rank`` (alpha 0 means
  alpha = rank, scale 1). Training therefore starts exactly at the base model.
* ``LiDB`` (HyperDreamBooth, algorithms.md §3.2, via ``nodes/hypernet/lidb.py``) — per Linear
  layer ``down = down_w @ down_aux``, ``up = up_aux @ up_w`` with frozen random aux matrices
  regenerated from a per-layer seed; only ``down_w [r, down_dim]`` (xavier-normal init) and
  ``up_w [up_dim, r]`` (zeros) train; scale 1 (alpha = rank, as the LiDB export writes).
* ``rank-relaxed from initial LoRA`` (HyperDreamBooth fast finetune) — the initial LoRA (a
  LORA_SET, any format) stays frozen, applied to the training model exactly as ComfyUI applies it
  (weight patches), and a standard rank-r residual trains on top (``up`` = 0, so step 0 *is* the
  initial LoRA's output). ``export`` merges ``ΔW0 + scale·up@down`` per layer and re-factorises
  it by SVD (see ``rank_relaxed_export``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...kernels import merge_math
from ..hypernet import lidb
from .targets import TargetLayer

PARAMETERISATIONS = ("standard LoRA", "LiDB", "rank-relaxed from initial LoRA")
STANDARD, LIDB, RANK_RELAXED = PARAMETERISATIONS

Factors = dict[str, tuple[torch.Tensor, torch.Tensor, float]]


def _kaiming_uniform_down(layer: TargetLayer, rank: int, generator: torch.Generator) -> torch.Tensor:
    fan_in = math.prod(layer.down_shape)
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand((rank, *layer.down_shape), generator=generator) * 2.0 - 1.0) * bound


def _zeros_up(layer: TargetLayer, rank: int) -> torch.Tensor:
    return torch.zeros((layer.out_features, rank, *([1] * len(layer.kernel_size))))


@dataclass
class StandardLora:
    """Plain LoRA factors per target (also the trainable residual of rank-relaxed training).

    ``ranks`` may lower the rank of single layers (capped narrow layers); their alpha is scaled with
    the rank so every layer has the same scale alpha/rank.
    """

    targets: list[TargetLayer]
    rank: int
    alpha: float
    seed: int
    ranks: dict[str, int] | None = None
    down: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    up: dict[str, torch.nn.Parameter] = field(default_factory=dict)

    def __post_init__(self) -> None:
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed))
        for layer in self.targets:
            r = (self.ranks or {}).get(layer.key, self.rank)
            self.down[layer.key] = torch.nn.Parameter(_kaiming_uniform_down(layer, r, generator))
            self.up[layer.key] = torch.nn.Parameter(_zeros_up(layer, r))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to(self, device: torch.device) -> "StandardLora":
        for table in (self.down, self.up):
            for key, p in table.items():
                table[key] = torch.nn.Parameter(p.detach().to(device))
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for key in self.down for p in (self.down[key], self.up[key])]

    def factors(self) -> Factors:
        return {key: (self.up[key], self.down[key], self.scale) for key in self.down}

    def export(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``key → (up, down, alpha)`` as written to the file (ΔW = alpha/r · up @ down, r = the layer's rank)."""
        return {key: (self.up[key].detach().float().cpu(), self.down[key].detach().float().cpu(),
                      self.alpha * self.down[key].shape[0] / self.rank) for key in self.down}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class LidbLora:
    """LiDB factors: frozen seeded aux matrices, trainable ``down_w``/``up_w`` (nodes/hypernet/lidb.py)."""

    spec: lidb.LidbSpec
    seed: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    down_w: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    up_w: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    _aux: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def for_targets(cls, targets: list[TargetLayer], rank: int, down_dim: int, up_dim: int, seed: int) -> "LidbLora":
        convs = [t.key for t in targets if t.kind != "linear"]
        if convs:
            raise ValueError(f"parameterisation 'LiDB' adapts Linear layers only; targets include {len(convs)} conv "
                             f"layers (e.g. {convs[0]}). Choose 'attention', 'attention+FF' or a text-encoder preset.")
        layers = tuple(lidb.LidbLayer(t.key, t.in_features, t.out_features, lidb.layer_seed(seed, t.key))
                       for t in targets)
        spec = lidb.LidbSpec(layers, rank=rank, down_dim=down_dim, up_dim=up_dim)
        return cls(spec=spec, seed=seed)

    def __post_init__(self) -> None:
        generator = torch.Generator(device="cpu").manual_seed(int(self.seed) ^ 0x5EED)
        for layer in self.spec.layers:
            down_w = torch.empty(self.spec.rank, self.spec.down_dim)
            std = math.sqrt(2.0 / (self.spec.rank + self.spec.down_dim))  # xavier_normal (MFaceTech init)
            down_w.copy_(torch.randn(down_w.shape, generator=generator) * std)
            self.down_w[layer.key] = torch.nn.Parameter(down_w)
            self.up_w[layer.key] = torch.nn.Parameter(torch.zeros(self.spec.up_dim, self.spec.rank))

    def to(self, device: torch.device) -> "LidbLora":
        self.device = torch.device(device)
        for table in (self.down_w, self.up_w):
            for key, p in table.items():
                table[key] = torch.nn.Parameter(p.detach().to(device))
        self._aux = {layer.key: lidb.aux_matrices(self.spec, layer, device=self.device) for layer in self.spec.layers}
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for key in self.down_w for p in (self.down_w[key], self.up_w[key])]

    def factors(self) -> Factors:
        if not self._aux:
            self.to(self.device)
        out: Factors = {}
        for key, (down_aux, up_aux) in self._aux.items():
            out[key] = (up_aux @ self.up_w[key], self.down_w[key] @ down_aux, 1.0)
        return out

    def export(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        down_w = {k: p.detach().float().cpu() for k, p in self.down_w.items()}
        up_w = {k: p.detach().float().cpu() for k, p in self.up_w.items()}
        return {key: (up, down, float(self.spec.rank)) for key, (up, down) in lidb.materialize(self.spec, down_w, up_w).items()}

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class RelaxedLayer:
    """One layer of a rank-relaxed export: the merged delta and its re-factorisation."""

    key: str
    up: torch.Tensor
    down: torch.Tensor
    rel_error: float


def rank_relaxed_export(initial_deltas: dict[str, torch.Tensor], residual: StandardLora, output_rank: int,
                        initial_ranks: dict[str, int]) -> dict[str, RelaxedLayer]:
    """Merge and re-factorise: per layer ``ΔW = ΔW0 + (alpha/r)·up@down``, then truncated SVD.

    ``output_rank`` 0 keeps rank(ΔW0) + r per layer (its rank bound, so the SVD is exact up to
    float rounding: HyperDreamBooth keeps all non-zero singular values); a positive value is the
    stated rank (capped by the layer), with the relative Frobenius error reported per layer.
    Layers of the initial LoRA outside the targets are re-factorised the same way.
    """
    residual_factors = residual.export()
    merged: dict[str, RelaxedLayer] = {}
    for key in sorted(set(initial_deltas) | set(residual_factors)):
        delta = initial_deltas.get(key)
        bound = initial_ranks.get(key, 0)
        if key in residual_factors:
            up, down, alpha = residual_factors[key]
            r = down.shape[0]
            part = (alpha / r) * (up.flatten(1) @ down.flatten(1))
            shape = (up.shape[0], *down.shape[1:])
            part = part.reshape(shape)
            delta = part if delta is None else delta.float() + part
            bound += r
        rank = bound if output_rank == 0 else output_rank
        up, down, err = merge_math.svd_factorize(delta.float(), max(1, rank))
        merged[key] = RelaxedLayer(key, up, down, err)
    return merged
