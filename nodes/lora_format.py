"""What a LoRA file is: its modules, network type, key style, ranks, base model and trigger words.

This is pure inspection of the tensors and metadata; nothing here needs a model.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from .lora_files import metadata_json

# Every per-module suffix ComfyUI's weight adapters and diff patches read (comfy/weight_adapter/*,
# comfy/lora.py:load_lora). Longest first, so that ".lora_B.default.weight" wins over ".weight"-less forms.
MODULE_SUFFIXES: tuple[str, ...] = tuple(sorted((
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", "_lora.up.weight", "_lora.down.weight",
    ".lora_B.weight", ".lora_A.weight", ".lora.up.weight", ".lora.down.weight", ".lora_B", ".lora_A",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".lora_B.default.weight",
    ".lora_A.default.weight", ".reshape_weight", ".alpha", ".dora_scale",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".rescale",
    ".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight",
), key=len, reverse=True))

_UP_SUFFIXES = (".lora_up.weight", "_lora.up.weight", ".lora_B.weight", ".lora.up.weight", ".lora_B",
                ".lora_linear_layer.up.weight", ".lora_B.default.weight")
_DOWN_SUFFIXES = (".lora_down.weight", "_lora.down.weight", ".lora_A.weight", ".lora.down.weight", ".lora_A",
                  ".lora_linear_layer.down.weight", ".lora_A.default.weight")

TEXT_ENCODER_PREFIX = re.compile(r"^(lora_te\d?_|text_encoder(_\d)?\.|text_encoders\.|te\d?_|lora_te_text)")


def split_key(key: str) -> tuple[str, str]:
    """``"lora_unet_x.lora_up.weight"`` → ``("lora_unet_x", ".lora_up.weight")``; unknown suffix → ``(key, "")``."""
    for suffix in MODULE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def group_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group a LoRA state dict by module prefix: ``{prefix: {suffix: tensor}}``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix, suffix = split_key(key)
        groups.setdefault(prefix, {})[suffix] = tensor
    return groups


def module_network_type(parts: dict[str, torch.Tensor]) -> str:
    """Network type of one module from the suffixes it has (LyCORIS naming)."""
    names = parts.keys()
    if any(s.startswith(".hada_") for s in names):
        kind = "LoHa"
    elif any(s.startswith(".lokr_") for s in names):
        kind = "LoKr"
    elif ".oft_blocks" in names:
        kind = "BOFT" if parts[".oft_blocks"].ndim == 4 else "OFT"
    elif ".a1.weight" in names:
        kind = "GLoRA"
    elif any(s in names for s in _UP_SUFFIXES):
        down = next((parts[s] for s in _DOWN_SUFFIXES if s in names), None)
        kind = "LoCon" if (down is not None and down.ndim == 4) or ".lora_mid.weight" in names else "LoRA"
    elif any(s in names for s in (".diff", ".w_norm", ".set_weight", ".diff_b", ".b_norm")):
        kind = "full"
    else:
        kind = "unknown"
    if ".dora_scale" in names:
        kind = f"DoRA({kind})"
    return kind


def module_rank(parts: dict[str, torch.Tensor]) -> int | None:
    for s in (*_DOWN_SUFFIXES, ".hada_w1_b", ".lokr_w1_b", ".lokr_w2_b"):
        if s in parts:
            shape = parts[s].shape
            return int(shape[0]) if shape else None  # a 0-d "factor" has no rank (a broken file: summarised anyway)
    return None


# sd-scripts / musubi-tuner names for DiT checkpoints' own layouts: Flux double / single blocks, SD3 joint blocks, the
# video DiTs' (Wan, HunyuanVideo) blocks.N
_KOHYA_DIT = re.compile(r"lora_unet_(double_blocks|single_blocks|joint_blocks|blocks)_\d+_")


def detect_key_style(keys: list[str]) -> str:
    """Name the key convention a file uses (kohya, diffusers, PEFT, B-LoRA author files, ComfyUI generic…)."""
    if any(k.startswith("unet.unet.") for k in keys):
        return "B-LoRA (diffusers, doubled 'unet.unet.' prefix)"
    if any(k.startswith("base_model.model.") for k in keys):
        return "PEFT (base_model.model.*)"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_"))
           for k in keys):
        if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
               for k in keys):
            return "kohya (sgm/ldm module names)"
        # sd-scripts names DiT modules by the checkpoint's own layout (Flux double/single blocks, SD3 joint blocks);
        # ai-toolkit and others write diffusers transformer names under lora_transformer_
        if any(_KOHYA_DIT.match(k) for k in keys):
            return "kohya (DiT checkpoint module names)"
        if any(k.startswith("lora_transformer_") for k in keys):
            return "kohya (diffusers transformer names)"
        return "kohya (diffusers module names)"
    if any(k.startswith("lycoris_") for k in keys):
        return "LyCORIS / SimpleTuner (lycoris_*)"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) for k in keys):
        peft = any(".lora_A" in k or ".lora_B" in k for k in keys)
        return "diffusers/PEFT (lora_A/lora_B)" if peft else "diffusers (lora.down/lora.up)"
    if any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys):
        return "ComfyUI generic (diffusion_model.*)"
    return "unknown"


def _first_matching_shape(tensors: dict[str, torch.Tensor], pattern: str, suffixes: tuple[str, ...]) -> int | None:
    rx = re.compile(pattern)
    for key, t in tensors.items():
        prefix, suffix = split_key(key)
        if suffix in suffixes and rx.search(prefix):
            return int(t.reshape(t.shape[0], -1).shape[1])
    return None


# What trainers write about the base model (sd-scripts / ModelSpec): prefixes of ``modelspec.architecture`` and values
# of ``ss_base_model_version``, mapped to the families the key guess names.
_ARCHITECTURE_FAMILIES = (("stable-diffusion-v1", "SD1.x"), ("stable-diffusion-v2", "SD2.x"),
                          ("stable-diffusion-xl", "SDXL"), ("flux-1", "Flux"), ("flux.1", "Flux"),
                          ("stable-diffusion-3", "SD3"))
_BASE_VERSION_FAMILIES = (("sd_v1", "SD1.x"), ("sd_v2", "SD2.x"), ("sdxl", "SDXL"), ("flux", "Flux"), ("sd3", "SD3"))


def base_model_from_metadata(metadata: dict[str, str] | None) -> str | None:
    """The base-model family the file's own metadata names (``modelspec.architecture``, else
    ``ss_base_model_version``), or None when it names none we know."""
    metadata = metadata or {}
    architecture = str(metadata.get("modelspec.architecture", "")).strip().lower()
    for prefix, family in _ARCHITECTURE_FAMILIES:
        if architecture.startswith(prefix):
            return family
    version = str(metadata.get("ss_base_model_version", "")).strip().lower()
    for prefix, family in _BASE_VERSION_FAMILIES:
        if version.startswith(prefix):
            return family
    return None


def guess_base_model(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Best guess of the base-model family: from key names and cross-attention widths, which are what the file
    physically fits; where they leave it open (a UNet file without cross-attention layers, unknown keys) the family its
    metadata names (ModelSpec / sd-scripts), marked as such."""
    guess = _guess_from_keys(tensors)
    if guess.startswith(("SD1.x/SD2.x", "unknown")) or guess == UNET_OPEN:
        stated = base_model_from_metadata(metadata)
        if stated is not None:
            return f"{stated} (from its metadata)"
    return guess


