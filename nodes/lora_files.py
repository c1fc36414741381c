"""Safe reading of LoRA files: safetensors only, validated, cached by path + mtime.

Pickle-based files (``.pt``, ``.ckpt``, ``.bin``, ``.pth``) are refused outright: unpickling runs
arbitrary code, and every LoRA trainer in use today writes safetensors.
"""
from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth", ".pkl")
CACHE_MAX_FILES = 16


class LoraFileError(ValueError):
    """A LoRA file could not be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoraFile:
    """The tensors and header metadata of one safetensors LoRA file."""

    path: str
    tensors: dict[str, torch.Tensor] = field(repr=False)
    metadata: dict[str, str]


_cache: "OrderedDict[tuple[str, int, int], LoraFile]" = OrderedDict()
_cache_lock = threading.Lock()


def _cache_key(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_mtime_ns, st.st_size)


def refuse_unsafe_format(path: str) -> None:
    name = os.path.basename(path)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise LoraFileError(
            f"{name}: pickle-based files ({', '.join(PICKLE_SUFFIXES)}) are never loaded by LoRA Composer, "
            "because unpickling can run arbitrary code. Convert it to .safetensors first."
        )


_SUM_CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_finite(t: torch.Tensor) -> bool:
    """Exactly ``torch.isfinite(t).all()``, with a fast path: one sum instead of an elementwise mask.

    A sum that contains a NaN or ±Inf is never finite (NaN propagates, Inf + finite = Inf,
    Inf − Inf = NaN), whatever the reduction order, so a finite sum proves every element finite.
    A non-finite sum (or an overflow of huge finite values) falls back to the exact check.
    """
    if t.dtype not in _SUM_CHECKED_DTYPES:
        # fp8 and other narrow floats (LoRA files saved in float8_e4m3fn exist) have no isfinite / sum kernels on
        # every build; the cast to float32 is exact and keeps NaN and ±Inf.
        t = t.to(torch.float32)
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    if math.isfinite(t.sum(dtype=acc).item()):  # a float32/64 scalar is exact as a Python float
        return True
    return bool(torch.isfinite(t).all())


def non_finite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys of the floating tensors that hold NaN or Inf, sorted."""
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and not _is_finite(t))


def check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    """Raise if any floating tensor holds NaN or Inf (a broken training run, usually)."""
    bad = non_finite_keys(tensors)
    if bad:
        shown = ", ".join(bad[:5]) + (" …" if len(bad) > 5 else "")
        raise LoraFileError(f"{name}: {len(bad)} tensor(s) contain NaN or Inf values ({shown}); the file is unusable.")


def read_metadata(path: str) -> dict[str, str]:
    """Header metadata only; no tensor is read."""
    refuse_unsafe_format(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraFileError(f"{os.path.basename(path)}: not a readable safetensors file ({e}).") from e


def read_lora_file(path: str) -> LoraFile:
    """Load a LoRA file (cached by real path, mtime and size; at most ``CACHE_MAX_FILES`` kept)."""
    name = os.path.basename(path)
    refuse_unsafe_format(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"{name}: file not found at {path}.")
    key = _cache_key(path)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoraFileError(f"{name}: not a readable safetensors file, corrupt or truncated ({e}).") from e
    if not tensors:
        raise LoraFileError(f"{name}: the file holds no tensors.")
    check_finite(tensors, name)
    loaded = LoraFile(path=path, tensors=tensors, metadata=read_metadata(path))
    with _cache_lock:
        _cache[key] = loaded
        while len(_cache) > CACHE_MAX_FILES:
            _cache.popitem(last=False)
    return loaded


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def metadata_json(metadata: dict[str, str], key: str) -> object | None:
    """Decode one JSON-valued metadata field (kohya stores dicts as JSON strings); None if absent/invalid."""
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def display_name(path: str | Path) -> str:
    return Path(path).name
