"""Training examples: a folder of images (or before/after pairs) with the LoRA each should produce.

Folder layout (one example per target LoRA, matched by file stem)::

    image variant:  <name>.safetensors  +  <name>.png|jpg|jpeg|webp|bmp      [+ <name>.latent]
    pair variant:   <name>.safetensors  +  <name>_before.<img>  +  <name>_after.<img>
                                                                 [+ <name>_before.latent, <name>_after.latent]

Target LoRAs may be in any format and key style 'Load LoRA (set)' reads (LoRA, LoCon, LoHa, LoKr,
DoRA…; kohya, diffusers, PEFT…). ``.latent`` files (ComfyUI's 'Save Latent' format) supply latents
for the diffusion loss when no VAE is connected.

Projection onto LiDB space (per layer, exact least squares). With ``Q_u`` an orthonormal basis of
the column space of ``up_aux`` and ``Q_d`` of the row space of ``down_aux``, every LiDB delta is
``Q_u Y Q_dᵀ`` with ``rank Y ≤ r``, and ``‖ΔW − Q_u Y Q_dᵀ‖² = ‖ΔW‖² − ‖Q_uᵀΔW Q_d‖² + ‖Q_uᵀΔW Q_d − Y‖²``.
So the best target is ``Y* = SVD_r(Q_uᵀ ΔW Q_d)`` (Eckart–Young), stored as ``a = U_r √S_r``,
``b = √S_r V_rᵀ`` in the padded bases, and its error is ``‖ΔW‖² − Σ_{i≤r} S_i²``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import folder_paths
import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..lora_files import PICKLE_SUFFIXES, LoraFileError
from ..lora_set import LoraSet, file_entry
from ..merging import Contribution, exact_delta
from ..patching import resolve_set
from .lidb import LidbSpec, aux_matrices

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_SUFFIX = ".latent"
SVD_RELATIVE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class ExampleFiles:
    name: str
    lora: str
    images: tuple[str, ...]  # (image,) or (before, after)
    latents: tuple[str, ...] | None  # same order as images, when every one exists


def resolve_folder(folder: str) -> str:
    """An absolute folder, or one relative to ComfyUI's input directory."""
    folder = (folder or "").strip()
    if not folder:
        raise ValueError("examples_folder is empty: give a folder of <name>.png + <name>.safetensors examples "
                         "(absolute, or relative to ComfyUI's input folder).")
    path = folder if os.path.isabs(folder) else os.path.join(folder_paths.get_input_directory(), folder)
    if not os.path.isdir(path):
        raise ValueError(f"examples_folder {folder!r} is not a folder (looked at {path}).")
    return path


def folder_signature(folder: str) -> str:
    """Names, sizes and modification times of the folder's files (ComfyUI re-runs training when they change)."""
    try:
        path = resolve_folder(folder)
        entries = sorted(os.scandir(path), key=lambda e: e.name)
        return ";".join(f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}" for e in entries if e.is_file())
    except (OSError, ValueError) as e:
        return f"unreadable: {e}"  # the training call itself reports the problem


def _find(folder_files: dict[str, str], stem: str, suffixes) -> str | None:
    for suffix in suffixes:
        hit = folder_files.get((stem + suffix).lower())
        if hit:
            return hit
    return None


def find_examples(folder: str, variant: str) -> list[ExampleFiles]:
    """Every ``<name>.safetensors`` with its image(s), sorted by name; raises on anything incomplete."""
    path = resolve_folder(folder)
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise ValueError(f"examples_folder {path} cannot be read ({e}).") from e
    pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"examples_folder holds pickle files ({', '.join(pickles[:3])}); they are never loaded "
                         "(unpickling can run code). Convert target LoRAs to .safetensors.")
    files = {n.lower(): os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))}
    image_parts = ("",) if variant == "image" else ("_before", "_after")
    examples, incomplete = [], []
    for name in names:
        if not name.lower().endswith(".safetensors"):
            continue
        stem = name[: -len(".safetensors")]
        images = [_find(files, stem + part, IMAGE_SUFFIXES) for part in image_parts]
        if any(i is None for i in images):
            wanted = " and ".join(f"{stem}{part}.png" for part in image_parts)
            incomplete.append(f"{name} (needs {wanted})")
            continue
        latents = [_find(files, stem + part, (LATENT_SUFFIX,)) for part in image_parts]
        examples.append(ExampleFiles(stem, os.path.join(path, name), tuple(images),
                                     tuple(latents) if all(latents) else None))
    if incomplete:
        raise ValueError(f"examples_folder {path}: {len(incomplete)} target LoRA(s) lack their image(s): "
                         + "; ".join(incomplete[:5]) + ".")
    if not examples:
        layout = ("<name>.safetensors + <name>.png" if variant == "image"
                  else "<name>.safetensors + <name>_before.png + <name>_after.png")
        raise ValueError(f"examples_folder {path} holds no training examples; expected files like {layout}.")
    return examples


