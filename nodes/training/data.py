"""Training images → latents: an IMAGE batch, a folder of images, or latents given directly.

**Resize/crop rule** (applied whenever images are given): every image is brought to one training
size W×H, each side a multiple of 8 (the VAE's downscale):

* ``resolution`` > 0: W = H = ``resolution`` (rounded down to a multiple of 8);
* ``resolution`` = 0: the size of the first image (each side rounded down to a multiple of 8).

An image whose size differs is centre-cropped to the target aspect ratio and then resized with
Lanczos (``comfy.utils.common_upscale(…, "lanczos", "center")``, what ComfyUI's *Upscale Image*
node does with crop = center); images already at the target size are untouched. Mixed sizes are
therefore accepted, and the report says how many images were resized.

Folders are read relative to ComfyUI's ``input`` directory (never outside it); ``.png``, ``.jpg``,
``.jpeg``, ``.webp`` and ``.bmp`` files, in name order, EXIF orientation applied, alpha dropped.
Latents (a LATENT from *VAE Encode* or elsewhere) skip all of this: their size is used as is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGES = 10_000
SIZE_MULTIPLE = 8


@dataclass
class PreparedLatents:
    """Latents in the VAE's raw space (as a LATENT holds them), CPU float32, plus what was done."""

    latents: torch.Tensor  # [N, C, h, w]
    notes: list[str] = field(default_factory=list)


def resolve_folder(folder: str, input_dir: str) -> str:
    """``folder`` inside ComfyUI's input directory; ValueError if it escapes it or does not exist."""
    base = os.path.realpath(input_dir)
    path = os.path.realpath(os.path.join(base, folder.strip()))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"image_folder {folder!r} must be a folder inside ComfyUI's input directory ({base}).")
    if not os.path.isdir(path):
        raise ValueError(f"image_folder {folder!r} does not exist in ComfyUI's input directory ({base}).")
    return path


def folder_signature(folder: str | None) -> str:
    """Names, sizes and modification times of a folder's images ('' when unset or unreadable)."""
    if not isinstance(folder, str) or not folder.strip():
        return ""
    try:
        import folder_paths

        path = resolve_folder(folder, folder_paths.get_input_directory())
        entries = sorted((e for e in os.scandir(path) if e.name.lower().endswith(IMAGE_SUFFIXES)), key=lambda e: e.name)
    except (OSError, ValueError):
        return ""
    return "|".join(f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}" for e in entries)


def load_folder_images(path: str) -> list[torch.Tensor]:
    """Every image file in ``path`` (not recursive) as ``[H, W, 3]`` float tensors in [0, 1]."""
    from PIL import Image, ImageOps

    names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_SUFFIXES))
    if len(names) > MAX_IMAGES:
        raise ValueError(f"image_folder holds {len(names)} images; at most {MAX_IMAGES} are supported.")
    images = []
    for name in names:
        try:
            with Image.open(os.path.join(path, name)) as img:
                img = ImageOps.exif_transpose(img).convert("RGB")
                images.append(torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0))
        except OSError as e:
            raise ValueError(f"image_folder: cannot read {name} ({e}).") from e
    return images


def gather_images(images: torch.Tensor | list[torch.Tensor] | None, folder_images: list[torch.Tensor]) -> list[torch.Tensor]:
    """One list of ``[H, W, 3]`` images from an IMAGE batch (or a list of them) and a folder."""
    out: list[torch.Tensor] = []
    if images is not None:
        batches = images if isinstance(images, (list, tuple)) else [images]
        for batch in batches:
            if not isinstance(batch, torch.Tensor) or batch.ndim not in (3, 4) or batch.shape[-1] not in (1, 3, 4):
                shape = tuple(batch.shape) if isinstance(batch, torch.Tensor) else type(batch).__name__
                raise ValueError(f"images must be an IMAGE batch [B, H, W, C] with C = 1, 3 or 4, got {shape}.")
            batch = batch if batch.ndim == 4 else batch[None]
            for img in batch:
                img = img[..., :3] if img.shape[-1] >= 3 else img.expand(*img.shape[:2], 3)
                out.append(img.float())
    out.extend(folder_images)
    return out


