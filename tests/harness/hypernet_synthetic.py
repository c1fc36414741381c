"""Synthetic worlds for hypernet tests: a tiny CLIP-vision model, drawn "subjects" and known LoRAs.

* ``build_clip_vision``: ComfyUI's own ``ClipVisionModel`` from a shrunken json config (2 layers,
  hidden 32, 32 px images, 8 px patches → 17 tokens), weights initialised in memory.
* ``draw_subject``: a disc on a grey background; its colour and horizontal position are the two
  parameters θ of a subject.
* ``subject_lora``: a rank-1 kohya LoRA on every attention layer whose up factor depends linearly
  on θ, ``up_l = u_l0 + θ₀ u_l1 + θ₁ u_l2``, ``down_l = v_l`` (fixed random directions).
* ``edit_*``: deterministic image edits with one known LoRA per edit (LoRA-of-Change tests).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

TINY_CLIP_VISION = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32,
                    "image_size": 32, "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64,
                    "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2,
                    "num_channels": 3, "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16,
                    "torch_dtype": "float32"}


def build_clip_vision(folder: Path, seed: int = 0, hidden_size: int = 32):
    """A real ``comfy.clip_vision.ClipVisionModel`` with a tiny config, initialised from ``seed``."""
    import comfy.clip_vision

    config = dict(TINY_CLIP_VISION, hidden_size=hidden_size, intermediate_size=2 * hidden_size)
    path = Path(folder) / f"tiny_clip_vision_{hidden_size}.json"
    path.write_text(json.dumps(config))
    model = comfy.clip_vision.ClipVisionModel(str(path))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                value = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif p.ndim >= 2:
                value = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
            else:
                value = 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(value.to(p.dtype))
    return model


def draw_subject(theta: tuple[float, float], size: int = 32) -> torch.Tensor:
    """IMAGE ``[1, size, size, 3]``: a disc whose hue is θ₀ and horizontal position θ₁ (both in [-1, 1])."""
    hue, position = theta
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    cx, cy, radius = size / 2 + position * size / 4, size / 2, size / 4
    inside = ((xs - cx) ** 2 + (ys - cy) ** 2 <= radius ** 2).float().unsqueeze(-1)
    angle = (hue + 1) * math.pi / 2
    colour = torch.tensor([0.5 + 0.5 * math.cos(angle), 0.5 + 0.5 * math.sin(angle), 0.5 - 0.5 * math.cos(angle)])
    image = 0.5 * (1 - inside) + inside * colour
    return image.unsqueeze(0).clamp(0, 1)


def save_png(image: torch.Tensor, path: Path) -> None:
    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(path)


def attention_keys(model) -> list[str]:
    import re

    pattern = re.compile(r"^diffusion_model\..*\.attn\d*\.(to_q|to_k|to_v|to_out\.0)\.weight$")
    return [k for k in model.model.state_dict() if pattern.match(k)]


def lora_directions(model, keys, n_params: int, seed: int, scale: float = 0.5):
    """Per layer: (u [n_params+1, out], v [in]) random directions for ``subject_lora``."""
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in keys:
        o, i = sd[key].shape
        u = torch.randn(n_params + 1, o, generator=g) * scale / math.sqrt(o)
        u[0] *= 0.2  # the part every subject shares is small: the mean LoRA is a weak baseline
        out[key] = (u, torch.randn(i, generator=g) / math.sqrt(i))
    return out


def subject_factors(directions, theta) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """key → (up [out, 1], down [1, in]) of the subject with parameters ``theta``."""
    coeffs = torch.tensor([1.0, *theta])
    return {k: ((coeffs @ u).unsqueeze(1), v.unsqueeze(0)) for k, (u, v) in directions.items()}


def save_kohya(factors, path: Path) -> None:
    tensors = {}
    for key, (up, down) in factors.items():
        prefix = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        tensors[f"{prefix}.lora_up.weight"] = up.contiguous()
        tensors[f"{prefix}.lora_down.weight"] = down.contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(down.shape[0]))
    save_file(tensors, str(path))


EDITS = ("red tint", "darken", "white bar")


def edit_image(image: torch.Tensor, edit: int) -> torch.Tensor:
    """Known edits, none its own inverse (the reversed pair must be a different edit): see ``EDITS``."""
    if edit == 0:
        return (image + torch.tensor([0.35, -0.1, -0.1])).clamp(0, 1)
    if edit == 1:
        return image * 0.45
    edited = image.clone()
    edited[:, : image.shape[1] // 4] = 1.0
    return edited


def deltas(factors) -> dict[str, torch.Tensor]:
    return {k: up @ down for k, (up, down) in factors.items()}