def read_image(path: str) -> torch.Tensor:
    """An ``IMAGE`` ``[1, H, W, 3]`` in 0…1, read like ComfyUI's 'Load Image' (EXIF rotation, RGB)."""
    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
            array = np.asarray(rgb, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ValueError(f"{os.path.basename(path)}: not a readable image ({e}).") from e
    return torch.from_numpy(array.copy())[None]


def read_latent(path: str) -> torch.Tensor:
    """A raw latent (what a VAE encodes) from a ComfyUI ``.latent`` file (safetensors, never pickle)."""
    try:
        data = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{os.path.basename(path)}: not a readable .latent (safetensors) file ({e}).") from e
    if "latent_tensor" not in data:
        raise ValueError(f"{os.path.basename(path)}: no 'latent_tensor' in it (write it with 'Save Latent').")
    scale = 1.0 if "latent_format_version_0" in data else 1.0 / 0.18215  # as ComfyUI's LoadLatent
    latent = data["latent_tensor"].float() * scale
    if latent.ndim != 4 or not torch.isfinite(latent).all():
        raise ValueError(f"{os.path.basename(path)}: latent must be a finite [1, C, h, w] tensor.")
    return latent[:1]


@dataclass
class LidbBasis:
    """Per layer, the padded orthonormal bases and the aux matrices expressed in them (see module doc)."""

    q_up: list[torch.Tensor]  # [out, U]: orthonormal columns spanning col(up_aux), zero padded
    q_down: list[torch.Tensor]  # [in, D]: orthonormal columns spanning row(down_aux), zero padded
    m_up: torch.Tensor  # [L, U, U] = q_upᵀ up_aux
    m_down: torch.Tensor  # [L, D, D] = down_aux q_down


def _orthonormal_columns(matrix: torch.Tensor, width: int) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    keep = s > s.max() * SVD_RELATIVE_TOLERANCE
    q = u[:, keep]
    return torch.nn.functional.pad(q, (0, width - q.shape[1])).float()


def lidb_basis(spec: LidbSpec) -> LidbBasis:
    q_up, q_down, m_up, m_down = [], [], [], []
    for layer in spec.layers:
        down_aux, up_aux = aux_matrices(spec, layer)
        qu = _orthonormal_columns(up_aux, spec.up_dim)
        qd = _orthonormal_columns(down_aux.t(), spec.down_dim)
        q_up.append(qu)
        q_down.append(qd)
        m_up.append(qu.t() @ up_aux)
        m_down.append(down_aux @ qd)
    return LidbBasis(q_up, q_down, torch.stack(m_up), torch.stack(m_down))


@dataclass
class ProjectedTarget:
    a: torch.Tensor  # [L, U, r]
    b: torch.Tensor  # [L, r, D]
    energy: float  # Σ_l ‖ΔW_l‖² over the LiDB layers
    error: float  # Σ_l ‖ΔW_l − projection‖²
    ignored_modules: int  # weights the LoRA changes outside the LiDB layer set

    @property
    def relative_error(self) -> float:
        return (self.error / self.energy) ** 0.5 if self.energy > 0 else 0.0


def project_delta(delta: torch.Tensor, q_up: torch.Tensor, q_down: torch.Tensor, rank: int):
    """``(a, b, ‖ΔW‖², error²)`` of the best LiDB approximation of one layer's ΔW."""
    delta = delta.double()
    y = q_up.double().t() @ delta @ q_down.double()
    u, s, vh = torch.linalg.svd(y, full_matrices=False)
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).float()
    b = (root.unsqueeze(1) * vh[:rank]).float()
    energy = float(delta.square().sum())
    return a, b, energy, max(energy - float(s[:rank].square().sum()), 0.0)


def target_deltas(model, clip, lora_path: str, spec: LidbSpec) -> tuple[dict[str, torch.Tensor], int]:
    """ΔW (fp32) of one target LoRA on every LiDB layer, via ComfyUI's own adapter math; raises if any is missing."""
    name = os.path.basename(lora_path)
    try:
        entry = file_entry(lora_path, 1.0, 1.0)
        ((_, patches),) = resolve_set(model, clip, LoraSet((entry,)))
    except LoraFileError as e:
        raise ValueError(f"training LoRA {e}") from e
    except ValueError as e:
        raise ValueError(f"training LoRA {name}: {e}") from e
    owners = {**{k: (model, p) for k, p in patches.model.items() if isinstance(k, str)},
              **({k: (clip.patcher, p) for k, p in patches.clip.items() if isinstance(k, str)} if clip else {})}
    missing = [l.key for l in spec.layers if l.key not in owners]
    if missing:
        raise ValueError(f"training LoRA {name} does not cover {len(missing)} of the {len(spec.layers)} LiDB target "
                         f"layers (e.g. {', '.join(missing[:3])}); every target LoRA must change every target layer "
                         "(all attention q/k/v/out" + (", text encoder included" if any(
                             l.is_text_encoder for l in spec.layers) else "") + ").")
    deltas = {l.key: exact_delta(owners[l.key][0], l.key, Contribution(entry, owners[l.key][1], 1.0))
              for l in spec.layers}
    ignored = len(set(owners) - set(deltas))
    return deltas, ignored


def project_lora(model, clip, lora_path: str, spec: LidbSpec, basis: LidbBasis) -> ProjectedTarget:
    deltas, ignored = target_deltas(model, clip, lora_path, spec)
    parts = [project_delta(deltas[l.key], basis.q_up[i], basis.q_down[i], spec.rank)
             for i, l in enumerate(spec.layers)]
    return ProjectedTarget(a=torch.stack([p[0] for p in parts]), b=torch.stack([p[1] for p in parts]),
                           energy=sum(p[2] for p in parts), error=sum(p[3] for p in parts), ignored_modules=ignored)
