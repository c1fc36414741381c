"""Input declarations shared by several nodes (one definition, the same tooltip everywhere)."""
from __future__ import annotations

import os

import folder_paths

from ..lora_set import LORA_SET_TYPE, STRENGTH_LIMIT

LORA_STACK_TYPE = "LORA_STACK"


def lora_set_input(tooltip: str = "The LoRAs to use, in order (from 'Load LoRA (set)' or another set node).") -> tuple:
    return (LORA_SET_TYPE, {"tooltip": tooltip})


def strength_input(default: float, what: str) -> tuple:
    return ("FLOAT", {"default": default, "min": -STRENGTH_LIMIT, "max": STRENGTH_LIMIT, "step": 0.01,
                      "tooltip": f"How strongly to modify the {what}. Negative values subtract the LoRA."})


def lora_name_input() -> tuple:
    return (folder_paths.get_filename_list("loras"),
            {"tooltip": "A LoRA file from the 'loras' models folder (.safetensors; pickle files are refused)."})


def lora_path(lora_name: str) -> str:
    return folder_paths.get_full_path_or_raise("loras", lora_name)


def file_signature(folder_name: str, name: str) -> str:
    """A file's modification time and size, for ``IS_CHANGED``: a LoRA rewritten under the same name (a new training
    checkpoint, a fixed file) makes ComfyUI run the node again instead of serving the cached result. "" when the
    file is missing (the node itself then says so)."""
    path = folder_paths.get_full_path(folder_name, name) if name else None
    try:
        stat = os.stat(path) if path else None
    except OSError:
        stat = None
    return f"{stat.st_mtime_ns}:{stat.st_size}" if stat else ""
