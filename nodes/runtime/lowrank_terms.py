"""Plain-LoRA patch lists as ``factor · (up @ down)`` terms, with their matrices moved to a device in one copy.

The merged swapper's fast path writes ``W + Σ factor · (up @ down)`` in core's own arithmetic. Which patch lists
qualify, with which factors, is fixed for a runtime, so it is worked out once (``LowRankTerms``); per sampling run
only the matrices' upload is left, and that is one host→device copy of all of them, packed once into page-locked
memory. One copy per tensor (as ``.to(device)`` per factor does) cost 64 ms per run on an H100 for 3 rank-16 LoRAs
on 192 layers — each copy from pageable memory waits for the GPU — more than a swap itself.
"""
from __future__ import annotations

import torch

from ..patching import plain_lora_weights
from .staging import PackedUpload

Term = tuple[float, int, int]  # (factor, index of up, index of down) in LowRankTerms.matrices


class LowRankTerms:
    """The fast-path form of every patch list of some options, and the fp32 matrices those terms use."""

    def __init__(self, patches_per_option: list[dict[str, list]]):
        self._index: dict[int, int] = {}  # id(source tensor) → matrix index
        self._sources: list[torch.Tensor] = []  # held, so that an id stays its tensor's
        self._on: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        self._upload: PackedUpload | None = None  # every matrix, packed for one copy per dtype (kept across runs)
        self._terms: dict[tuple[int, str], list[Term] | None] = {
            (j, key): self.terms_of(patches) for j, option in enumerate(patches_per_option)
            for key, patches in option.items()}

    def terms(self, option, key: str, patches: list) -> list[Term] | None:
        """``patches`` (the patch list of ``option`` at ``key``) as terms; None where only ``calculate_weight``
        is right. Entry options were worked out at construction; weight vectors (mixtures) are done here."""
        if isinstance(option, int):
            return self._terms.get((option, key))
        return self.terms_of(patches)

    def terms_of(self, patches: list) -> list[Term] | None:
        plain = []
        for p in patches:
            strength, adapter, strength_model, offset, function = p[:5]
            if strength_model != 1.0 or offset is not None or function is not None:
                return None
            w = plain_lora_weights(adapter)  # a Tucker mid, DoRA or reshape takes the general path
            if w is None or not isinstance(w[2], (float, int, type(None))):
                return None
            # core: alpha = v[2] / mat2.shape[0]; weight += ((strength * alpha) * lora_diff) — the same float product
            scale = 1.0 if w[2] is None else w[2] / w[1].shape[0]
            plain.append((strength * scale, w[0], w[1]))
        # registered only once the whole list qualifies: no matrix is uploaded that no term uses
        return [(factor, self._register(up), self._register(down)) for factor, up, down in plain] or None

    def on_device(self, option, key: str, patches: list, device: torch.device, dtype: torch.dtype,
                  shape: tuple[int, int]) -> list[tuple[float, torch.Tensor, torch.Tensor]] | None:
        """``terms`` as (factor, up, down) with the matrices in ``dtype`` on ``device``, or None where the list is not
        plain low rank or a term's product is not ``shape`` (the weight as ``[out, in·k·k]``)."""
        terms = self.terms(option, key, patches)
        if terms is None:
            return None
        matrices = self.matrices(device, dtype)
        out = []
        for factor, up, down in terms:
            up, down = matrices[up], matrices[down]
            if up.shape[0] != shape[0] or down.shape[1] != shape[1]:
                return None
            out.append((factor, up, down))
        return out

    def _register(self, tensor: torch.Tensor) -> int:
        index = self._index.get(id(tensor))
        if index is None or self._sources[index] is not tensor:
            index = self._index[id(tensor)] = len(self._sources)
            self._sources.append(tensor)
            self._on.clear()
            self._upload = None
        return index

    def shape(self, index: int) -> tuple[int, int]:
        """The matrix's shape: the source flattened from its second dimension on."""
        source = self._sources[index]
        return source.shape[0], source[0].numel() if source.shape[0] else 0

    def device_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        """What ``matrices`` holds on another device: every matrix in ``dtype``."""
        size = torch.empty((), dtype=dtype).element_size()
        return sum(size * rows * cols for rows, cols in map(self.shape, range(len(self._sources))))

    def matrices(self, device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Every registered matrix as ``[rows, cols]`` in ``dtype`` on ``device`` (kept until ``release``): fp32 for
        core's arithmetic, the weight's dtype where a GEMM adds straight into the weight (``InPlaceSwapper``)."""
        hit = self._on.get((device, dtype))
        if hit is None:
            hit = self._on[(device, dtype)] = self._move(device, dtype)
        return hit

    def _move(self, device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
        if self._upload is None:  # (a newly registered matrix resets it)
            self._upload = PackedUpload(self._sources)
        return [m.flatten(1) for m in self._upload.to(device, dtype)]

    def release(self) -> None:
        """Drop the device copies (the end of a run); the terms stay for the next, and so do the matrices on the
        sources' own device when they are the sources themselves (fp32: views, nothing held beyond the LoRA)."""
        self._on = {on: matrices for on, matrices in self._on.items()
                    if all(m.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
                           for m, s in zip(matrices, self._sources))}
        if self._upload is not None:
            self._upload.release()
