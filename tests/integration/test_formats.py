"""Every LoRA format and key style loads with zero unmatched keys and gives the formula's weights.

Expected deltas come from tests/harness/lora_factory.py (the formulas of algorithms.md §8, written
independently of ComfyUI); the patched weights come from LoraSetApply through real ModelPatchers.
fp32 throughout; tolerance 1e-5 relative to the delta's magnitude, plus the rounding of W + ΔW
itself (4 ulps of the weight's dtype at its magnitude; the tiny CLIP is fp16 like ComfyUI's: the delta is recovered as (W + ΔW) − W).
"""
from __future__ import annotations

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_sd15_clip, build_unet, patched_weights, weights_snapshot

RTOL = 1e-5


def assert_delta(base: dict, patched: dict, expected: dict, strength: float = 1.0):
    for key, delta in expected.items():
        got = patched[key].float() - base[key].float()
        want = strength * delta
        err = (got - want).abs().max().item()
        tol = RTOL * want.abs().max().item() + 4 * torch.finfo(base[key].dtype).eps * base[key].abs().max().item()
        assert err <= tol, f"{key}: max error {err:.3e} > {tol:.3e}"
    untouched = [k for k in base if k not in expected and not torch.equal(base[k], patched[k])]
    assert not untouched, f"weights changed that the LoRA does not target: {untouched[:3]}"


def apply_file(env, path, model, clip=None, sm=1.0, sc=1.0):
    name = path.name
    (lora_set,) = call_node("LoraSetLoad", lora_name=name, strength_model=sm, strength_clip=sc)
    return call_node("LoraSetApply", model=model, lora_set=lora_set, clip=clip)


@pytest.fixture(scope="module")
def sd15():
    return build_unet("sd15", seed=0)


@pytest.mark.parametrize("style", lf.KEY_STYLES)
def test_key_style_loads_every_key(env, sd15, style):
    sd = sd15.model.state_dict()
    targets = lf.pick_targets(sd, kinds=("attn", "proj", "ff"))
    lora = lf.make_lora(sd, targets, style=style, diffusers=lf.diffusers_paths(sd15), seed=3)
    path = env.models_dir / "loras" / f"style_{style}.safetensors"
    lora.save(path)
    base = weights_snapshot(sd15.model)
    model, _, report = apply_file(env, path, sd15, sm=0.7)
    assert "0 unmatched" in report, report
    assert_delta(base, patched_weights(model), lora.expected, strength=0.7)
    assert all(torch.equal(v, sd15.model.state_dict()[k]) for k, v in base.items()), "base model changed"


@pytest.mark.parametrize("fmt", ["locon_3x3", "locon_tucker", "loha", "lokr", "full_diff"])
def test_format_matches_formula(env, sd15, fmt):
    sd = sd15.model.state_dict()
    if fmt.startswith("locon"):
        targets = lf.pick_targets(sd, kinds=("conv3", "proj"))
        lora = lf.make_lora(sd, targets, "kohya", rank=3, alpha=1.5, tucker=fmt == "locon_tucker", seed=4)
    elif fmt == "loha":
        lora = lf.make_loha(sd, lf.pick_targets(sd, kinds=("attn", "conv3")), seed=5)
    elif fmt == "lokr":
        lora = lf.make_lokr(sd, [k for k in lf.pick_targets(sd, kinds=("attn",)) if sd[k].ndim == 2], seed=6)
    else:
        lora = lf.make_full_diff(sd, lf.pick_targets(sd), seed=7)
    path = env.models_dir / "loras" / f"fmt_{fmt}.safetensors"
    lora.save(path)
    base = weights_snapshot(sd15.model)
    model, _, report = apply_file(env, path, sd15, sm=-0.6)
    assert "0 unmatched" in report, report
    assert_delta(base, patched_weights(model), lora.expected, strength=-0.6)


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_text_encoder_lora(env, sd15, style):
    clip = build_sd15_clip()
    csd = clip.cond_stage_model.state_dict()
    lora = lf.make_te_lora(csd, style=style)
    unet_part = lf.make_lora(sd15.model.state_dict(), lf.pick_targets(sd15.model.state_dict(), kinds=("attn",)),
                             "kohya", seed=8)
    lora.tensors.update(unet_part.tensors)
    path = env.models_dir / "loras" / f"te_{style}.safetensors"
    lora.save(path)
    base_clip = weights_snapshot(clip.cond_stage_model)
    _, new_clip, report = apply_file(env, path, sd15, clip=clip, sm=1.0, sc=0.5)
    assert "0 unmatched" in report and f"{len(lora.expected)} CLIP" in report, report
    assert_delta(base_clip, patched_weights(new_clip.patcher), lora.expected, strength=0.5)


def test_dora_equals_core(env, sd15):
    """DoRA goes through core's weight_decompose unchanged (see the closing note on its output-axis norm)."""
    import comfy.sd
    import comfy.utils

    sd = sd15.model.state_dict()
    lora = lf.make_dora(sd, lf.pick_targets(sd, kinds=("attn",)), seed=9)
    path = env.models_dir / "loras" / "fmt_dora.safetensors"
    lora.save(path)
    ours, _, report = apply_file(env, path, sd15, sm=0.8)
    assert "0 unmatched" in report
    core, _ = comfy.sd.load_lora_for_models(sd15, None, comfy.utils.load_torch_file(str(path), safe_load=True), 0.8, 0)
    a, b = patched_weights(ours), patched_weights(core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], sd[k]) for k in lora.expected)
