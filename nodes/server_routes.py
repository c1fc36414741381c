"""HTTP route for the web extension: what a LoRA file is, read from its safetensors header only.

``GET /lora_composer/lora_info?name=<lora name>`` (also under ``/api/``) answers
``{"name", "network_types", "key_style", "ranks", "alphas", "base_model", "trigger_words", "modules",
"text_encoder_modules", "tensors", "file_size", "summary", "metadata"}`` — the same summary
``LoraSetInfo`` prints (``nodes/lora_format.summarize``), computed from the header: weights become
shape-only ``meta`` tensors, and only the scalar ``.alpha`` values (a few bytes each) are read.

Only names that ComfyUI itself lists in the ``loras`` folders are readable (the list
``folder_paths.get_filename_list("loras")``, resolved with ``folder_paths.get_full_path``): absolute
paths and ``..`` are refused with 403 before anything touches the disk, unknown names get 404, pickle
files 415, and a corrupt or truncated header 422 (with what is wrong). ComfyUI's engine-only copies
have no server; then nothing is registered (see ``register_routes``).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import struct
import sys
from dataclasses import dataclass

import torch

from .lora_files import PICKLE_SUFFIXES
from .lora_format import summarize
from .lora_keys import normalize_keys

log = logging.getLogger("LoRA Composer")

ROUTE = "/lora_composer/lora_info"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # safetensors' own limit is 100 MB; real LoRA headers are < 1 MB
METADATA_FIELDS = ("ss_base_model_version", "ss_sd_model_name", "ss_network_module", "ss_network_dim",
                   "ss_network_alpha", "ss_output_name", "modelspec.title", "modelspec.architecture",
                   "lora_composer.method", "lora_composer.sources")

# safetensors' fp8 names; a file saved all in fp8 (alphas too) exists in the wild
_FP8 = {name: getattr(torch, attr) for name, attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
        if hasattr(torch, attr)}
_SCALAR_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, **_FP8}
_DTYPES = {**_SCALAR_FLOATS, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
           "U8": torch.uint8, "BOOL": torch.bool}


class LoraInfoError(Exception):
    """A request the route refuses; ``status`` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets of the tensor's bytes
    end: int


def check_name(name: str) -> None:
    """Refuse anything that is not a plain relative name inside a models folder (403), before any I/O."""
    if not name or not name.strip():
        raise LoraInfoError(400, "name is missing: ask for ?name=<a file from the loras folder>.")
    parts = name.replace("\\", "/").split("/")
    drive = len(parts[0]) >= 2 and parts[0][1] == ":" and parts[0][0].isascii() and parts[0][0].isalpha()  # 'C:…'
    # (a ':' elsewhere is part of a name on Linux / macOS: 'style:v2.safetensors' is listed and loads)
    if "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\")) or drive or ".." in parts:
        raise LoraInfoError(403, f"{name!r} is not a name inside the loras folders (absolute paths and '..' "
                                 "are refused).")


def resolve_lora_name(name: str) -> str:
    """The file behind ``name``, which must be one ComfyUI lists under ``loras``."""
    import folder_paths

    check_name(name)
    if name not in folder_paths.get_filename_list("loras"):
        raise LoraInfoError(404, f"{name!r} is not in the loras folders.")
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise LoraInfoError(404, f"{name!r} is not in the loras folders.")
    if path.lower().endswith(PICKLE_SUFFIXES):
        raise LoraInfoError(415, f"{name}: pickle-based files are never read by LoRA Composer (unpickling can "
                                 "run code); convert it to .safetensors.")
    return path


def _corrupt(name: str, what: str) -> LoraInfoError:
    return LoraInfoError(422, f"{name}: not a readable safetensors file ({what}).")


