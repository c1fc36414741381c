"""The hypernetwork: CLIP-vision image tokens → LiDB weights for every target layer.

Architecture (HyperDreamBooth's "ViT encoder + transformer decoder", MFaceTech ``modules/hypernet.py``,
algorithms.md §3.3; the ViT is ComfyUI's own CLIP-vision model, run by ``CLIPVisionEncode``):

    m   = image_proj(LayerNorm(tokens))                  image memory  [B, T, d]
    u_0 = 0                                              normalised weights [B, L, P] (P = r·(down+up))
    for k in 1…s:                                        iterative refinement, s = ``iterations`` (4)
        h   = weight_in(u_{k-1}) + pos_proj(sinusoid)     one token per target layer
        h   = Block_N(… Block_1(h, m))                    self-attn over layers, cross-attn to m, MLP
        u_k = u_{k-1} + head_l(LayerNorm(h_l))            per-layer linear head, [d → P] for layer l
    LiDB weights w = output_scale ⊙ u_s

The heads start near zero (normal, std 1e-3, as MFaceTech's ``delta_proj``), so an untrained network
predicts ≈ the zero LoRA. Deviation from MFaceTech: its ``delta_proj`` is one Linear shared by all
layer tokens; here every layer has its own head (``L·d·P`` weights, ≈ 4.9 M for SD1.5 at the
defaults). A shared head must learn the product "layer identity × image" inside the decoder; on
the synthetic subjects of the training tests it was still at 0.25 of the initial loss after 300
steps where per-layer heads reached 0.004.

``output_scale`` (a buffer, one value per layer and per down/up half) is set by the trainer
to the RMS of the projected targets, so the decoder works in unit-scale numbers for every layer
(real LoRAs differ by orders of magnitude between layers).

LoRA-of-Change variant (``variant="pair"``, algorithms.md §4): the before and after token sets are
concatenated per token, ``[f_A ; f_A′] ∈ R^{2F}``, and projected by ``image_proj`` ("concatenated
and projected"); the decoder is the same.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .lidb import LidbSpec

VARIANTS = ("image", "pair")
FEATURE_SOURCES = ("last_hidden_state", "penultimate_hidden_states")
DELTA_INIT_STD = 1e-3
MODEL_DIM_LIMIT = 4096


def heads_for(model_dim: int, max_head_dim: int = 64) -> int:
    """Fewest heads that divide ``model_dim`` with a head dim ≤ 64 (MFaceTech's rule)."""
    for heads in range(1, model_dim + 1):
        if model_dim % heads == 0 and model_dim // heads <= max_head_dim:
            return heads
    return model_dim


@dataclass(frozen=True)
class HypernetConfig:
    """Everything besides the LiDB spec that defines a hypernet (stored as JSON in the file)."""

    variant: str
    feature_dim: int
    feature_source: str = "last_hidden_state"
    model_dim: int = 256
    num_blocks: int = 4
    num_heads: int = 4
    iterations: int = 4
    base_model: str = ""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}.")
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source must be one of {', '.join(FEATURE_SOURCES)}, "
                             f"got {self.feature_source!r}.")
        for name, low, high in (("feature_dim", 1, 65536), ("model_dim", 1, MODEL_DIM_LIMIT), ("num_blocks", 1, 64),
                                ("num_heads", 1, 256), ("iterations", 1, 64)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}…{high}, got {value!r}.")
        if self.model_dim % self.num_heads:
            raise ValueError(f"model_dim {self.model_dim} is not divisible by num_heads {self.num_heads}.")

    @property
    def input_dim(self) -> int:
        """Width of one image token as the network reads it (2F for before/after pairs)."""
        return self.feature_dim * (2 if self.variant == "pair" else 1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "HypernetConfig":
        if not isinstance(data, dict):
            raise ValueError("hypernet config must be a JSON object.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"hypernet config has unknown fields {unknown}; known: {sorted(known)}.")
        missing = [f.name for f in fields(cls) if f.name in ("variant", "feature_dim") and f.name not in data]
        if missing:
            raise ValueError(f"hypernet config lacks {', '.join(missing)}.")
        return cls(**data)


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """Transformer position encodings ``[length, dim]`` (sin on even, cos on odd channels)."""
    position = torch.arange(length, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: dim // 2])
    return table.float()


class Attention(nn.Module):
    """Multi-head attention; ``context`` None means self-attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        context = x if context is None else context
        q = self.to_q(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.to_kv(context).view(b, context.shape[1], 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    """Pre-norm transformer decoder block: self-attention, cross-attention to the image, MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = Attention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        h = h + self.self_attn(self.norm_self(h))
        h = h + self.cross_attn(self.norm_cross(h), memory)
        return h + self.mlp(self.norm_mlp(h))


class LidbHypernet(nn.Module):
    """Image tokens ``[B, T, input_dim]`` → flat LiDB weights ``[B, L, P]`` (see the module docstring)."""

    def __init__(self, config: HypernetConfig, spec: LidbSpec, seed: int = 0):
        super().__init__()
        self.config = config
        self.spec = spec
        d, p, n_layers = config.model_dim, spec.params_per_layer, len(spec.layers)
        # Deterministic init whatever the global RNG state: the same seed builds the same network.
        fork = torch.random.fork_rng(devices=[])
        with fork:
            torch.manual_seed(seed)
            self.image_norm = nn.LayerNorm(config.input_dim)
            self.image_proj = nn.Linear(config.input_dim, d)
            self.weight_in = nn.Linear(p, d)
            self.pos_proj = nn.Linear(d, d)
            self.blocks = nn.ModuleList(DecoderBlock(d, config.num_heads) for _ in range(config.num_blocks))
            self.out_norm = nn.LayerNorm(d)
            self.head_weight = nn.Parameter(torch.randn(n_layers, d, p) * DELTA_INIT_STD)
            self.head_bias = nn.Parameter(torch.zeros(n_layers, p))
        self.register_buffer("positions", sinusoidal_table(n_layers, d), persistent=False)
        self.register_buffer("output_scale", torch.ones(n_layers, p))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 3 or tokens.shape[-1] != self.config.input_dim:
            raise ValueError(f"image tokens must be [batch, tokens, {self.config.input_dim}], "
                             f"got {tuple(tokens.shape)}.")
        memory = self.image_proj(self.image_norm(tokens))
        batch = tokens.shape[0]
        state = tokens.new_zeros(batch, len(self.spec.layers), self.spec.params_per_layer)
        positions = self.pos_proj(self.positions).unsqueeze(0)
        for _ in range(self.config.iterations):
            h = self.weight_in(state) + positions
            for block in self.blocks:
                h = block(h, memory)
            state = state + torch.einsum("bld,ldp->blp", self.out_norm(h), self.head_weight) + self.head_bias
        return self.output_scale * state

    def set_output_scale(self, down_rms: torch.Tensor, up_rms: torch.Tensor) -> None:
        """Per layer: scale of the down half and of the up half of the flat vector (clamped away from 0)."""
        n_down = self.spec.rank * self.spec.down_dim
        scale = torch.empty_like(self.output_scale)
        scale[:, :n_down] = down_rms.clamp_min(1e-8).unsqueeze(1).to(scale)
        scale[:, n_down:] = up_rms.clamp_min(1e-8).unsqueeze(1).to(scale)
        with torch.no_grad():
            self.output_scale.copy_(scale)
