"""Writing a LORA_SET entry as one ordinary kohya-style ``.safetensors`` in the loras folder."""
from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from .lora_files import non_finite_keys
from .lora_set import LoraSet, require_nonempty

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _safe_prefix(prefix: str) -> str:
    prefix = prefix.strip().replace("\\", "/")
    if not prefix or prefix.startswith("/") or ".." in prefix.split("/") or re.search(r"[<>:\"|?*\x00]", prefix):
        raise ValueError(f"filename_prefix {prefix!r} must be a relative name inside the loras folder, "
                         "e.g. 'merged/my_lora'.")
    return prefix


def next_free_path(folder: str, prefix: str) -> str:
    """``<folder>/<prefix>_00001.safetensors``, counting up past existing files (ComfyUI's save style)."""
    base = os.path.join(folder, prefix)
    os.makedirs(os.path.dirname(base) or folder, exist_ok=True)
    counter = 1
    while os.path.exists(f"{base}_{counter:05}.safetensors"):
        counter += 1
    return f"{base}_{counter:05}.safetensors"


def save_lora_set(lora_set: LoraSet, folder: str, filename_prefix: str, dtype: str = "fp16") -> str:
    """Save a one-entry set (a merge or generated LoRA) at strength 1; returns the written path.

    Several entries, strengths other than 1 or block weights must be folded in first with
    'Merge LoRA set' (which needs the model): writing them unchanged would lose them.
    """
    lora_set = require_nonempty(lora_set)
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SAVE_DTYPES)}, got {dtype!r}.")
    if len(lora_set) != 1:
        raise ValueError(f"lora_set has {len(lora_set)} LoRAs; merge them into one with 'Merge LoRA set' first.")
    (entry,) = lora_set.entries
    if entry.strength_model != 1 or entry.strength_clip != 1 or (entry.blocks and not entry.blocks.changes_nothing):
        raise ValueError(f"{entry.name} carries strengths ({entry.strength_model:g}/{entry.strength_clip:g}) or block "
                         "weights that a file cannot hold; fold them in with 'Merge LoRA set' (method linear).")
    target_dtype = SAVE_DTYPES[dtype]
    # alpha stays fp32: it is a scalar whose exact value sets the scale alpha/rank.
    tensors = {k: (t.to(target_dtype) if t.is_floating_point() and not k.endswith(".alpha") else t).contiguous()
               for k, t in entry.tensors().items()}
    overflowed = non_finite_keys(tensors)
    if overflowed:  # written anyway, LoraSetLoad would refuse the file: say it here, write nothing
        shown = ", ".join(overflowed[:3]) + (" …" if len(overflowed) > 3 else "")
        raise ValueError(f"{entry.name}: {len(overflowed)} tensor(s) exceed the range of {dtype} ({shown}); nothing "
                         "was written. Save as bf16 or fp32.")
    metadata = {k: str(v) for k, v in entry.metadata().items()}
    metadata.setdefault("ss_network_module", "networks.lora")
    metadata["lora_composer_saved_from"] = entry.name
    metadata["lora_composer_dtype"] = dtype
    metadata.setdefault("lora_composer_sources", json.dumps([{"name": entry.name}]))
    path = next_free_path(folder, _safe_prefix(filename_prefix))
    save_file(tensors, path, metadata=metadata)
    return path
