"""The optional diffusion loss: gradients from the connected MODEL's denoiser into the hypernet.

For one example with generated factors ``(up_l, down_l)`` on the UNet layers::

    x0  = process_latent_in(latent)              the example's latent (VAE or a .latent file)
    σ   = percent_to_sigma(u),  u ~ U(0.001, 0.999);   ε ~ N(0, I)
    x_σ = noise_scaling(σ, ε, x0)                 ComfyUI's own forward process for this model
    D   = apply_model(x_σ, σ, cond) with W_l ← W_l + s·up_l @ down_l     (s = ±1, the LoRA's sign)
    L   = mean((D − x0)²)                         x0-space MSE, as ComfyUI's own LoRA trainer uses

The patched weights are substituted with ``torch.func.functional_call``, so the UNet runs
unchanged (any ComfyUI UNet, wrappers, ``comfy.ops`` casting) and gradients reach ``up``/``down``.
Text-encoder layers of the LiDB spec get no diffusion gradient (the prompt is encoded once).

LoRA of Change on a plain text-to-image MODEL: ``+H`` must denoise the *after* latents and the
LoRA-reverse term ``−H`` the *before* latents. On an InstructPix2Pix model (8-channel UNet) the
other image of the pair is passed as ``concat_latent_image``, which is LoC's objective exactly:
``G(H(A,A′), A) → A′`` and ``G(−H(A,A′), A′) → A``.
"""
from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management as mm
import torch
from torch import nn

from ..training.autograd_alias import alias, aliasable, untracked_by_autograd
from .lidb import LidbSpec, aux_matrices

SIGMA_PERCENT_RANGE = (0.001, 0.999)


class _ApplyModel(nn.Module):
    """Lets ``functional_call`` reparametrise a BaseModel, whose entry point is ``apply_model``."""

    def __init__(self, base_model):
        super().__init__()
        self.base = base_model

    def forward(self, *args, **kwargs):
        return self.base.apply_model(*args, **kwargs)


@dataclass
class DiffusionContext:
    model: object  # ModelPatcher
    wrapper: _ApplyModel
    keys: list[str]  # UNet layer keys of the spec, in spec order
    indices: list[int]  # their positions in the spec
    aux: list[tuple[torch.Tensor, torch.Tensor]]  # (down_aux, up_aux) on the device, fp32
    base_weights: dict[str, torch.Tensor]  # autograd-safe weights, "base.<key>" → tensor
    cross_attn: torch.Tensor
    pooled: torch.Tensor | None
    device: torch.device


def _autograd_safe(module: nn.Module) -> dict[str, torch.Tensor]:
    """Stand-ins for parameters autograd refuses to save for backward: made under ``torch.inference_mode``
    (every model ComfyUI loads in a graph), also after ComfyUI moved them to the GPU (``autograd_alias``).

    A plain tensor gets a zero-copy alias (a normal tensor on the same storage); tensor subclasses
    (quantised weights) are cloned. Parameters autograd does track (a model built with autograd on, outside
    ComfyUI's executor) are detached: the loss must reach the hypernet only, not fill a ``.grad`` per base weight
    (a whole UNet's worth of memory, and a weight backward each step).
    ``functional_call`` substitutes them for the run only; the module itself is never modified.
    """
    safe = {}
    for name, p in module.named_parameters():
        if not untracked_by_autograd(p):
            safe[f"base.{name}"] = p.detach()
        else:
            safe[f"base.{name}"] = alias(p) if aliasable(p) else p.detach().clone()
    return safe


