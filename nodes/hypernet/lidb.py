"""LiDB: the Lightweight-DreamBooth weight space of HyperDreamBooth (algorithms.md §3.2).

Per target Linear layer ``W ∈ R^{out×in}`` LiDB is a rank-``r`` LoRA whose factors live in a small
random subspace::

    down_aux ∈ R^{down_dim × in}   frozen, regenerated from the layer's seed
    up_aux   ∈ R^{out × up_dim}    frozen, same seed (drawn after down_aux)
    down_w   ∈ R^{r × down_dim}    trainable / predicted by the hypernetwork
    up_w     ∈ R^{up_dim × r}      trainable / predicted by the hypernetwork

    down = down_w @ down_aux        ∈ R^{r × in}
    up   = up_aux @ up_w            ∈ R^{out × r}
    ΔW   = (alpha / r) · up @ down   (we write alpha = r, so the scale is 1)

so a layer costs ``r·(down_dim + up_dim)`` numbers (150 with the defaults 100 / 50 / 1) and
materialises to an ordinary LoRA exactly. The flat per-layer vector used by the hypernetwork is
``[down_w (r×down_dim, row-major) | up_w (up_dim×r, row-major)]`` (``split_flat``/``join_flat``).

Aux init laws (the file records which; both are regenerated on the CPU from a ``torch.Generator``
seeded with the layer seed, then moved to the requested device/dtype, so the matrices are
identical whatever device runs the network):

* ``xavier_normal`` (default; HyperKohaku, whose 100/50/1 defaults we use):
  ``down_aux = randn(down_dim, in) · sqrt(2 / (in + down_dim))``, then
  ``up_aux = randn(out, up_dim) · sqrt(2 / (out + up_dim))`` from the same generator, in float32
  (the std is rounded to float32 first, so the product is one IEEE multiplication).
* ``orthogonal`` (MFaceTech; the paper's "random orthogonal incomplete basis"): the same two
  ``randn`` draws in float64, each orthonormalised like ``torch.nn.init.orthogonal_`` (QR of the
  tall orientation, columns multiplied by ``sign(diag R)``), then rounded to float32.

``aux_fingerprint`` hashes every aux matrix so a file can tell whether this machine regenerates
exactly the matrices its hypernet was trained with.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import torch

from ..lora_set import LoraEntry, memory_entry

INIT_LAWS = ("xavier_normal", "orthogonal")
DEFAULT_INIT_LAW = "xavier_normal"
DIM_LIMIT = 4096  # aux dims beyond this are certainly a typo (the paper uses 100 / 50)
RANK_LIMIT = 64

UNET_ATTENTION = re.compile(r"^diffusion_model\..*\.attn\d*\.(to_q|to_k|to_v|to_out\.0)\.weight$")
TEXT_ATTENTION = re.compile(r"^[^.]+\..*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$")
UNET_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class LidbLayer:
    """One target layer: its model state-dict weight key, shape and aux seed.

    ``key`` is a ``MODEL`` key (``diffusion_model.….to_q.weight``) or a ``CLIP`` key
    (``clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight``).
    """

    key: str
    in_features: int
    out_features: int
    seed: int

    @property
    def is_text_encoder(self) -> bool:
        return not self.key.startswith(UNET_PREFIX)


@dataclass(frozen=True)
class LidbSpec:
    """The LiDB space of one model: target layers, rank, aux dims and the aux init law."""

    layers: tuple[LidbLayer, ...]
    rank: int = 1
    down_dim: int = 100
    up_dim: int = 50
    init_law: str = DEFAULT_INIT_LAW

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("LiDB spec has no target layers.")
        if not 1 <= self.rank <= RANK_LIMIT:
            raise ValueError(f"LiDB rank must be in 1…{RANK_LIMIT}, got {self.rank}.")
        for name in ("down_dim", "up_dim"):
            value = getattr(self, name)
            if not 1 <= value <= DIM_LIMIT:
                raise ValueError(f"LiDB {name} must be in 1…{DIM_LIMIT}, got {value}.")
        if self.rank > min(self.down_dim, self.up_dim):
            raise ValueError(f"LiDB rank {self.rank} exceeds min(down_dim, up_dim) = "
                             f"{min(self.down_dim, self.up_dim)}.")
        if self.init_law not in INIT_LAWS:
            raise ValueError(f"LiDB init_law must be one of {', '.join(INIT_LAWS)}, got {self.init_law!r}.")
        seen: set[str] = set()
        for layer in self.layers:
            if layer.key in seen:
                raise ValueError(f"LiDB spec lists layer {layer.key} twice.")
            seen.add(layer.key)
            if layer.in_features < 1 or layer.out_features < 1:
                raise ValueError(f"LiDB layer {layer.key} has shape {layer.out_features}×{layer.in_features}.")
            if not 0 <= layer.seed < 2 ** 63:
                raise ValueError(f"LiDB layer {layer.key}: seed {layer.seed} is outside 0…2^63−1.")

    @property
    def params_per_layer(self) -> int:
        """Length of one layer's flat LiDB vector: r·(down_dim + up_dim)."""
        return self.rank * (self.down_dim + self.up_dim)

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(layer.key for layer in self.layers)

    def to_json(self) -> dict:
        """A JSON-able description (the file format's ``lidb`` metadata field)."""
        return {"rank": self.rank, "down_dim": self.down_dim, "up_dim": self.up_dim, "init_law": self.init_law,
                "layers": [[l.key, l.in_features, l.out_features, l.seed] for l in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> "LidbSpec":
        """Inverse of ``to_json``; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError("LiDB description must be a JSON object.")
        try:
            layers = tuple(LidbLayer(str(k), int(i), int(o), int(s)) for k, i, o, s in data["layers"])
            return cls(layers=layers, rank=int(data["rank"]), down_dim=int(data["down_dim"]),
                       up_dim=int(data["up_dim"]), init_law=str(data["init_law"]))
        except KeyError as e:
            raise ValueError(f"LiDB description lacks the field {e.args[0]!r}.") from e
        except (TypeError, ValueError) as e:
            if "LiDB" in str(e):
                raise
            raise ValueError(f"LiDB description is malformed ({e}); layers must be [key, in, out, seed] lists.") from e


def layer_seed(base_seed: int, key: str) -> int:
    """A per-layer seed that depends only on ``base_seed`` and the layer key (stable under layer-set changes)."""
    digest = hashlib.sha256(f"{int(base_seed)}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def attention_keys(state_dict_shapes: dict[str, torch.Size], pattern: re.Pattern) -> list[str]:
    return [k for k, shape in state_dict_shapes.items() if pattern.match(k) and len(shape) == 2]


def lidb_spec_for_model(model_patcher, clip=None, *, rank: int = 1, down_dim: int = 100, up_dim: int = 50,
                        base_seed: int = 0, include_text_encoder: bool = False,
                        init_law: str = DEFAULT_INIT_LAW) -> LidbSpec:
    """The LiDB spec of every attention q/k/v/out Linear of the UNet (and of the text encoder if asked).

    UNet targets: ``diffusion_model.….attn*.{to_q,to_k,to_v,to_out.0}.weight`` (self and cross
    attention, MFaceTech's target set); text encoder: ``….self_attn.{q,k,v,out}_proj.weight``.
    Layers come in state-dict order; seeds from ``layer_seed(base_seed, key)``.
    """
    from ..patching import state_shapes  # here: the rest of this module works without ComfyUI (unit tests)

    if model_patcher is None:
        raise ValueError("lidb_spec_for_model needs a MODEL.")
    shapes = state_shapes(model_patcher.model)  # what the layers compute with (packed quantized storage differs)
    keys = attention_keys(shapes, UNET_ATTENTION)
    if not keys:
        family = type(model_patcher.model.model_config).__name__
        raise ValueError(f"the connected {family} model has no UNet attention layers (to_q/to_k/to_v/to_out.0); "
                         "LiDB targets SD1.x/SD2/SDXL-style UNets.")
    layers = [LidbLayer(k, int(shapes[k][1]), int(shapes[k][0]), layer_seed(base_seed, k)) for k in keys]
    if include_text_encoder:
        if clip is None:
            raise ValueError("include_text_encoder needs a CLIP input connected.")
        clip_shapes = state_shapes(clip.cond_stage_model)
        te_keys = attention_keys(clip_shapes, TEXT_ATTENTION)
        if not te_keys:
            raise ValueError("the connected CLIP has no self_attn q/k/v/out_proj layers to target.")
        layers += [LidbLayer(k, int(clip_shapes[k][1]), int(clip_shapes[k][0]), layer_seed(base_seed, k))
                   for k in te_keys]
    return LidbSpec(tuple(layers), rank=rank, down_dim=down_dim, up_dim=up_dim, init_law=init_law)


def _orthogonal(draw: torch.Tensor) -> torch.Tensor:
    """``torch.nn.init.orthogonal_``'s construction on a float64 draw: orthonormal rows or columns."""
    rows, cols = draw.shape
    tall = draw.t() if rows < cols else draw
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r)).masked_fill(torch.diagonal(r) == 0, 1.0)
    return q.t() if rows < cols else q


def aux_matrices(spec: LidbSpec, layer: LidbLayer, device=None,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(down_aux [down_dim, in], up_aux [out, up_dim])`` of one layer, regenerated from its seed.

    Always drawn on the CPU (see the module docstring for the laws), then moved: the result does
    not depend on ``device``. Frozen: the tensors never require grad.
    """
    g = torch.Generator(device="cpu").manual_seed(int(layer.seed))
    shape_down = (spec.down_dim, layer.in_features)
    shape_up = (layer.out_features, spec.up_dim)
    if spec.init_law == "xavier_normal":
        std_down = torch.tensor(math.sqrt(2.0 / (layer.in_features + spec.down_dim)), dtype=torch.float32)
        std_up = torch.tensor(math.sqrt(2.0 / (layer.out_features + spec.up_dim)), dtype=torch.float32)
        down_aux = torch.randn(shape_down, generator=g, dtype=torch.float32) * std_down
        up_aux = torch.randn(shape_up, generator=g, dtype=torch.float32) * std_up
    elif spec.init_law == "orthogonal":
        down_aux = _orthogonal(torch.randn(shape_down, generator=g, dtype=torch.float64)).float()
        up_aux = _orthogonal(torch.randn(shape_up, generator=g, dtype=torch.float64)).float()
    else:  # LidbSpec validates the law; this guards specs built with object.__setattr__
        raise ValueError(f"unknown LiDB init law {spec.init_law!r}; valid: {', '.join(INIT_LAWS)}.")
    return down_aux.to(device=device, dtype=dtype), up_aux.to(device=device, dtype=dtype)


def aux_fingerprint(spec: LidbSpec) -> str:
    """SHA-256 over every layer's float32 aux bytes (in spec order): equal iff regeneration is bit-exact."""
    h = hashlib.sha256()
    for layer in spec.layers:
        for t in aux_matrices(spec, layer):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def split_flat(spec: LidbSpec, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[..., r·(down_dim+up_dim)]`` → ``(down_w [..., r, down_dim], up_w [..., up_dim, r])``."""
    if flat.shape[-1] != spec.params_per_layer:
        raise ValueError(f"LiDB vector has {flat.shape[-1]} numbers per layer; this spec needs "
                         f"{spec.params_per_layer} (rank {spec.rank} × ({spec.down_dim} + {spec.up_dim})).")
    n_down = spec.rank * spec.down_dim
    lead = flat.shape[:-1]
    down_w = flat[..., :n_down].reshape(*lead, spec.rank, spec.down_dim)
    up_w = flat[..., n_down:].reshape(*lead, spec.up_dim, spec.rank)
    return down_w, up_w


def join_flat(down_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """Inverse of ``split_flat``."""
    lead = down_w.shape[:-2]
    return torch.cat([down_w.reshape(*lead, -1), up_w.reshape(*lead, -1)], dim=-1)


def materialize(spec: LidbSpec, down_w: dict[str, torch.Tensor],
                up_w: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer key: ``(up [out, r], down [r, in])`` with ``down = down_w @ down_aux``, ``up = up_aux @ up_w``.

    Differentiable in ``down_w``/``up_w``; aux matrices follow their device and dtype.
    """
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in spec.layers:
        if layer.key not in down_w or layer.key not in up_w:
            raise ValueError(f"LiDB weights lack layer {layer.key}.")
        dw, uw = down_w[layer.key], up_w[layer.key]
        if tuple(dw.shape) != (spec.rank, spec.down_dim) or tuple(uw.shape) != (spec.up_dim, spec.rank):
            raise ValueError(f"LiDB weights of {layer.key} have shapes down {tuple(dw.shape)}, up {tuple(uw.shape)}; "
                             f"expected down ({spec.rank}, {spec.down_dim}) and up ({spec.up_dim}, {spec.rank}).")
        down_aux, up_aux = aux_matrices(spec, layer, device=dw.device, dtype=dw.dtype)
        factors[layer.key] = (up_aux @ uw, dw @ down_aux)
    return factors


def kohya_prefix(key: str, sdxl_text_encoders: bool = False) -> str:
    """The kohya module name core's key maps accept for a model/CLIP weight key.

    ``diffusion_model.<path>.weight`` → ``lora_unet_<path with _>``; CLIP self-attention keys →
    ``lora_te_…`` (``lora_te1_``/``lora_te2_`` for SDXL's CLIP-L/CLIP-G); any other CLIP key →
    core's generic ``text_encoders.<path>``.
    """
    if not key.endswith(".weight"):
        raise ValueError(f"{key} is not a weight key.")
    path = key[: -len(".weight")]
    if path.startswith(UNET_PREFIX):
        return "lora_unet_" + path[len(UNET_PREFIX):].replace(".", "_")
    match = re.match(r"^(clip_l|clip_g|clip_h)\.transformer\.(text_model\.encoder\.layers\.\d+\..+)$", path)
    if match:
        encoder, module = match.groups()
        if encoder == "clip_g":
            te = "lora_te2_" if sdxl_text_encoders else "lora_te_"
        else:
            te = "lora_te1_" if sdxl_text_encoders else "lora_te_"
        return te + module.replace(".", "_")
    return "text_encoders." + path


def lora_entry_from_factors(name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], *,
                            strength_model: float = 1.0, strength_clip: float = 1.0,
                            alpha: float | None = None, metadata: dict[str, str] | None = None) -> LoraEntry:
    """An in-memory ``LORA_SET`` entry (kohya keys) holding ``factors`` (key → (up, down)).

    ``alpha`` None writes alpha = rank (scale 1, so ΔW = up @ down exactly). Tensors are detached
    float32 CPU copies. NaN/Inf factors are refused.
    """
    if not factors:
        raise ValueError(f"{name}: no LoRA factors to hold.")
    sdxl_te = any(k.startswith("clip_g.") for k in factors) and any(k.startswith("clip_l.") for k in factors)
    tensors: dict[str, torch.Tensor] = {}
    ranks: set[int] = set()
    for key, (up, down) in factors.items():
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"{name}: factors of {key} have shapes up {tuple(up.shape)}, down {tuple(down.shape)}; "
                             "expected up [out, r] and down [r, in].")
        prefix = kohya_prefix(key, sdxl_te)
        rank = int(down.shape[0])
        ranks.add(rank)
        tensors[f"{prefix}.lora_up.weight"] = up.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{prefix}.lora_down.weight"] = down.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": str(max(ranks) if alpha is None else alpha)}
    info.update(metadata or {})
    return memory_entry(name, tensors, info, strength_model, strength_clip)
