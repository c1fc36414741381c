"""Zero-copy stand-ins for weights that autograd cannot save for backward.

ComfyUI runs every node under ``torch.inference_mode()``, so the weights of every model it loads are
*inference tensors*, which autograd refuses to save for backward ("Inference tensors do not track
version counter"). There is a second, less visible kind: a parameter made under inference mode whose
data was later replaced outside it (``param.data = ...``, which ``Module.to``/``_apply`` does when
ComfyUI moves a model to the GPU). It no longer reports ``is_inference()``, but it keeps the inference
tensor's missing version counter, and every op on it fails, inference included (seen on CUDA when
training loaded the model with autograd on). The trainers therefore load and unload models under
``torch.inference_mode()``, as ComfyUI's executor does, and treat both kinds alike here.

Either kind is replaced for the run by a normal tensor viewing the same storage (``Tensor.set_``): no
copy, and the base weight stays unwritable because the trainers never give it ``requires_grad``.
"""
from __future__ import annotations

import torch


def untracked_by_autograd(tensor: torch.Tensor) -> bool:
    """True when autograd cannot save ``tensor`` for backward (see the module docstring)."""
    if tensor.is_inference():
        return True
    try:
        tensor._version  # noqa: B018 (the attribute access itself is the test)
    except RuntimeError:
        return True
    return False


def aliasable(tensor: torch.Tensor) -> bool:
    """Plain strided tensors can be aliased; tensor subclasses (quantised weights) cannot."""
    return type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.layout == torch.strided


def alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (tracked) tensor viewing ``tensor``'s storage: no copy, usable by autograd."""
    return torch.empty(0, dtype=tensor.dtype, device=tensor.device).set_(
        tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
