"""Tiny SD1.5- and SDXL-shaped models (and a tiny CLIP) built in memory with initialised weights.

Real ``comfy.supported_models`` classes and real ``ModelPatcher``s; only the sizes are small, so
state-dict keys look exactly like the real ones (``diffusion_model.input_blocks.1.1.…``).
"""
from __future__ import annotations

import torch

SD15_TINY = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [1, 1],
             "transformer_depth_output": [1, 1, 1, 1], "transformer_depth_middle": 1, "context_dim": 64,
             "use_linear_in_transformer": False, "use_spatial_transformer": True, "legacy": False,
             "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
             "use_checkpoint": False}

# SDXL layout: 3 levels, 2 res blocks each, no attention at the first level, linear proj_in/out,
# attention in output_blocks 0–5 (so B-LoRA's output_blocks.0.1 / 1.1 exist).
SDXL_TINY = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
             "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1],
             "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1], "transformer_depth_middle": 1,
             "context_dim": 64, "use_linear_in_transformer": True, "use_spatial_transformer": True,
             "legacy": False, "num_head_channels": 16, "adm_in_channels": 64 + 6 * 256,
             "use_temporal_attention": False, "use_temporal_resblock": False, "use_checkpoint": False}

# What sampling the tiny SDXL needs beyond SDXL_TINY (enough for weight-level tests): the label embedding
# for SDXL's pooled-text/size conditioning, and the width of build_sdxl_clip's context (CLIP-L 64 + CLIP-G 64).
SDXL_SAMPLING_OVERRIDES = {"num_classes": "sequential", "context_dim": 128}


def init_weights_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05, fan_in: bool = False) -> None:
    """comfy.ops layers are created uninitialised (reset_parameters is a no-op): fill them.

    ``fan_in``: matrices and kernels get std 1 / √fan-in instead of ``scale`` (biases keep ``scale``), so activations
    stay O(1) however wide the model is. The benchmarks' 859 M-parameter UNet (320 channels) overflowed fp16 with the
    fixed scale — a 1×1 skip conv over 2560 channels grows its input 2.5× — and sampled NaNs in half precision; the
    tiny test models keep the fixed scale their tolerances and LoRA strengths were chosen for."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                std = p[0].numel() ** -0.5 if fan_in and p.dim() >= 2 and p.numel() else scale
                p.copy_(torch.randn(p.shape, generator=g) * std)


def build_unet(family: str = "sd15", seed: int = 0, config_overrides: dict | None = None,
               dtype: torch.dtype = torch.float32, fan_in: bool = False):
    """A ModelPatcher over a tiny ``BaseModel`` of the given family (``sd15`` or ``sdxl``); ``fan_in``: see
    ``init_weights_`` (the benchmarks' models)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(SD15_TINY if family == "sd15" else SDXL_TINY)
    config.update(config_overrides or {})
    config["dtype"] = dtype
    model_config = (comfy.supported_models.SD15 if family == "sd15" else comfy.supported_models.SDXL)(config)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed, fan_in=fan_in)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())



FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantized_ops_missing() -> str | None:
    """Why this ComfyUI cannot build core's quantized layers here (None if it can): 0.9.x takes its fp8 layouts from
    comfy-kitchen, which ComfyUI lists as a requirement (so does requirements-dev.txt)."""
    import comfy.ops

    if not hasattr(comfy.ops, "mixed_precision_ops"):
        return None
    import comfy.quant_ops

    if comfy.quant_ops.get_layout_class("TensorCoreFP8E4M3Layout") is None:
        return "ComfyUI 0.9.x's fp8 layers need comfy-kitchen (pip install comfy-kitchen)"
    return None