# DiT families by module names no other family uses, in dotted (ComfyUI / diffusers) and underscored (kohya) form;
# checked before Flux's double/single blocks, which HunyuanVideo and Chroma share.
_DIT_FAMILIES = (
    (r"double_stream_blocks|single_stream_blocks", "HiDream"),
    (r"distilled_guidance_layer", "Chroma (Flux-based)"),
    (r"individual_token_refiner|(img|txt)_mlp[._]fc1|\.img_attn_qkv\.", "HunyuanVideo"),
    (r"transformer_blocks[._]\d+[._](img|txt)_mlp", "Qwen-Image"),
    (r"noise_refiner|context_refiner", "Lumina 2"),
    (r"blocks[._]\d+[._](self_attn|cross_attn)[._][qkvo]([._]|$)", "Wan"),
)


def _guess_from_keys(tensors: dict[str, torch.Tensor]) -> str:
    keys = list(tensors)
    joined = "\n".join(keys[:4000])
    for pattern, family in _DIT_FAMILIES:
        if re.search(pattern, joined, re.MULTILINE):
            return family
    if re.search(r"double_blocks|single_blocks|single_transformer_blocks", joined):
        return "Flux"
    if "joint_blocks" in joined:
        return "SD3"
    if re.search(r"transformer[._]transformer_blocks[._]\d+[._]attn[._]add_[qkv]_proj", joined):
        # diffusers' joint-attention blocks, which Flux's double blocks and SD3's share: told apart by width
        width = _first_matching_shape(tensors, r"transformer_blocks[._]\d+[._]attn[._](to_q|add_q_proj)$",
                                      _DOWN_SUFFIXES)
        return _JOINT_WIDTHS.get(width, "Flux or SD3 (diffusers joint-attention blocks; width does not tell)")
    if re.search(r"lora_te2_|text_encoder_2\.|conditioner", joined):
        return "SDXL"
    # attn2.to_k reads the text context: 768 (SD1.x), 1024 (SD2.x), 2048 (SDXL).
    ctx = _first_matching_shape(tensors, r"attn2[._]to_k$", _DOWN_SUFFIXES + (".hada_w1_b",))
    if ctx in _CONTEXT_FAMILIES:
        return _CONTEXT_FAMILIES[ctx]
    if re.search(_SDXL_LAYOUT, joined):
        return "SDXL"
    if re.search(_SD1_LAYOUT, joined):
        return "SD1.x/SD2.x (UNet)"
    if ctx is not None:
        return f"unknown (cross-attention width {ctx})"
    if re.search(r"lora_unet_|down_blocks|input_blocks|lora_te_", joined):
        return UNET_OPEN
    return "unknown"


