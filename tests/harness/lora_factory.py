"""Write tiny LoRA files in every format and key style, with the expected weight deltas.

Each builder returns the tensors (to save) and, per model key, the delta computed *independently*
from the formulas in algorithms.md §8 (not with ComfyUI's code), so tests can check both that a
file loads with zero unmatched keys and that it produces the right weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

DIFFUSION = "diffusion_model."


@dataclass
class TinyLora:
    tensors: dict[str, torch.Tensor]
    expected: dict[str, torch.Tensor] = field(default_factory=dict)  # model key → ΔW at strength 1
    metadata: dict[str, str] = field(default_factory=dict)

    def amplified(self, factor: float, suffixes=("lora_up.weight",)) -> "TinyLora":
        """Scale the named factors in place (strong deltas make a wrong LoRA at any step visible).

        ``expected`` is left alone: use it only with ``factor`` 1 or for linear formats after rescaling.
        """
        for key in self.tensors:
            if key.endswith(tuple(suffixes)):
                self.tensors[key] = self.tensors[key] * factor
        return self

    def save(self, path) -> str:
        save_file(self.tensors, str(path), metadata=self.metadata or None)
        return str(path)


def sgm_path(model_key: str) -> str:
    return model_key[len(DIFFUSION):-len(".weight")]


def diffusers_paths(patcher) -> dict[str, str]:
    """model key → diffusers module path (``down_blocks.0.attentions.0…``) for UNet models."""
    import comfy.utils

    mapping = comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
    return {DIFFUSION + v: k[:-len(".weight")] for k, v in mapping.items() if k.endswith(".weight")}


# key style → (module name from (model_key, diffusers_path), down suffix, up suffix)
def _style(style: str, model_key: str, diffusers: str | None) -> tuple[str, str, str]:
    p = sgm_path(model_key)
    if style == "kohya":
        return "lora_unet_" + p.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
    if style == "comfy_generic":
        return DIFFUSION + p, ".lora_down.weight", ".lora_up.weight"
    assert diffusers is not None, f"{model_key} has no diffusers name"
    if style == "kohya_diffusers":  # LCM-LoRA, B-LoRA via ComfyUI-B-LoRA, most diffusers→kohya conversions
        return "lora_unet_" + diffusers.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
    if style == "lycoris":
        return "lycoris_" + diffusers.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
    if style == "diffusers_attnproc":  # diffusers < 0.22 attention-processor files
        name = "unet." + diffusers.replace(".to_", ".processor.to_")
        name = name[:-2] if name.endswith(".to_out.0") else name
        return name, "_lora.down.weight", "_lora.up.weight"
    if style == "diffusers_peft":  # diffusers ≥ 0.22 (PEFT backend)
        return "unet." + diffusers, ".lora_A.weight", ".lora_B.weight"
    if style == "diffusers":
        return "unet." + diffusers, ".lora.down.weight", ".lora.up.weight"
    if style == "blora":  # B-LoRA author files: doubled prefix
        return "unet.unet." + diffusers, ".lora.down.weight", ".lora.up.weight"
    if style == "peft_raw":
        return "base_model.model." + diffusers, ".lora_A.weight", ".lora_B.weight"
    raise ValueError(style)


KEY_STYLES = ("kohya", "comfy_generic", "kohya_diffusers", "lycoris", "diffusers_attnproc", "diffusers_peft",
              "diffusers", "blora", "peft_raw")
ALPHA_FREE_STYLES = ("diffusers_peft", "diffusers", "blora", "peft_raw", "diffusers_attnproc")


def pick_targets(model_sd: dict, kinds=("attn", "proj", "ff", "conv3")) -> list[str]:
    """A handful of real layers: attention projections, a 1×1/linear proj_in, a feed-forward, a 3×3 conv."""
    keys = [k for k in model_sd if k.startswith(DIFFUSION) and k.endswith(".weight")]
    chosen: list[str] = []
    if "attn" in kinds:
        chosen += [k for k in keys if ".attn2.to_" in k or ".attn1.to_out.0" in k][:5]
    if "proj" in kinds:
        chosen += [k for k in keys if k.endswith("proj_in.weight")][:1]
    if "ff" in kinds:
        chosen += [k for k in keys if k.endswith("ff.net.2.weight")][:1]
    if "conv3" in kinds:
        chosen += [k for k in keys if model_sd[k].ndim == 4 and model_sd[k].shape[-1] == 3 and "in_layers" in k][:1]
    return chosen


def _rand(g, *shape, scale=0.1):
    return torch.randn(*shape, generator=g) * scale


def lora_module(g, weight: torch.Tensor, rank: int, alpha: float | None, tucker: bool = False):
    """(tensors by suffix-kind, expected ΔW) for LoRA / LoCon (optionally Tucker) at strength 1."""
    out_dim = weight.shape[0]
    if weight.ndim == 4 and tucker:
        in_dim, kh, kw = weight.shape[1:]
        down = _rand(g, rank, in_dim, 1, 1)
        mid = _rand(g, rank, rank, kh, kw)
        up = _rand(g, out_dim, rank, 1, 1)
        delta = torch.einsum("pqhw,op,qi->oihw", mid, up[:, :, 0, 0], down[:, :, 0, 0])
        parts = {"down": down, "up": up, "mid": mid}
    else:
        down = _rand(g, rank, *weight.shape[1:])
        up = _rand(g, out_dim, rank, *([1, 1] if weight.ndim == 4 else []))
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        parts = {"down": down, "up": up}
    scale = 1.0 if alpha is None else alpha / rank
    return parts, delta * scale


def make_lora(model_sd: dict, targets: list[str], style: str = "kohya", rank: int = 4, alpha: float | None = 2.0,
              seed: int = 0, diffusers: dict[str, str] | None = None, tucker: bool = False) -> TinyLora:
    g = torch.Generator().manual_seed(seed)
    lora = TinyLora(tensors={})
    if style in ALPHA_FREE_STYLES:
        alpha = None
    for key in targets:
        name, down_sfx, up_sfx = _style(style, key, (diffusers or {}).get(key))
        parts, delta = lora_module(g, model_sd[key], rank, alpha, tucker=tucker)
        lora.tensors[name + down_sfx] = parts["down"]
        lora.tensors[name + up_sfx] = parts["up"]
        if "mid" in parts:
            lora.tensors[name + ".lora_mid.weight"] = parts["mid"]
        if alpha is not None:
            lora.tensors[name + ".alpha"] = torch.tensor(float(alpha))
        lora.expected[key] = delta
    return lora


def make_loha(model_sd: dict, targets: list[str], rank: int = 3, alpha: float = 1.5, seed: int = 0,
              tucker: bool = False) -> TinyLora:
    """LoHa: ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank. ``tucker`` (conv targets): LyCORIS' CP/Tucker form, each
    factor ``einsum('ij kl, ip, jr -> pr kl', t, a, b)`` with ``hada_t*`` [rank, rank, kh, kw], ``hada_w*_a``
    [rank, out], ``hada_w*_b`` [rank, in] (LyCORIS ``rebuild_tucker``)."""
    g = torch.Generator().manual_seed(seed)
    lora = TinyLora(tensors={})
    for key in targets:
        w = model_sd[key]
        name = "lora_unet_" + sgm_path(key).replace(".", "_")
        if tucker and w.ndim == 4:
            halves = []
            for i in (1, 2):
                t, a, b = _rand(g, rank, rank, *w.shape[2:]), _rand(g, rank, w.shape[0]), _rand(g, rank, w.shape[1])
                lora.tensors.update({f"{name}.hada_t{i}": t, f"{name}.hada_w{i}_a": a, f"{name}.hada_w{i}_b": b})
                halves.append(torch.einsum("ijkl,ip,jr->prkl", t, a, b))
            lora.tensors[f"{name}.alpha"] = torch.tensor(alpha)
            lora.expected[key] = halves[0] * halves[1] * (alpha / rank)
            continue
        inner = w[0].numel()
        w1a, w1b = _rand(g, w.shape[0], rank), _rand(g, rank, inner)
        w2a, w2b = _rand(g, w.shape[0], rank), _rand(g, rank, inner)
        lora.tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                             f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(alpha)})
        lora.expected[key] = ((w1a @ w1b) * (w2a @ w2b)).reshape(w.shape) * (alpha / rank)
    return lora


def _factor(n: int) -> tuple[int, int]:
    a = int(n ** 0.5)
    while n % a:
        a -= 1
    return a, n // a


def make_lokr(model_sd: dict, targets: list[str], rank: int = 2, alpha: float = 1.0, seed: int = 0) -> TinyLora:
    """W1 full [out_l, in_m], W2 low-rank [out_k, r]@[r, in_n] ⇒ ΔW = kron(W1, W2)·alpha/r (linear layers); conv
    targets get LyCORIS' Tucker form of W2: ``lokr_t2`` [r, r, kh, kw], ``lokr_w2_a`` [r, out_k], ``lokr_w2_b``
    [r, in_n], W2 = einsum('ij kl, ip, jr -> pr kl', t2, w2_a, w2_b) (``rebuild_tucker``), ΔW = kron(W1[.., 1, 1],
    W2)·alpha/r."""
    g = torch.Generator().manual_seed(seed)
    lora = TinyLora(tensors={})
    for key in targets:
        w = model_sd[key]
        if w.ndim == 4:
            out_l, out_k = _factor(w.shape[0])
            in_m, in_n = _factor(w.shape[1])
            name = "lora_unet_" + sgm_path(key).replace(".", "_")
            w1, t2 = _rand(g, out_l, in_m), _rand(g, rank, rank, *w.shape[2:])
            w2a, w2b = _rand(g, rank, out_k), _rand(g, rank, in_n)
            lora.tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_t2": t2, f"{name}.lokr_w2_a": w2a,
                                 f"{name}.lokr_w2_b": w2b, f"{name}.alpha": torch.tensor(alpha)})
            w2 = torch.einsum("ijkl,ip,jr->prkl", t2, w2a, w2b).contiguous()  # (torch.kron: views only)
            lora.expected[key] = torch.kron(w1[:, :, None, None], w2) * (alpha / rank)
            continue
        assert w.ndim == 2, "make_lokr writes linear and conv layers"
        out_l, out_k = _factor(w.shape[0])
        in_m, in_n = _factor(w.shape[1])
        name = "lora_unet_" + sgm_path(key).replace(".", "_")
        w1 = _rand(g, out_l, in_m)
        w2a, w2b = _rand(g, out_k, rank), _rand(g, rank, in_n)
        lora.tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b,
                             f"{name}.alpha": torch.tensor(alpha)})
        lora.expected[key] = torch.kron(w1, w2a @ w2b) * (alpha / rank)
    return lora


def make_full_diff(model_sd: dict, targets: list[str], seed: int = 0) -> TinyLora:
    g = torch.Generator().manual_seed(seed)
    lora = TinyLora(tensors={})
    for key in targets:
        diff = _rand(g, *model_sd[key].shape, scale=0.01)
        lora.tensors[f"{DIFFUSION}{sgm_path(key)}.diff"] = diff
        lora.expected[key] = diff
    return lora


def make_dora(model_sd: dict, targets: list[str], rank: int = 4, alpha: float = 4.0, seed: int = 0) -> TinyLora:
    """LoRA + ``dora_scale`` of shape [out, 1] (LyCORIS wd_on_out). ``expected`` holds the plain ΔW only."""
    lora = make_lora(model_sd, targets, "kohya", rank=rank, alpha=alpha, seed=seed)
    g = torch.Generator().manual_seed(seed + 99)
    for key in targets:
        w = model_sd[key]
        name = "lora_unet_" + sgm_path(key).replace(".", "_")
        norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.ndim - 1))
        lora.tensors[f"{name}.dora_scale"] = norm * (1.0 + 0.1 * torch.rand(norm.shape, generator=g))
    return lora


def make_te_lora(clip_sd: dict, style: str = "kohya", rank: int = 2, seed: int = 5) -> TinyLora:
    """Text-encoder LoRA: SD1 (``lora_te_…`` kohya or ``text_encoder.…`` diffusers names) or, with
    style ``kohya_sdxl``, SDXL's two encoders (``lora_te1_…`` for CLIP-L, ``lora_te2_…`` for CLIP-G)."""
    g = torch.Generator().manual_seed(seed)
    lora = TinyLora(tensors={})
    for key in clip_sd:
        if "encoder.layers." in key and key.endswith((".q_proj.weight", ".fc1.weight")):
            encoder, _, rest = key.partition(".transformer.")
            module = rest[:-len(".weight")]  # text_model.encoder.layers.0.self_attn.q_proj
            if style == "kohya_sdxl":
                prefix = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"}[encoder]
                name, dn, up = prefix + module.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
            elif style == "kohya":
                name, dn, up = "lora_te_" + module.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
            else:
                name, dn, up = "text_encoder." + module, ".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"
            parts, delta = lora_module(g, clip_sd[key], rank, None)
            lora.tensors[name + dn], lora.tensors[name + up] = parts["down"], parts["up"]
            lora.expected[key] = delta
    return lora


def save_strong_loras(model_sd: dict, targets: list[str], folder, prefix: str, seeds, ranks) -> list[str]:
    """Kohya LoRAs on ``targets`` (one per seed, alpha 1), their ups amplified 8× so that a wrong LoRA at any step is
    visible, saved as ``{prefix}_{i}.safetensors`` in ``folder``; returns the file names."""
    names = []
    for i, (seed, rank) in enumerate(zip(seeds, ranks)):
        lora = make_lora(model_sd, targets, "kohya", rank=rank, alpha=1.0, seed=seed)
        lora.amplified(8)
        names.append(f"{prefix}_{i}.safetensors")
        lora.save(Path(folder) / names[-1])
    return names
