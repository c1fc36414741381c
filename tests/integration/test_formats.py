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
from harness.node_calls import call_node, load_set
from harness.sampling import cat_conds, run_custom, sigmas_for
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


@pytest.mark.parametrize("fmt", ["locon_3x3", "locon_tucker", "loha", "loha_tucker", "lokr", "lokr_tucker",
                                 "full_diff"])
def test_format_matches_formula(env, sd15, fmt):
    sd = sd15.model.state_dict()
    if fmt.startswith("locon"):
        targets = lf.pick_targets(sd, kinds=("conv3", "proj"))
        lora = lf.make_lora(sd, targets, "kohya", rank=3, alpha=1.5, tucker=fmt == "locon_tucker", seed=4)
    elif fmt == "loha":
        lora = lf.make_loha(sd, lf.pick_targets(sd, kinds=("attn", "conv3")), seed=5)
    elif fmt == "loha_tucker":
        lora = lf.make_loha(sd, lf.pick_targets(sd, kinds=("conv3",)), tucker=True, seed=5)
    elif fmt == "lokr":
        lora = lf.make_lokr(sd, [k for k in lf.pick_targets(sd, kinds=("attn",)) if sd[k].ndim == 2], seed=6)
    elif fmt == "lokr_tucker":  # core's own LoKr code fails on these (kron of a non-contiguous einsum): we build W2
        lora = lf.make_lokr(sd, [k for k in lf.pick_targets(sd, kinds=("conv3",)) if sd[k].ndim == 4], seed=6)
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


def _glora_and_oft(sd, targets, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, key in enumerate(targets):
        name = "lora_unet_" + lf.sgm_path(key).replace(".", "_")
        out_dim, in_dim = sd[key].shape[:2]
        if i % 2 == 0:  # GLoRA (LyCORIS ≥ 2): ΔW = W·a1·a2 + b1·b2
            r = 2
            tensors.update({f"{name}.a1.weight": torch.randn(in_dim, r, generator=g) * 0.1,
                            f"{name}.a2.weight": torch.randn(r, in_dim, generator=g) * 0.1,
                            f"{name}.b1.weight": torch.randn(out_dim, r, generator=g) * 0.1,
                            f"{name}.b2.weight": torch.randn(r, in_dim, generator=g) * 0.1,
                            f"{name}.alpha": torch.tensor(1.0)})
        else:  # OFT: block-diagonal rotation of the output dimension
            blocks = 4
            tensors[f"{name}.oft_blocks"] = torch.randn(blocks, out_dim // blocks, out_dim // blocks, generator=g) * 0.05
    return tensors


def test_glora_and_oft_load_and_equal_core(env, sd15):
    """Formats we hand to core's own adapters unchanged: zero unmatched keys, bit-identical to core."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    sd = sd15.model.state_dict()
    targets = [k for k in lf.pick_targets(sd, kinds=("attn",)) if sd[k].ndim == 2]
    path = env.models_dir / "loras" / "fmt_glora_oft.safetensors"
    save_file(_glora_and_oft(sd, targets, seed=12), str(path))
    ours, _, report = apply_file(env, path, sd15, sm=0.9)
    assert "0 unmatched" in report, report
    core, _ = comfy.sd.load_lora_for_models(sd15, None, comfy.utils.load_torch_file(str(path), safe_load=True), 0.9, 0)
    a, b = patched_weights(ours), patched_weights(core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sum(not torch.equal(a[k], sd[k]) for k in targets) == len(targets)


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_lora_file_equals_core_and_runs_unmerged(env, sd15, dtype):
    """LoRA files saved in fp8 (some trainers and converters write float8 factors): the loader's NaN check had no
    fp8 kernel and every such file failed to load (NotImplementedError). Now: LoraSetApply = core's LoraLoader bit
    for bit, and the unmerged runtime (factors upcast once) = the merged strategy within fp32's 1e-5."""
    import comfy.sample
    import comfy.sd
    import comfy.utils

    fp8 = getattr(torch, dtype, None)
    if fp8 is None:
        pytest.skip(f"this torch has no {dtype}")
    sd = sd15.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd, kinds=("attn", "proj")), "kohya", rank=4, alpha=2.0, seed=17)
    lora.tensors = {k: v if k.endswith(".alpha") else (v * 4).to(fp8) for k, v in lora.tensors.items()}
    name = f"fp8_{dtype}.safetensors"
    path = env.models_dir / "loras" / name
    lora.save(path)
    ours, _, report = apply_file(env, path, sd15)
    assert "0 unmatched" in report, report
    core, _ = comfy.sd.load_lora_for_models(sd15, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0, 0)
    a, b = patched_weights(ours), patched_weights(core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    pos, neg = cat_conds()
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    outs = {}
    for strategy in ("merged", "unmerged"):
        (m, _clip, _report) = call_node("LoraSetComposite", model=sd15, lora_set=load_set([name]), strategy=strategy)
        outs[strategy] = run_custom(m, "euler", sigmas_for(sd15, 3), pos, neg, noise, latent)
    diff = (outs["unmerged"] - outs["merged"]).abs().max().item()
    assert diff <= RTOL * outs["merged"].abs().max().item(), diff


def test_lcm_lora_style_file(env, sd15):
    """LCM-LoRA files: kohya names of diffusers modules, including resnet convs and the time embedding."""
    sd = sd15.model.state_dict()
    diffusers = lf.diffusers_paths(sd15)
    targets = lf.pick_targets(sd, kinds=("attn", "proj", "ff", "conv3")) + [
        k for k in sd if k.endswith("time_embed.0.weight") or k.endswith("time_embed.2.weight")]
    lora = lf.make_lora(sd, [t for t in targets if t in diffusers], "kohya_diffusers", rank=4, alpha=4.0,
                        diffusers=diffusers, seed=13)
    assert any("time_embedding" in k for k in lora.tensors) and any("resnets" in k for k in lora.tensors)
    path = env.models_dir / "loras" / "lcm_lora_style.safetensors"
    lora.save(path)
    base = weights_snapshot(sd15.model)
    model, _, report = apply_file(env, path, sd15)
    assert "0 unmatched" in report, report
    assert_delta(base, patched_weights(model), lora.expected)


def test_sdxl_text_encoder_lora(env):
    """SDXL files name the two text encoders lora_te1_ (CLIP-L) and lora_te2_ (CLIP-G)."""
    from harness.tiny_models import build_sdxl_clip

    sdxl, clip = build_unet("sdxl", seed=3), build_sdxl_clip()
    csd = clip.cond_stage_model.state_dict()
    lora = lf.make_te_lora(csd, style="kohya_sdxl", seed=14)
    assert any(k.startswith("lora_te2_") for k in lora.tensors) and any(k.startswith("lora_te1_") for k in lora.tensors)
    path = env.models_dir / "loras" / "te_sdxl.safetensors"
    lora.save(path)
    base = weights_snapshot(clip.cond_stage_model)
    _, new_clip, report = apply_file(env, path, sdxl, clip=clip, sc=0.75)
    assert "0 unmatched" in report and f"{len(lora.expected)} CLIP" in report, report
    assert_delta(base, patched_weights(new_clip.patcher), lora.expected, strength=0.75)


# Deliberate differences from core, listed: key styles core maps to nothing on SD1.x/SDXL UNets.
CORE_MISSES = ("diffusers_peft", "diffusers", "blora", "peft_raw")


@pytest.mark.parametrize("style", CORE_MISSES)
def test_deliberate_difference_core_loads_nothing_of_these_styles(env, sd15, style):
    """Core's key map only knows '….processor.to_q' diffusers names for attention layers; in these real-world
    styles (diffusers ≥ 0.22 PEFT files, B-LoRA author files, raw PEFT adapters) core drops every attention
    key (B-LoRA and raw PEFT files: every key). Ours loads all of them (test_key_style_loads_every_key)."""
    import comfy.sd

    sd = sd15.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd, kinds=("attn", "proj")), style=style,
                        diffusers=lf.diffusers_paths(sd15), seed=15)
    core, _ = comfy.sd.load_lora_for_models(sd15, None, lora.tensors, 1.0, 0)
    attention = {k for k in lora.expected if ".to_" in k}
    assert attention and not attention & set(core.patches), f"core now maps {style}; drop our special case"
    if style in ("blora", "peft_raw"):  # the prefix itself is unknown to core: nothing at all maps
        assert not core.patches