_CONTEXT_FAMILIES = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
# hidden size: Flux.1 (Qwen-Image's joint attention is as wide; its files usually train img_mlp too, named above),
# SD3 medium, SD3.5 large
_JOINT_WIDTHS = {3072: "Flux (or Qwen-Image: as wide)", 1536: "SD3", 2432: "SD3"}
# Where the UNets' attention sits (attention blocks' module names, sgm and diffusers forms). SDXL: transformer depth 2
# and 10, attention in output_blocks 0-5 / up_blocks 0-1, none at the first level. SD1.x / SD2.x: depth 1, attention
# in input_blocks 1-2 / down_blocks 0 and output_blocks 3-11, none in up_blocks 0. (input_blocks 7 and 8 hold attention
# in both: an SD1.5 file saved with sgm names was called SDXL by them.)
_ATTENTION = r"[._](transformer_blocks|proj_in|proj_out|norm)"
_SDXL_LAYOUT = (r"blocks?([._]\d+)?[._](1|attentions[._]\d+)[._]transformer_blocks[._][1-9]"  # a UNet block's
                r"|output_blocks[._][0-2][._]1" + _ATTENTION
                + r"|up_blocks[._]0[._]attentions")
_SD1_LAYOUT = (r"input_blocks[._][12][._]1" + _ATTENTION + r"|output_blocks[._]([6-9]|1[01])[._]1" + _ATTENTION
               + r"|down_blocks[._]0[._]attentions")
UNET_OPEN = "an SD UNet (SD1.x, SD2.x or SDXL: its layers do not tell which)"


def trigger_words(metadata: dict[str, str], limit: int = 12) -> list[str]:
    """Most frequent training tags (kohya ``ss_tag_frequency``) plus explicit trigger fields if present."""
    words: list[str] = []
    for field_name in ("modelspec.trigger_phrase", "ss_trigger_words", "trigger_words"):
        value = metadata.get(field_name)
        if value:
            words.extend(w.strip() for w in value.split(",") if w.strip())
    freq = metadata_json(metadata, "ss_tag_frequency")
    if isinstance(freq, dict):
        counts: Counter[str] = Counter()
        for per_dir in freq.values():
            if isinstance(per_dir, dict):
                for tag, n in per_dir.items():
                    if isinstance(n, (int, float)) and math.isfinite(n):  # (JSON allows NaN / 1e999 here)
                        counts[tag.strip()] += int(n)
        words.extend(tag for tag, _ in counts.most_common(limit) if tag)
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))][:limit]


@dataclass(frozen=True)
class LoraSummary:
    network_types: dict[str, int]
    key_style: str
    ranks: list[int]
    alphas: list[float]
    base_model: str
    triggers: list[str]
    module_count: int
    text_encoder_modules: int

    def describe(self) -> str:
        types = ", ".join(f"{k}×{v}" for k, v in sorted(self.network_types.items()))
        ranks = _span(self.ranks)
        alphas = _span(self.alphas)
        triggers = ", ".join(self.triggers) if self.triggers else "none found"
        return (f"type {types}; key style {self.key_style}; rank {ranks}; alpha {alphas}; "
                f"base model {self.base_model}; modules {self.module_count} "
                f"({self.text_encoder_modules} text encoder); trigger words: {triggers}")


def _span(values: list) -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    fmt = (lambda v: f"{v:g}")
    return fmt(lo) if lo == hi else f"{fmt(lo)}–{fmt(hi)}"


def summarize(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
              file_keys: list[str] | None = None) -> LoraSummary:
    """``tensors`` with their keys normalised (``lora_keys.normalize_keys``); ``file_keys``: the names as the file
    spells them, which is what the key style describes (normalising rewrites B-LoRA's and PEFT's prefixes)."""
    groups = group_modules(tensors)
    types = Counter(module_network_type(p) for p in groups.values())
    ranks = sorted({r for p in groups.values() if (r := module_rank(p)) is not None})
    alphas = sorted({float(p[".alpha"].float().item()) for p in groups.values() if ".alpha" in p})
    te = sum(1 for prefix in groups if TEXT_ENCODER_PREFIX.match(prefix))
    style = detect_key_style(list(tensors) if file_keys is None else file_keys)
    return LoraSummary(network_types=dict(types), key_style=style, ranks=ranks,
                       alphas=alphas, base_model=guess_base_model(tensors, metadata), triggers=trigger_words(metadata),
                       module_count=len(groups), text_encoder_modules=te)