def build_quantized_unet(seed: int = 0, form: str = "scaled"):
    """The tiny SD1.5 UNet with every ``Linear`` (attention, feed-forward, time embedding) stored in float8_e4m3fn.

    ``form="scaled"``: as an "fp8 scaled" checkpoint loads, with a per-layer scale, through core's own quantized
    operations — on ComfyUI 0.9.x ``mixed_precision_ops`` (``QuantizedTensor`` weights, a ``comfy_quant`` entry per
    layer), on 0.3.x ``scaled_fp8_ops`` (fp8 weights and ``scale_weight``). Both give those layers ``set_weight`` /
    ``convert_weight``, which is how core patches them; fp8 compute is off on a CPU, so they dequantize in forward.
    ``form="fp8"``: plain fp8 weights cast to fp32 in forward (``manual_cast``), as the loaders' ``weight_dtype``
    fp8_e4m3fn gives; core patches those with ``stochastic_rounding``.
    ``form="nvfp4"`` (0.9.x only): 4-bit weights packed two to a byte with fp8 block scales, whose state-dict entry
    is the packed ``[out, in / 2]`` bytes while the layer computes with ``[out, in]``.
    Returns ``(patcher, linear_keys)``: the quantized layers' weight keys (``diffusion_model.….weight``)."""
    import json

    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models

    plain = build_unet("sd15", seed).model.diffusion_model
    linears = [name for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)]
    sd = plain.state_dict()
    fp8 = torch.float8_e4m3fn
    mixed = hasattr(comfy.ops, "mixed_precision_ops")
    for name in linears:
        w = sd[f"{name}.weight"]
        if form == "fp8":
            sd[f"{name}.weight"] = w.to(fp8)
            continue
        if mixed:  # the layer's entries as core's own QuantizedTensor writes them (data and scales)
            import comfy.quant_ops

            layout, fmt = (("TensorCoreNVFP4Layout", "nvfp4") if form == "nvfp4"
                           else ("TensorCoreFP8E4M3Layout", "float8_e4m3fn"))
            quantized = comfy.quant_ops.QuantizedTensor.from_float(w, layout, scale="recalculate")
            sd.update(quantized.state_dict(f"{name}.weight"))
            sd[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
            continue
        if form == "nvfp4":
            raise ValueError("nvfp4 layers exist from ComfyUI 0.9 on")
        scale = (w.abs().max() / FP8_MAX).reshape(())
        sd[f"{name}.weight"] = (w / scale).to(fp8)
        sd[f"{name}.scale_weight"] = scale
    config = dict(SD15_TINY, dtype=torch.float32)
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.float32, None)
    if form == "fp8":  # fp8 parameters are created by loading them (load_state_dict keeps a Parameter's dtype)
        model_config.custom_operations = comfy.ops.manual_cast
    elif mixed:  # what pick_operations returns for a quant_config on a device without fp8 compute
        model_config.custom_operations = comfy.ops.mixed_precision_ops(
            {}, torch.float32, disabled={"float8_e4m3fn", "float8_e5m2", "nvfp4"})
    else:
        model_config.custom_operations = comfy.ops.scaled_fp8_ops(override_dtype=fp8)
    # Loaded under inference mode, as ComfyUI's executor loads checkpoints: 0.9.x wraps a QuantizedTensor made
    # outside it in a Parameter inside it (its unpatch does) only with "Cannot set version_counter".
    with torch.inference_mode():
        model = model_config.get_model({}, device=torch.device("cpu"))
        if form == "fp8":
            for name in linears:
                layer = model.diffusion_model.get_submodule(name)
                layer.weight = torch.nn.Parameter(sd[f"{name}.weight"], requires_grad=False)
        missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"quantized tiny UNet: missing {missing[:5]}, unexpected {unexpected[:5]}")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    return patcher, [f"diffusion_model.{name}.weight" for name in linears]

# A tiny Flux (DiT): one double and one single block. mlp_ratio stays 4 because core's diffusers key map
# (comfy.utils.flux_to_diffusers) slices proj_mlp as hidden_size * 4 rows of single_blocks.linear1.
FLUX_TINY = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 48,
             "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
             "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}


