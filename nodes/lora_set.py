"""The ``LORA_SET`` value: an ordered, immutable list of LoRA entries.

An entry knows where its tensors come from (a file, loaded lazily through the cache in
``lora_files``, or tensors held in memory such as a merge result), its strengths and an optional
block filter. Mapping to model keys happens only when a set is applied, so one set fits any model
it was made for.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch

from .lora_blocks import BlockFilter
from .lora_files import LoraFileError, check_finite, display_name, read_lora_file

LORA_SET_TYPE = "LORA_SET"
STRENGTH_LIMIT = 100.0  # same bound as ComfyUI's LoraLoader widgets


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: str | None = None  # a file in a models folder; None for in-memory entries
    strength_model: float = 1.0
    strength_clip: float = 1.0
    blocks: BlockFilter | None = None
    memory_tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    memory_metadata: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.memory_tensors is not None:
            return self.memory_tensors
        assert self.path is not None
        return read_lora_file(self.path).tensors

    def metadata(self) -> dict[str, str]:
        if self.memory_metadata is not None:
            return self.memory_metadata
        assert self.path is not None
        return read_lora_file(self.path).metadata

    @property
    def identity(self) -> str:
        return os.path.realpath(self.path) if self.path else f"memory:{self.name}"


@dataclass(frozen=True)
class LoraSet:
    entries: tuple[LoraEntry, ...] = ()

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self):
        return iter(self.entries)

    def appended(self, entry: LoraEntry) -> "LoraSet":
        """A new set with ``entry`` last; the same file twice is refused (it would silently double)."""
        for existing in self.entries:
            if existing.identity == entry.identity:
                raise ValueError(
                    f"lora_set already contains {entry.name!r}. Loading the same LoRA twice applies it twice; "
                    "raise its strength instead.")
        return LoraSet(self.entries + (entry,))

    def replaced(self, index: int, entry: LoraEntry) -> "LoraSet":
        entries = list(self.entries)
        entries[index] = entry
        return LoraSet(tuple(entries))


def check_strength(value: float, input_name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{input_name} must be a number, got {value!r}.") from None
    if not math.isfinite(value) or abs(value) > STRENGTH_LIMIT:
        raise ValueError(f"{input_name} must be a finite number in [-{STRENGTH_LIMIT:g}, {STRENGTH_LIMIT:g}], got {value}.")
    return value


def require_nonempty(lora_set: LoraSet | None, input_name: str = "lora_set") -> LoraSet:
    if lora_set is None or len(lora_set) == 0:
        raise ValueError(f"{input_name} is empty: add at least one LoRA with 'Load LoRA (set)'.")
    return lora_set


def file_entry(path: str, strength_model: float, strength_clip: float) -> LoraEntry:
    """An entry for a LoRA file; the file is read (and validated) now so errors surface at load time."""
    read_lora_file(path)
    return LoraEntry(name=display_name(path), path=path,
                     strength_model=check_strength(strength_model, "strength_model"),
                     strength_clip=check_strength(strength_clip, "strength_clip"))


def memory_entry(name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                 strength_model: float = 1.0, strength_clip: float = 1.0) -> LoraEntry:
    if not tensors:
        raise LoraFileError(f"{name}: no tensors to hold.")
    check_finite(tensors, name)
    return LoraEntry(name=name, memory_tensors=tensors, memory_metadata=dict(metadata),
                     strength_model=check_strength(strength_model, "strength_model"),
                     strength_clip=check_strength(strength_clip, "strength_clip"))


def with_blocks(entry: LoraEntry, blocks: BlockFilter | None) -> LoraEntry:
    return replace(entry, blocks=blocks)