def target_size(images: list[torch.Tensor], resolution: int, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height) following the resize/crop rule of the module docstring (``size`` overrides it)."""
    if size is not None:
        return size
    if resolution < 0:
        raise ValueError(f"resolution must be ≥ 0 (0 = size of the first image), got {resolution}.")
    if resolution > 0:
        side = resolution // SIZE_MULTIPLE * SIZE_MULTIPLE
        if side < SIZE_MULTIPLE:
            raise ValueError(f"resolution {resolution} is below {SIZE_MULTIPLE} pixels.")
        return side, side
    height, width = images[0].shape[:2]
    width, height = width // SIZE_MULTIPLE * SIZE_MULTIPLE, height // SIZE_MULTIPLE * SIZE_MULTIPLE
    if width < SIZE_MULTIPLE or height < SIZE_MULTIPLE:
        raise ValueError(f"the first image is {images[0].shape[1]}×{images[0].shape[0]}; images must be at least "
                         f"{SIZE_MULTIPLE}×{SIZE_MULTIPLE} pixels.")
    return width, height


def conform_images(images: list[torch.Tensor], resolution: int,
                   size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[str]]:
    """All images at the target size as one ``[N, H, W, 3]`` batch; notes say what was resized."""
    import comfy.utils

    width, height = target_size(images, resolution, size)
    out, resized, sizes = [], 0, set()
    for img in images:
        sizes.add((img.shape[1], img.shape[0]))
        if (img.shape[1], img.shape[0]) != (width, height):
            img = comfy.utils.common_upscale(img.movedim(-1, 0)[None], width, height, "lanczos", "center")[0].movedim(0, -1)
            resized += 1
        out.append(img.clamp(0.0, 1.0))
    notes = []
    if resized:
        notes.append(f"{resized} of {len(images)} images resized to {width}×{height} (centre crop to the aspect "
                     f"ratio, then Lanczos){'; the images had ' + str(len(sizes)) + ' different sizes' if len(sizes) > 1 else ''}.")
    return torch.stack(out), notes


def encode_with_vae(vae, pixels: torch.Tensor, input_name: str) -> torch.Tensor:
    if vae is None:
        raise ValueError(f"{input_name}: images need a VAE to be encoded; connect 'vae', or give latents instead.")
    latents = vae.encode(pixels)
    if isinstance(latents, dict):
        latents = latents["samples"]
    return latents.detach().float().cpu()


def check_latents(latents, latent_channels: int, input_name: str) -> torch.Tensor:
    samples = latents.get("samples") if isinstance(latents, dict) else latents
    if not isinstance(samples, torch.Tensor) or samples.ndim != 4:
        shape = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"{input_name} must be a LATENT with samples [B, C, h, w], got {shape}.")
    if samples.shape[1] != latent_channels:
        raise ValueError(f"{input_name} has {samples.shape[1]} channels; the connected model uses "
                         f"{latent_channels}-channel latents (encode the images with this model's VAE).")
    if samples.shape[0] == 0:
        raise ValueError(f"{input_name} is empty (0 latents).")
    finite = samples.isfinite().flatten(1).all(dim=1)
    if not bool(finite.all()):
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise ValueError(f"{input_name} contains NaN or infinite values (latent{'s' if len(bad) > 1 else ''} "
                         f"{', '.join(map(str, bad[:8]))}{' …' if len(bad) > 8 else ''} of {samples.shape[0]}): "
                         "training on them would only diverge; re-encode or drop those.")
    return samples.detach().float().cpu().clone()


def prepare_latents(*, vae, images, folder_images: list[torch.Tensor], latents, resolution: int,
                    latent_channels: int, what: str, size: tuple[int, int] | None = None) -> PreparedLatents | None:
    """Latents for one image set (``what`` = 'instance' or 'class'); None when nothing was given.

    ``size`` (width, height) forces the pixel size (class images follow the instance images).
    Latents and images together are refused (which one was meant is ambiguous).
    """
    pictures = gather_images(images, folder_images)
    if latents is not None and pictures:
        raise ValueError(f"give {what} images or {what} latents, not both.")
    if latents is not None:
        return PreparedLatents(check_latents(latents, latent_channels, f"{what}_latents"))
    if not pictures:
        return None
    pixels, notes = conform_images(pictures, resolution, size)
    encoded = encode_with_vae(vae, pixels, f"{what} images")
    return PreparedLatents(check_latents(encoded, latent_channels, f"{what} images (VAE output)"), notes)
