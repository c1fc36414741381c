"""Many small host tensors moved to a device in one copy per dtype, from page-locked memory packed once.

A sampling run needs a LoRA's factors on the GPU: 2k small tensors per LoRA'd layer, ≈ 800 for two LoRAs on SD1.5's
192 layers. Moved one by one with ``.to(device)``, each copy from pageable memory is a ``cudaMemcpyAsync`` followed by
a ``cudaStreamSynchronize``: on an H100 (2026-11-27) the unmerged hooks' first step paid 777 synchronous copies,
≈ 75 ms of a 0.93 s Composite run, and every one of them drained the GPU's queue. Packed into one flat page-locked
buffer per source dtype (made once and kept for the next runs, like ``LowRankTerms``), the upload is one
asynchronous copy per dtype that the host does not wait for.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


# Page-locked memory is scarce (ComfyUI pins weights for offloading too): a larger packed tensor stays pageable — its
# copy then waits for the GPU once, still one copy instead of one per tensor.
PIN_LIMIT_BYTES = 1 << 30


class PackedUpload:
    """``sources`` (host tensors, any shapes) uploaded together; ``to(device)`` returns device tensors shaped like the
    sources, in their order (views into one flat tensor per dtype, cast once on the device when ``dtype`` is given).

    The page-locked host copy is made at the first upload to a CUDA device and kept (the sources once more in host
    memory); device copies are kept per (device, dtype) until ``release``."""

    def __init__(self, sources: Sequence[torch.Tensor]):
        self.sources = list(sources)
        self.key = tuple(map(id, self.sources))  # what ``matches`` compares: the very same tensors, in order
        self._host: dict[torch.dtype, tuple[torch.Tensor, list[int]]] | None = None
        self._on: dict[tuple[torch.device, torch.dtype | None], list[torch.Tensor]] = {}

    def matches(self, sources: Sequence[torch.Tensor]) -> bool:
        return len(sources) == len(self.sources) and all(a is b for a, b in zip(sources, self.sources))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        device = torch.device(device)
        hit = self._on.get((device, dtype))
        if hit is None:
            hit = self._on[(device, dtype)] = self._move(device, dtype)
        return hit

    def _move(self, device: torch.device, dtype: torch.dtype | None) -> list[torch.Tensor]:
        if all(s.device == device for s in self.sources):  # nothing to move (the CPU): casts only, no packing
            return [s if dtype is None else s.to(dtype) for s in self.sources]
        flats = {source_dtype: packed.to(device, non_blocking=packed.is_pinned())
                 for source_dtype, (packed, _members) in self._packed(device).items()}
        return self.unpack(flats, dtype)

    def unpack(self, flats: dict[torch.dtype, torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """Tensors shaped like the sources, viewed in flat tensors laid out as ``_packed`` packs them (one per source
        dtype, on any device), each flat tensor cast to ``dtype`` once first. After ``_packed``."""
        out: list[torch.Tensor | None] = [None] * len(self.sources)
        for source_dtype, (_packed, members) in self._host.items():
            flat = flats[source_dtype] if dtype is None else flats[source_dtype].to(dtype)
            offset = 0
            for index in members:
                source = self.sources[index]
                n = source.numel()
                out[index] = flat[offset:offset + n].view(source.shape)
                offset += n
        return out

    def _packed(self, device: torch.device) -> dict[torch.dtype, tuple[torch.Tensor, list[int]]]:
        if self._host is None:
            groups: dict[torch.dtype, list[int]] = {}
            for index, source in enumerate(self.sources):
                groups.setdefault(source.dtype, []).append(index)
            self._host = {}
            for dtype, members in groups.items():
                packed = torch.cat([self.sources[i].detach().to("cpu").reshape(-1) for i in members])
                if device.type == "cuda" and packed.numel() * packed.element_size() <= PIN_LIMIT_BYTES:
                    try:
                        packed = packed.pin_memory()
                    except RuntimeError:  # no page-locked memory to be had: a pageable copy still works
                        pass
                self._host[dtype] = (packed, members)
        return self._host

    def release(self) -> None:
        """Drop the device copies (the end of a run); the packed host copy stays for the next run."""
        self._on.clear()


class StagedTensors:
    """The device copy of each source tensor of a ``PackedUpload`` by identity, for code that holds the sources."""

    def __init__(self, upload: PackedUpload, device: torch.device | str):
        self._by_id = dict(zip(upload.key, upload.to(device)))

    def get(self, source: torch.Tensor) -> torch.Tensor:
        """``source`` on the device (the source itself when it was not staged)."""
        return self._by_id.get(id(source), source)
