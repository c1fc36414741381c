"""A tiny SD-style VAE (AutoencoderKL, 8× downscale, 4 latent channels) built in memory.

Needs a complete ComfyUI: the 0.9.2 engine ships only an import placeholder for
``comfy/ldm/models/autoencoder.py`` (see ``comfy_env.is_complete``). Weights are random but
initialised (comfy.ops layers are created uninitialised).
"""
from __future__ import annotations

import torch

from .tiny_models import init_weights_

TINY_VAE_CONFIG = {"params": {"embed_dim": 4, "ddconfig": {
    "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
    "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}}


def build_vae(seed: int = 5):
    import comfy.sd

    vae = comfy.sd.VAE(sd={}, config=TINY_VAE_CONFIG, dtype=torch.float32)
    init_weights_(vae.first_stage_model, seed, scale=0.05)
    return vae
