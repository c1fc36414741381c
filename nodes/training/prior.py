"""Class images for the prior-preservation loss, generated with the *base* model when none are given.

DreamBooth generates its class images with the frozen pretrained model from the class prompt; we
do the same with ComfyUI's own sampler (``comfy.sample.sample``, ``euler``/``normal``, CFG 7.5
against an empty negative prompt, one seed per image) and keep the resulting **latents**: encoding
the decoded images again would only add the VAE's round-trip error (and needs no VAE at all).
"""
from __future__ import annotations

import comfy.sample
import torch

CLASS_SAMPLER = "euler"
CLASS_SCHEDULER = "normal"
CLASS_CFG = 7.5
CLASS_SEED_OFFSET = 1_000_003  # class seeds differ from the training seed's noise stream


def generate_class_latents(model, clip, class_prompt: str, count: int, latent_shape: tuple[int, ...], steps: int,
                           seed: int, batch_size: int = 4) -> torch.Tensor:
    """``count`` latents ``[count, C, h, w]`` (raw latent space, like a LATENT) sampled from ``model``."""
    if count < 1:
        raise ValueError("num_class_images must be ≥ 1 to generate class images.")
    if steps < 1:
        raise ValueError(f"class_sampling_steps must be ≥ 1, got {steps}.")
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(class_prompt))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        out = []
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            empty = torch.zeros((n, *latent_shape))
            image_seed = (seed + CLASS_SEED_OFFSET + start) % 2**64  # the seed input goes up to 2^64 - 1
            noise = comfy.sample.prepare_noise(empty, image_seed)
            samples = comfy.sample.sample(model, noise, steps, CLASS_CFG, CLASS_SAMPLER, CLASS_SCHEDULER, positive,
                                          negative, empty, disable_pbar=True, seed=image_seed)
            out.append(samples.float().cpu())
    return torch.cat(out).clone()