def test_deliberate_difference_core_cannot_compute_a_tucker_lokr(env, sd15):
    """LyCORIS LoKr with lokr_t2 (Tucker W2, on convs): core's LoKr code passes the einsum's non-contiguous result to
    torch.kron, which fails ("view size is not compatible…"); core logs it and leaves the layer unpatched. We build
    W2 contiguous with core's own einsum and scale (``patching.core_computable``) and match the formula
    (test_format_matches_formula[lokr_tucker]). If core starts computing it, this test says to drop our rewrite."""
    import comfy.sd

    sd = sd15.model.state_dict()
    lora = lf.make_lokr(sd, [k for k in lf.pick_targets(sd, kinds=("conv3",)) if sd[k].ndim == 4][:1], seed=16)
    core, _ = comfy.sd.load_lora_for_models(sd15, None, lora.tensors, 1.0, 0)
    (key,) = lora.expected
    assert torch.equal(patched_weights(core)[key], sd[key]), "core now computes Tucker LoKr: drop core_computable"


@pytest.mark.parametrize("style", sorted(set(lf.KEY_STYLES) - set(CORE_MISSES)))
def test_every_other_style_is_core_mapping_unchanged(env, sd15, style):
    """For every style core does map, our patches are core's patches (same keys, same adapters)."""
    import comfy.sd

    sd = sd15.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd, kinds=("attn", "proj")), style=style,
                        diffusers=lf.diffusers_paths(sd15), seed=16)
    path = env.models_dir / "loras" / f"core_same_{style}.safetensors"
    lora.save(path)
    ours, _, _ = apply_file(env, path, sd15)
    core, _ = comfy.sd.load_lora_for_models(sd15, None, lora.tensors, 1.0, 0)
    assert set(ours.patches) == set(core.patches) == set(lora.expected)