def prepare(model, clip, spec: LidbSpec, prompt: str) -> DiffusionContext:
    """Load the MODEL for training, encode the prompt once, move the UNet layers' aux matrices."""
    with torch.inference_mode():  # as ComfyUI loads: a move with autograd on breaks inference weights
        mm.load_models_gpu([model], force_full_load=True)
    device = model.load_device
    wrapper = _ApplyModel(model.model)
    indices = [i for i, layer in enumerate(spec.layers) if not layer.is_text_encoder]
    keys = [spec.layers[i].key for i in indices]
    aux = [aux_matrices(spec, spec.layers[i], device=device) for i in indices]
    pooled = None
    if clip is not None:
        tokens = clip.tokenize(prompt or "")
        cross_attn, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        cross_attn, pooled = cross_attn.detach().clone(), (pooled.detach().clone() if pooled is not None else None)
    else:
        context_dim = model.model.model_config.unet_config.get("context_dim")
        if not context_dim:
            raise ValueError("the diffusion loss needs a CLIP for this model (it has no plain cross-attention "
                             "context); connect one.")
        cross_attn = torch.zeros(1, 77, int(context_dim))
    return DiffusionContext(model=model, wrapper=wrapper, keys=keys, indices=indices, aux=aux,
                            base_weights=_autograd_safe(model.model), cross_attn=cross_attn, pooled=pooled,
                            device=device)


def model_conds(ctx: DiffusionContext, x: torch.Tensor, concat_latent: torch.Tensor | None) -> dict:
    """ComfyUI's ``extra_conds`` for this model (cross-attention, SDXL ``y``, IP2P ``c_concat``…)."""
    params = {"cross_attn": ctx.cross_attn.to(ctx.device), "noise": x, "device": ctx.device,
              "width": x.shape[-1] * 8, "height": x.shape[-2] * 8}
    if ctx.pooled is not None:
        params["pooled_output"] = ctx.pooled.to(ctx.device)
    if concat_latent is not None:
        params["concat_latent_image"] = concat_latent.to(ctx.device)
    try:
        conds = ctx.model.model.extra_conds(**params)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"the diffusion loss could not build this model's conditioning ({e}); connect the "
                         "CLIP the model was made with.") from e
    return {name: cond.process_cond(batch_size=x.shape[0], device=ctx.device, area=None).cond
            for name, cond in conds.items()}


def denoise_with_lora(ctx: DiffusionContext, factors: list[tuple[torch.Tensor, torch.Tensor]], sign: float,
                      x: torch.Tensor, sigma: torch.Tensor, conds: dict) -> torch.Tensor:
    """The model's denoised prediction with ``W + sign·up@down`` on every UNet layer (differentiable)."""
    params = dict(ctx.base_weights)
    weights = dict(ctx.model.model.named_parameters())
    for key, (up, down) in zip(ctx.keys, factors):
        base = params.get(f"base.{key}", weights[key])
        params[f"base.{key}"] = base + (sign * (up @ down)).to(base.dtype)
    return torch.func.functional_call(ctx.wrapper, params, (x, sigma), conds)


def unet_factors(ctx: DiffusionContext, down_w: torch.Tensor, up_w: torch.Tensor):
    """One example's LiDB weights ``[L, r, D]``/``[L, U, r]`` → differentiable (up, down) per UNet layer."""
    return [(up_aux @ up_w[i], down_w[i] @ down_aux) for i, (down_aux, up_aux) in zip(ctx.indices, ctx.aux)]


def diffusion_loss(ctx: DiffusionContext, down_w: torch.Tensor, up_w: torch.Tensor, latent: torch.Tensor,
                   sign: float, generator: torch.Generator, concat_latent: torch.Tensor | None = None) -> torch.Tensor:
    """x0-space MSE of the denoiser with the example's LoRA at ``sign`` (see the module docstring)."""
    sampling = ctx.model.model.model_sampling
    x0 = ctx.model.model.process_latent_in(latent.to(ctx.device, torch.float32))
    low, high = SIGMA_PERCENT_RANGE
    percent = low + (high - low) * torch.rand(1, generator=generator).item()
    sigma = torch.tensor([float(sampling.percent_to_sigma(percent))], device=ctx.device)
    noise = torch.randn(x0.shape, generator=generator).to(ctx.device)
    x = sampling.noise_scaling(sigma, noise, x0)
    conds = model_conds(ctx, x, concat_latent)
    denoised = denoise_with_lora(ctx, unet_factors(ctx, down_w, up_w), sign, x, sigma, conds)
    return torch.mean((denoised.float() - x0) ** 2)
