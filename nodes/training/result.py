"""Training output: an ordinary kohya LoRA (a LORA_SET entry), checkpoints, and the loss curve image.

The entry holds ``lora_unet_…``/``lora_te…`` ``lora_up``/``lora_down``/``alpha`` tensors (names from
the pack's ``kohya_names``, i.e. what core's key map accepts), so ``LoraSetSave`` writes it
unchanged and core *Load LoRA* loads it. Checkpoints are the same entry saved with
``saving.save_lora_set`` as ``<prefix>_step000100_00001.safetensors`` in the loras folder.
"""
from __future__ import annotations

import json

import torch

from ..lora_set import LoraEntry, LoraSet, memory_entry
from ..saving import save_lora_set

CURVE_SIZE = (640, 360)
_MARGIN_LEFT, _MARGIN_RIGHT, _MARGIN_TOP, _MARGIN_BOTTOM = 64, 16, 28, 36


def lora_tensors(names: dict[str, str], factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
                 dense: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Kohya tensors: per key ``(up, down, alpha)`` → ``{name}.lora_up/.lora_down.weight`` + ``.alpha``;
    ``dense`` deltas (biases, 1-D weights) → ``{name}.diff_b`` / ``{name}.diff``."""
    tensors: dict[str, torch.Tensor] = {}
    for key, (up, down, alpha) in factors.items():
        prefix = names.get(key, key[: -len(".weight")])
        tensors[f"{prefix}.lora_up.weight"] = up.detach().float().cpu().contiguous()
        tensors[f"{prefix}.lora_down.weight"] = down.detach().float().cpu().contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    for key, delta in (dense or {}).items():
        if key.endswith(".bias"):
            weight_key = key[: -len(".bias")] + ".weight"
            tensors[f"{names.get(weight_key, weight_key[: -len('.weight')])}.diff_b"] = delta.float().cpu()
        else:
            tensors[f"{names.get(key, key[: -len('.weight')])}.diff"] = delta.float().cpu()
    return tensors


def entry_from_tensors(name: str, tensors: dict[str, torch.Tensor], metadata: dict) -> LoraEntry:
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(".lora_down.weight")})
    alphas = sorted({float(t) for k, t in tensors.items() if k.endswith(".alpha")})
    info = {"ss_network_module": "networks.lora",
            "ss_network_dim": str(max(ranks) if ranks else 0),
            "ss_network_alpha": f"{max(alphas):g}" if alphas else "0"}
    info.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()})
    return memory_entry(name, tensors, info)


def save_checkpoint(entry: LoraEntry, folder: str, prefix: str, step: int, dtype: str = "fp32") -> str:
    """Write one checkpoint (fp32 by default: a checkpoint is for resuming, not for sharing)."""
    return save_lora_set(LoraSet((entry,)), folder, f"{prefix}_step{step:06d}", dtype)


def _ema(values: list[float], beta: float) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def loss_curve_image(series: dict[str, list[float]], title: str) -> torch.Tensor:
    """A ComfyUI IMAGE ``[1, H, W, 3]``: each series raw (light) and smoothed (dark), log-free y axis.

    Drawn with PIL (a ComfyUI dependency); no matplotlib.
    """
    from PIL import Image, ImageDraw, ImageFont

    width, height = CURVE_SIZE
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    x0, x1, y0, y1 = _MARGIN_LEFT, width - _MARGIN_RIGHT, _MARGIN_TOP, height - _MARGIN_BOTTOM
    draw.text((x0, 6), title, fill="black", font=font)
    series = {k: v for k, v in series.items() if v}
    values = [v for vs in series.values() for v in vs]
    if not values:
        draw.text((x0 + 10, (y0 + y1) // 2), "no completed steps", fill="black", font=font)
    else:
        lo, hi = min(values), max(values)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        steps = max(len(vs) for vs in series.values())

        def point(i: int, v: float) -> tuple[float, float]:
            x = x0 + (x1 - x0) * (i / max(1, steps - 1))
            return x, y1 - (y1 - y0) * (v - lo) / (hi - lo)

        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):  # grid and y labels
            y = y1 - (y1 - y0) * frac
            draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
            draw.text((4, y - 6), f"{lo + (hi - lo) * frac:.4g}", fill="black", font=font)
        draw.text((x0, y1 + 8), "step 1", fill="black", font=font)
        draw.text((x1 - 60, y1 + 8), f"step {steps}", fill="black", font=font)
        colours = {"loss": ((150, 180, 255), (20, 60, 200)), "instance": ((150, 220, 150), (20, 130, 40)),
                   "prior": ((255, 200, 140), (210, 110, 10))}
        legend_x = x0 + 160
        for name, vs in series.items():
            light, dark = colours.get(name, ((200, 200, 200), (60, 60, 60)))
            smooth = _ema(vs, 0.9 if len(vs) > 20 else 0.5)
            for line, colour, w in ((vs, light, 1), (smooth, dark, 2)):
                pts = [point(i, v) for i, v in enumerate(line)]
                if len(pts) == 1:
                    draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=colour)
                else:
                    draw.line(pts, fill=colour, width=w)
            draw.text((legend_x, 6), name, fill=dark, font=font)
            legend_x += 70
        draw.rectangle([x0, y0, x1, y1], outline="black")
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return (pixels.float() / 255.0)[None]