def build_flux(seed: int = 0):
    """A ModelPatcher over a tiny ``comfy.supported_models.Flux`` model (16-channel latents, guidance input)."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = dict(FLUX_TINY)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []  # a required field in newer ComfyUI (0.9.2), absent in 0.3.64
    model_config = comfy.supported_models.Flux(config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# SD3's MMDiT fixes hidden size 64 · depth and one head per depth unit: depth 2 → hidden 128, 2 heads. Block 1 is the
# last one, whose context stream is "pre-only" (no attention output or MLP), as in the real model.
SD3_TINY = {"in_channels": 16, "out_channels": 16, "pos_embed_scaling_factor": None, "patch_size": 2, "depth": 2,
            "adm_in_channels": 32, "pos_embed_max_size": 8, "num_patches": 64,
            "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}}}


def build_sd3(seed: int = 0):
    """A ModelPatcher over a tiny ``comfy.supported_models.SD3`` MMDiT (16-channel latents, pooled ``y``, text
    context of width 48: the same cond shapes as ``FLUX_TINY``)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD3(dict(SD3_TINY))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed)
    with torch.no_grad():  # a buffer (torch.empty in core): the real model loads it from the checkpoint
        pos_embed = model.diffusion_model.pos_embed
        pos_embed.copy_(torch.randn(pos_embed.shape, generator=torch.Generator().manual_seed(seed + 1)) * 0.1)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


# Wan 2.1 text-to-video, 2 blocks of width 32: a Conv3d patch embedding, RMSNorm q/k norms, 5-D latents
# [batch, 16, frames, h, w], text context of width 48 (16 tokens).
WAN_TINY = {"image_model": "wan2.1", "model_type": "t2v", "dim": 32, "ffn_dim": 64, "freq_dim": 32, "text_dim": 48,
            "num_heads": 2, "num_layers": 2, "in_dim": 16, "out_dim": 16, "eps": 1e-6, "text_len": 16}


def build_wan(seed: int = 0):
    """A ModelPatcher over a tiny ``comfy.supported_models.WAN21_T2V`` video DiT."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.WAN21_T2V(dict(WAN_TINY))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed=seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_sd15_controlnet(seed: int = 5):
    """A core ``comfy.controlnet.ControlNet`` over a tiny ``cldm.ControlNet`` shaped like ``SD15_TINY`` (RGB hint,
    8× compression), with random weights so that it changes the UNet's output."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = {k: v for k, v in SD15_TINY.items()
              if k not in ("out_channels", "use_temporal_attention", "use_temporal_resblock")}
    net = comfy.cldm.cldm.ControlNet(**config, hint_channels=3, num_heads=8, device=torch.device("cpu"),
                                     operations=comfy.ops.disable_weight_init)
    init_weights_(net, seed=seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"), manual_cast_dtype=None)


def build_sd15_clip(seed: int = 1):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base

    clip = comfy.sd.CLIP(
        target=comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
        model_options={"clip_l_model_config": {"hidden_size": 64, "intermediate_size": 128,
                                               "num_attention_heads": 2, "num_hidden_layers": 2,
                                               "projection_dim": 64}})
    init_weights_(clip.cond_stage_model, seed, scale=0.02)
    return clip


def build_sdxl_clip(seed: int = 2):
    """Tiny SDXL text encoders (CLIP-L and CLIP-G). Three layers: SDXL reads the penultimate one."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 3,
             "projection_dim": 64}
    clip = comfy.sd.CLIP(
        target=comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
        model_options={"clip_l_model_config": small, "clip_g_model_config": small})
    init_weights_(clip.cond_stage_model, seed, scale=0.02)
    return clip


def weights_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every weight: comparable whether the module was loaded onto a GPU in between or not."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def patched_weights(patcher) -> dict[str, torch.Tensor]:
    """Load a ModelPatcher the way sampling does (``load_models_gpu``), copy its weights, unload.

    Going through model management matters: clones share one module, and only ``load_models_gpu``
    unpatches whichever clone was loaded before (a bare ``patch_model`` skips modules marked patched).
    """
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        return weights_snapshot(patcher.model)
    finally:
        mm.unload_all_models()


def emulate_gpu_loads(monkeypatch) -> None:
    """Make ComfyUI's real ``load_models_gpu`` also do what a load onto a GPU does to the weights on a CPU-only
    machine: ``Module._apply`` replaces every ``param.data`` with the moved copy (here: a copy), in whatever
    autograd mode the caller loads under. Made with autograd on, such a move leaves weights created under
    inference mode without a version counter and unusable (the CUDA failure this guards against).
    """
    import comfy.model_management as mm

    real = mm.load_models_gpu

    def load_and_move(models, *args, **kwargs):
        out = real(models, *args, **kwargs)
        for patcher in models:
            patcher.model._apply(lambda t: t.clone())
        return out

    monkeypatch.setattr(mm, "load_models_gpu", load_and_move)