def read_header(path: str, name: str | None = None) -> tuple[dict[str, HeaderEntry], dict[str, str], int]:
    """Parse the safetensors header: ``({key: HeaderEntry}, metadata, file size)``; no tensor data is read.

    Format: 8-byte little-endian header length N, N bytes of JSON ``{key: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {str: str}}``, then the data. Everything is checked
    against the file size, so a truncated file is reported rather than half-read.
    """
    name = name or os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(name, f"{size} bytes, shorter than a header")
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
            raise _corrupt(name, f"header length {n} does not fit a {size}-byte file")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (a deeply nested header: RecursionError)
        raise _corrupt(name, f"header is not JSON: {type(e).__name__}") from e
    if not isinstance(header, dict):
        raise _corrupt(name, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(name, "__metadata__ is not an object")
    data_size = size - 8 - n
    entries: dict[str, HeaderEntry] = {}
    for key, spec in header.items():
        try:
            dtype, shape, (begin, end) = spec["dtype"], tuple(int(d) for d in spec["shape"]), spec["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError, OverflowError) as e:  # (an infinite offset or dimension)
            raise _corrupt(name, f"entry {key!r} is malformed") from e
        if not isinstance(dtype, str) or dtype not in _DTYPES and not dtype.isalnum():
            raise _corrupt(name, f"entry {key!r} has no dtype name ({dtype!r})")
        if any(d < 0 for d in shape) or not 0 <= begin <= end <= data_size:
            raise _corrupt(name, f"entry {key!r} points outside the file (truncated?)")
        if math.prod(shape) > data_size:  # more elements than the file has bytes (and no overflowing meta tensor)
            raise _corrupt(name, f"entry {key!r} claims shape {list(shape)}, more than the file holds")
        entries[key] = HeaderEntry(dtype, shape, 8 + n + begin, 8 + n + end)
    if not entries:
        raise _corrupt(name, "it holds no tensors")
    return entries, {str(k): str(v) for k, v in metadata.items()}, size


def header_tensors(path: str, entries: dict[str, HeaderEntry]) -> dict[str, torch.Tensor]:
    """Shape-only ``meta`` tensors for every entry, except scalar ``.alpha`` values, which are read (≤ 8 bytes)."""
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        for key, e in entries.items():
            scalar = key.endswith(".alpha") and e.dtype in _SCALAR_FLOATS and len(e.shape) <= 1 and (
                not e.shape or e.shape[0] == 1)
            if scalar and e.end - e.begin == _SCALAR_FLOATS[e.dtype].itemsize:
                f.seek(e.begin)
                out[key] = torch.frombuffer(bytearray(f.read(e.end - e.begin)), dtype=_SCALAR_FLOATS[e.dtype])
                if not bool(out[key].float().isfinite().all()):  # LoraSetLoad refuses such a file as well
                    raise LoraInfoError(422, f"{os.path.basename(path)}: {key} is NaN or infinite; the file is "
                                             "unusable.")
            elif not key.endswith(".alpha"):  # an alpha in a form not read here is left out, not summarised as 0
                out[key] = torch.empty(e.shape, dtype=_DTYPES.get(e.dtype, torch.float32), device="meta")
    return out


def lora_info(name: str) -> dict:
    """The route's answer for ``name`` (raises ``LoraInfoError`` with the HTTP status)."""
    path = resolve_lora_name(name)
    entries, metadata, size = read_header(path, name)
    tensors = header_tensors(path, entries)
    file_keys = list(tensors)
    try:  # the same key normalisation LoraSetInfo applies (shapes are all it needs)
        tensors = normalize_keys(tensors)
    except Exception as e:  # pragma: no cover - a converter that needs values; fall back to raw keys
        log.debug("[LoRA Composer] key normalisation skipped for %s: %s", name, e)
    summary = summarize(tensors, metadata, file_keys=file_keys)
    return {"name": name, "network_types": summary.network_types, "key_style": summary.key_style,
            "ranks": summary.ranks, "alphas": summary.alphas, "base_model": summary.base_model,
            "trigger_words": summary.triggers, "modules": summary.module_count,
            "text_encoder_modules": summary.text_encoder_modules, "tensors": len(entries), "file_size": size,
            "summary": summary.describe(), "metadata": {k: metadata[k] for k in METADATA_FIELDS if k in metadata}}


async def handle_lora_info(request):
    from aiohttp import web

    name = request.query.get("name", "")
    try:  # in a worker thread: a large header takes seconds to parse, and the server would stall meanwhile
        info = await asyncio.to_thread(lora_info, name)
    except LoraInfoError as e:
        return web.json_response({"error": e.message, "status": e.status}, status=e.status)
    except OSError as e:
        return web.json_response({"error": f"{name}: cannot be read ({e.strerror or e})."}, status=422)
    except Exception as e:  # noqa: BLE001 - a header no check above foresaw: a JSON answer, never a bare 500
        log.warning("[LoRA Composer] lora_info %r: %s: %s", name, type(e).__name__, e)
        return web.json_response({"error": f"{name}: its header could not be summarised ({type(e).__name__}: {e}).",
                                  "status": 422}, status=422)
    return web.json_response(info)


def register_routes() -> bool:
    """Add the route to a running ComfyUI server; False (nothing done) when there is none.

    ComfyUI's ``main.py`` imports ``server`` and creates ``PromptServer.instance`` before it loads
    custom nodes, so a pack imported without them (the engine-only ComfyUI, in-process tests) has no
    server to extend. Routes added here are mirrored under ``/api`` by ComfyUI.
    """
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get(ROUTE)(handle_lora_info)
    return True
