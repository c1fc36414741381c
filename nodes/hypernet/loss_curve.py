"""The loss curve as a ComfyUI ``IMAGE`` (PIL drawing; no plotting library needed).

Log-scaled y axis (losses fall over decades), one coloured line per loss term, the first and last
value written in the legend.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 16, 40


def _finite_positive(values: list[float]) -> list[tuple[int, float]]:
    return [(i, v) for i, v in enumerate(values) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0]


def draw_loss_curve(series: dict[str, list[float]], width: int = 512, height: int = 320,
                    first_step: int = 0) -> Image.Image:
    """A PIL image of every series against the step (x from ``first_step``)."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = {name: _finite_positive(values) for name, values in series.items()}
    all_values = [v for pts in points.values() for _, v in pts]
    length = max((len(v) for v in series.values()), default=0)
    left, right, top, bottom = MARGIN_LEFT, width - MARGIN_RIGHT, MARGIN_TOP, height - MARGIN_BOTTOM
    draw.rectangle((left, top, right, bottom), outline=(0, 0, 0))
    if not all_values or length == 0:
        draw.text((left + 8, top + 8), "no finite loss values yet", fill=(0, 0, 0), font=font)
        return image
    lo, hi = math.log10(min(all_values)), math.log10(max(all_values))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(length - 1, 1))
        y = bottom - (bottom - top) * ((math.log10(v) - lo) / (hi - lo))
        return x, y

    for decade in range(math.floor(lo), math.ceil(hi) + 1):
        if lo <= decade <= hi:
            _, y = xy(0, 10.0 ** decade)
            draw.line((left, y, right, y), fill=(225, 225, 225))
            draw.text((4, y - 6), f"1e{decade}", fill=(0, 0, 0), font=font)
    draw.text((left, bottom + 6), f"step {first_step}", fill=(0, 0, 0), font=font)
    draw.text((right - 90, bottom + 6), f"step {first_step + length - 1}", fill=(0, 0, 0), font=font)
    legend_y = top + 4
    for (name, pts), colour in zip(points.items(), COLOURS):
        if len(pts) > 1:
            draw.line([xy(i, v) for i, v in pts], fill=colour, width=2)
        elif pts:
            x, y = xy(*pts[0])
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        if pts:
            draw.text((left + 8, legend_y), f"{name}: {pts[0][1]:.3g} → {pts[-1][1]:.3g}", fill=colour, font=font)
            legend_y += 12
    return image


def as_comfy_image(image: Image.Image) -> torch.Tensor:
    """PIL → ``IMAGE`` tensor ``[1, H, W, 3]`` float in 0…1."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]
