"""Prompts → the keyword inputs of ``BaseModel.apply_model``, per batch row.

ComfyUI's conditioning (``[[cross_attn, {"pooled_output": …}]]``) becomes model inputs through the
model's own ``extra_conds`` (``comfy.samplers.encode_model_conds``), exactly as the samplers do, so
SDXL's size/pooled embedding ``y`` and any other family-specific input come out right. Rows with
different prompts are concatenated with the cond objects' own ``concat`` (cross-attention of
different token lengths is padded by repetition, which leaves attention unchanged).
"""
from __future__ import annotations

import logging

import comfy.sampler_helpers
import comfy.samplers
import torch

log = logging.getLogger("LoRA Composer")

RowConds = dict[str, object]  # model-cond name → comfy.conds.CONDRegular (batch 1)


def tokenize(clip, text: str, input_name: str):
    if clip is None:
        raise ValueError(f"{input_name}: a CLIP is needed to encode prompts.")
    return clip.tokenize(text)


def encode_tokens(clip, tokens) -> list:
    """CONDITIONING for ``tokens`` (gradients flow if a text-encoder LoRA is hooked and grad is on)."""
    out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
    cond = out.pop("cond")
    return [[cond, out]]


def row_conds(base_model, conditioning: list, latent_shape: tuple[int, ...], device: torch.device) -> RowConds:
    """The model conds of one prompt for one latent of ``latent_shape`` ([C, h, w]), batch 1."""
    if len(conditioning) > 1:
        log.warning("[LoRA Composer] training uses the first of %d conditioning entries.", len(conditioning))
    conds = comfy.sampler_helpers.convert_cond(conditioning[:1])
    noise = torch.zeros((1, *latent_shape), device=device)
    conds = comfy.samplers.encode_model_conds(base_model.extra_conds, conds, noise, device, "positive",
                                              latent_image=noise, denoise_mask=None, seed=0)
    out: RowConds = {}
    for name, cond in conds[0]["model_conds"].items():
        processed = cond.process_cond(batch_size=1, device=device, area=None)
        tensor = getattr(processed, "cond", None)
        if isinstance(tensor, torch.Tensor):
            processed.cond = tensor.to(device)
        out[name] = processed
    return out


def concat_rows(rows: list[RowConds]) -> list[tuple[list[int], dict[str, object]]]:
    """Group batch rows whose conds concatenate; returns [(row indices, apply_model kwargs)].

    Normally one group (instance and class prompts share shapes). Rows that cannot be concatenated
    (e.g. very different token lengths) form their own group and get their own forward pass.
    """
    groups: list[list[int]] = []
    for i, row in enumerate(rows):
        for group in groups:
            first = rows[group[0]]
            if first.keys() == row.keys() and all(first[k].can_concat(row[k]) for k in row):
                group.append(i)
                break
        else:
            groups.append([i])
    out = []
    for group in groups:
        first = rows[group[0]]
        kwargs = {k: first[k].concat([rows[i][k] for i in group[1:]]) for k in first}
        out.append((group, kwargs))
    return out
