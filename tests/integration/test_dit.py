"""DiT models ComfyUI maps (a tiny Flux, a tiny SD3 MMDiT, a tiny Wan 2.1 video DiT): loading in kohya / OneTrainer
and diffusers key styles, and the composition nodes (Wan: 5-D video latents, RMSNorm q/k norms, a Conv3d patch
embedding).

Diffusers-style Flux files (diffusers, ai-toolkit, most Flux LoRAs in the wild) name separate ``to_q`` / ``to_k`` /
``to_v`` / ``proj_mlp`` layers that core maps onto *slices* of the fused ``qkv`` / ``linear1`` weights (patch
targets ``(key, (dim, start, size))``); the pack refused every such file before (its shape check compared a slice's
LoRA with the whole fused weight). SD3's diffusers map (``comfy.utils.mmdit_to_diffusers``) slices the fused ``qkv``
of both streams the same way (tested with diffusers and OneTrainer files). Oracles: core's own
``load_lora_for_models`` (bit for bit) and merged vs unmerged execution (fp32, 1e-5 relative).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set as lora_set
from harness.tiny_models import (FLUX_TINY, SD3_TINY, build_flux, build_sd3, build_wan, patched_weights,
                                 weights_snapshot)

REL = 1e-5
H = FLUX_TINY["hidden_size"]
# diffusers module → (out, in): double block 0 (image and text streams, output projections) and single block 0
DIFFUSERS_MODULES = {
    "transformer_blocks.0.attn.to_q": (H, H), "transformer_blocks.0.attn.to_k": (H, H),
    "transformer_blocks.0.attn.to_v": (H, H), "transformer_blocks.0.attn.add_q_proj": (H, H),
    "transformer_blocks.0.attn.add_v_proj": (H, H), "transformer_blocks.0.attn.to_out.0": (H, H),
    "single_transformer_blocks.0.attn.to_q": (H, H), "single_transformer_blocks.0.attn.to_k": (H, H),
    "single_transformer_blocks.0.proj_mlp": (4 * H, H),
}


@pytest.fixture(scope="module")
def flux(env):
    model = build_flux(seed=0)
    sd = model.model.state_dict()
    targets = [k for k in sd if k.startswith(lf.DIFFUSION) and k.endswith(".weight") and sd[k].ndim == 2
               and ("attn" in k or "linear" in k)]
    for i in range(2):
        lora = lf.make_lora(sd, targets, "kohya", rank=2, alpha=1.0, seed=500 + i)
        lora.amplified(8)
        lora.save(env.models_dir / "loras" / f"flux_kohya_{i}.safetensors")
        g = torch.Generator().manual_seed(600 + i)
        tensors = {}
        for module, (out_features, in_features) in DIFFUSERS_MODULES.items():
            tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(2, in_features, generator=g) * 0.3
            tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out_features, 2, generator=g) * 0.3
        save_file(tensors, str(env.models_dir / "loras" / f"flux_diffusers_{i}.safetensors"))
    g = torch.Generator().manual_seed(1)
    pos, neg = ([[torch.randn(1, 7, FLUX_TINY["context_in_dim"], generator=g),
                  {"pooled_output": torch.randn(1, FLUX_TINY["vec_in_dim"], generator=g), "guidance": 3.5}]]
                for _ in range(2))
    return model, pos, neg


def sample(model_or_guider, pos=None, neg=None, cfg=3.0, steps=3, latent=None):
    import comfy.sample
    import comfy.samplers

    guider = model_or_guider
    if pos is not None:
        guider = comfy.samplers.CFGGuider(model_or_guider)
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
    latent = torch.zeros(1, 16, 8, 8) if latent is None else latent
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "simple", steps)
    return guider.sample(comfy.sample.prepare_noise(latent, 3), latent, comfy.samplers.sampler_object("euler"), sigmas,
                         disable_pbar=True, seed=3)


def close(a, b, rel=REL):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def sample_node(node, model, s, pos, neg, strategy, latent=None):
    """Build a composition node over ``model`` with set ``s`` and ``strategy`` and sample it (3 euler steps)."""
    if node == "AutoLoraGuider":
        (guider,) = call_node(node, model=model, lora_set=s, positive=pos, negative=neg, cfg_base=2.0, cfg_lora=3.0,
                              gamma=0.6, strategy=strategy)
        return sample(guider, latent=latent)
    extra = {"LoraSetSwitch": {"switch_every": 1, "schedule": "paper"},
             "AutoLoraGuidance": {"gamma": 0.6}}.get(node, {})
    return sample(call_node(node, model=model, lora_set=s, strategy=strategy, **extra)[0], pos, neg, latent=latent)


def applied_by_us_and_core(model, name: str):
    """``LoraSetApply``'s model and core's ``load_lora_for_models`` (strength 1) for one file of the loras folder."""
    import comfy.sd
    import comfy.utils
    import folder_paths

    core, _ = comfy.sd.load_lora_for_models(model.clone(), None, comfy.utils.load_torch_file(
        folder_paths.get_full_path("loras", name), safe_load=True), 1.0, 0.0)
    return call_node("LoraSetApply", model=model, lora_set=lora_set([name]))[0], core


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_flux_lora_applies_like_core(env, flux, style):
    model, pos, neg = flux
    ours, core = applied_by_us_and_core(model, f"flux_{style}_0.safetensors")
    sliced = [k for k, plist in ours.patches.items() if any(p[3] is not None for p in plist)]
    assert bool(sliced) == (style == "diffusers"), "diffusers files patch slices of the fused weights"
    assert ours.patches.keys() == core.patches.keys()
    got, want, base = sample(ours, pos, neg), sample(core, pos, neg), sample(model, pos, neg)
    assert torch.equal(got, want)
    assert not close(got, base, 1e-3), "the LoRA must change the output"
    # the report counts weights, not patches (it said one weight per q / k / v slice of a fused qkv)
    report = call_node("LoraSetApply", model=model, lora_set=lora_set([f"flux_{style}_0.safetensors"]))[2]
    assert f"{len(ours.patches)} model + 0 CLIP weights patched" in report
    assert ("on slices of fused weights" in report) == (style == "diffusers")


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_flux_composition_unmerged_equals_merged(env, flux, node, style):
    model, pos, neg = flux
    before = weights_snapshot(model.model)
    s = lora_set([f"flux_{style}_{i}.safetensors" for i in range(2)])
    merged, unmerged = (sample_node(node, model, s, pos, neg, strategy) for strategy in ("merged", "unmerged"))
    assert close(unmerged, merged), (unmerged - merged).abs().max().item()
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


def test_slice_targets_are_checked_against_their_slice(env):
    patching = env.engine("nodes.patching")
    fused = torch.Size([3 * H, H])
    assert patching._patched_shape(("k", (0, 2 * H, H)), fused) == torch.Size([H, H])
    assert patching._patched_shape(("k", (0, 2 * H + 1, H)), fused) is None, "a slice past the end does not fit"
    assert patching._patched_shape("k", fused) == fused
    assert patching._patched_shape(("k", None), fused) == fused


@pytest.mark.parametrize("method", ["linear", "concat", "svd"])
def test_diffusers_flux_loras_merge_into_whole_fused_weights(env, flux, method):
    """The slice LoRAs (to_q/to_k/to_v → fused qkv rows) merge as zero-padded whole-weight LoRAs: the merged LoRA
    (svd at a rank that holds the sum) samples like the two files applied statically."""
    model, pos, neg = flux
    s = lora_set([f"flux_diffusers_{i}.safetensors" for i in range(2)])
    merged = call_node("LoraSetMerge", model=model, lora_set=s, method=method, rank=64, density=0.5, seed=0)[0]
    got = sample(call_node("LoraSetApply", model=model, lora_set=merged)[0], pos, neg)
    want = sample(call_node("LoraSetApply", model=model, lora_set=s)[0], pos, neg)
    assert close(got, want), (got - want).abs().max().item()
    assert "lora_unet_double_blocks_0_img_attn_qkv" in {k.rsplit(".", 2)[0] for k in merged.entries[0].tensors()}


# --- SD3 (MMDiT) ------------------------------------------------------------------------------------------------

S3 = 64 * SD3_TINY["depth"]
# diffusers module → (out, in): block 0's both streams (q/k/v slices of the fused qkv, output projections, MLPs)
# and block 1's image-stream q (its context stream is pre-only)
SD3_MODULES = {
    "transformer_blocks.0.attn.to_q": (S3, S3), "transformer_blocks.0.attn.to_k": (S3, S3),
    "transformer_blocks.0.attn.to_v": (S3, S3), "transformer_blocks.0.attn.add_q_proj": (S3, S3),
    "transformer_blocks.0.attn.add_v_proj": (S3, S3), "transformer_blocks.0.attn.to_out.0": (S3, S3),
    "transformer_blocks.0.attn.to_add_out": (S3, S3), "transformer_blocks.0.ff.net.0.proj": (4 * S3, S3),
    "transformer_blocks.0.ff_context.net.2": (S3, 4 * S3), "transformer_blocks.1.attn.to_q": (S3, S3),
}


def _sd3_file(path, style: str, seed: int) -> None:
    """A rank-2 LoRA on SD3_MODULES in ``style``: diffusers/PEFT (``transformer.`` + lora_A/B) or OneTrainer
    (``lora_transformer_`` + lora_down/up/alpha)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_features, in_features) in SD3_MODULES.items():
        down = torch.randn(2, in_features, generator=g) * 0.3
        up = torch.randn(out_features, 2, generator=g) * 0.3
        if style == "diffusers":
            tensors[f"transformer.{module}.lora_A.weight"], tensors[f"transformer.{module}.lora_B.weight"] = down, up
        else:
            name = "lora_transformer_" + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(1.5)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def sd3(env):
    model = build_sd3(seed=0)
    for style in ("diffusers", "onetrainer"):
        for i in range(2):
            _sd3_file(env.models_dir / "loras" / f"sd3_{style}_{i}.safetensors", style, 700 + 10 * i)
    g = torch.Generator().manual_seed(2)
    pos, neg = ([[torch.randn(1, 7, 48, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
                for _ in range(2))
    return model, pos, neg


@pytest.mark.parametrize("style", ["diffusers", "onetrainer"])
def test_sd3_lora_applies_like_core(env, sd3, style):
    model, pos, neg = sd3
    ours, core = applied_by_us_and_core(model, f"sd3_{style}_0.safetensors")
    assert len(ours.patches) == len(SD3_MODULES) - 3, "to_q/k/v and add_q/v patch one fused qkv weight per stream"
    assert any(p[3] is not None for plist in ours.patches.values() for p in plist), "slices of the fused qkv"
    assert ours.patches.keys() == core.patches.keys()
    got, want, base = sample(ours, pos, neg), sample(core, pos, neg), sample(model, pos, neg)
    assert torch.equal(got, want)
    assert not close(got, base, 1e-3), "the LoRA must change the output"


@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_sd3_composition_unmerged_equals_merged(env, sd3, node):
    model, pos, neg = sd3
    before = weights_snapshot(model.model)
    s = lora_set(["sd3_diffusers_0.safetensors", "sd3_onetrainer_1.safetensors"])
    merged, unmerged = (sample_node(node, model, s, pos, neg, strategy) for strategy in ("merged", "unmerged"))
    assert close(unmerged, merged), (unmerged - merged).abs().max().item()
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


def test_sd3_slice_loras_merge_into_whole_fused_weights(env, sd3):
    model, pos, neg = sd3
    s = lora_set(["sd3_diffusers_0.safetensors", "sd3_onetrainer_1.safetensors"])
    merged = call_node("LoraSetMerge", model=model, lora_set=s, method="concat", rank=64, density=0.5, seed=0)[0]
    got = sample(call_node("LoraSetApply", model=model, lora_set=merged)[0], pos, neg)
    want = sample(call_node("LoraSetApply", model=model, lora_set=s)[0], pos, neg)
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("method", ["linear", "concat"])
def test_sd3_swapped_modulation_loras_merge(env, sd3, method):
    """diffusers' norm_out.linear and the last block's norm1_context.linear map to whole weights with core's
    swap_scale_shift on ΔW (its shift and scale halves swapped): merging refused them as "a slice". Swapping the up
    factor's halves is the same ΔW; merged = the set applied (1e-5)."""
    model, pos, neg = sd3
    g = torch.Generator().manual_seed(44)
    modules = {"transformer.norm_out.linear": (2 * S3, S3), "transformer.transformer_blocks.1.norm1_context.linear":
               (2 * S3, S3), "transformer.transformer_blocks.0.attn.to_q": (S3, S3)}
    for i in range(2):
        save_file({f"{m}.{ab}.weight": torch.randn(*((2, shape[1]) if ab == "lora_A" else (shape[0], 2)),
                                                   generator=g) * 0.3
                   for m, shape in modules.items() for ab in ("lora_A", "lora_B")},
                  str(env.models_dir / "loras" / f"sd3_swap_{i}.safetensors"))
    s = lora_set(["sd3_swap_0.safetensors", "sd3_swap_1.safetensors"])
    merged = call_node("LoraSetMerge", model=model, lora_set=s, method=method, rank=64, density=0.5, seed=0)[0]
    got = patched_weights(call_node("LoraSetApply", model=model, lora_set=merged)[0])
    want = patched_weights(call_node("LoraSetApply", model=model, lora_set=s)[0])
    changed = [k for k in want if not torch.equal(want[k], model.model.state_dict()[k])]
    assert any("adaLN_modulation" in k for k in changed)
    assert all(close(got[k], want[k]) for k in changed)


WAN_NORM_Q = "diffusion_model.blocks.0.self_attn.norm_q"
WAN_LATENT = (1, 16, 2, 8, 8)  # batch, channels, frames, height, width


@pytest.fixture(scope="module")
def wan(env):
    """Two kohya LoRAs on every attention and FFN linear of the tiny Wan, the first also training the q-norm
    (LyCORIS ``w_norm`` on an RMSNorm); a third file adds a full ``diff`` on the Conv3d patch embedding."""
    model = build_wan(seed=0)
    sd = model.model.state_dict()
    targets = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2
               and any(part in k for part in (".self_attn.", ".cross_attn.", ".ffn."))]
    g = torch.Generator().manual_seed(9)
    for i in range(2):
        lora = lf.make_lora(sd, targets, "kohya", rank=2, alpha=1.0, seed=800 + i).amplified(8)
        if i == 0:
            lora.tensors[f"{WAN_NORM_Q}.w_norm"] = torch.randn(sd[f"{WAN_NORM_Q}.weight"].shape, generator=g) * 3
        lora.save(env.models_dir / "loras" / f"wan_{i}.safetensors")
    patch = lf.make_lora(sd, targets, "kohya", rank=2, alpha=1.0, seed=802).amplified(8)
    patch.tensors["diffusion_model.patch_embedding.diff"] = torch.randn(
        sd["diffusion_model.patch_embedding.weight"].shape, generator=g) * 0.2
    patch.save(env.models_dir / "loras" / "wan_patch.safetensors")
    pos, neg = ([[torch.randn(1, 16, 48, generator=g) * scale, {}]] for scale in (1.0, 0.5))
    return model, pos, neg


@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_video_dit_composition_unmerged_equals_merged(env, wan, node):
    """5-D video latents through every composition node: the hooks (linear layers and the RMSNorm's w_norm) equal
    core's merged weights; the LoRAs act; the base weights are untouched."""
    model, pos, neg = wan
    before = weights_snapshot(model.model)
    s = lora_set(["wan_0.safetensors", "wan_1.safetensors"])
    latent = torch.zeros(WAN_LATENT)
    merged, unmerged = (sample_node(node, model, s, pos, neg, strategy, latent) for strategy in ("merged", "unmerged"))
    assert close(unmerged, merged), (unmerged - merged).abs().max().item()
    assert not close(merged, sample(model, pos, neg, latent=latent), 1e-3), "the LoRAs must change the output"
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


def test_video_patch_embedding_lora_merges_instead(env, wan, caplog):
    """A LoRA on the Conv3d patch embedding has no hook path: Composite's auto (unmerged on a CPU) merges instead,
    naming the layer, and equals merged Composite."""
    import logging

    model, pos, neg = wan
    composite = env.engine("nodes.composition").composite_lora_set
    latent = torch.zeros(WAN_LATENT)
    outs, runtimes = {}, {}
    for strategy in ("auto", "merged"):
        patched, _clip, runtimes[strategy], _lines = composite(model, None, lora_set(["wan_patch.safetensors",
                                                                                       "wan_1.safetensors"]),
                                                               strategy=strategy)
        with caplog.at_level(logging.INFO, logger="LoRA Composer"):
            outs[strategy] = sample(patched, pos, neg, latent=latent)
    assert runtimes["auto"].strategies == ["merged"]
    assert any("patch_embedding" in r.getMessage() and "Conv3d" in r.getMessage() for r in caplog.records)
    assert torch.equal(outs["auto"], outs["merged"])


def test_video_dit_lora_applies_and_merges_like_core(env, wan):
    """LoraSetApply on the Wan = core's loading bit for bit (norm and Conv3d patches included); LoraSetMerge
    (concat, exact) of two files = both applied."""
    model, pos, neg = wan
    latent = torch.zeros(WAN_LATENT)
    ours, core = applied_by_us_and_core(model, "wan_patch.safetensors")
    assert ours.patches.keys() == core.patches.keys()
    assert torch.equal(sample(ours, pos, neg, latent=latent), sample(core, pos, neg, latent=latent))
    s = lora_set(["wan_0.safetensors", "wan_1.safetensors"])
    merged = call_node("LoraSetMerge", model=model, lora_set=s, method="concat", rank=64, density=0.5, seed=0)[0]
    got = sample(call_node("LoraSetApply", model=model, lora_set=merged)[0], pos, neg, latent=latent)
    want = sample(call_node("LoraSetApply", model=model, lora_set=s)[0], pos, neg, latent=latent)
    assert close(got, want), (got - want).abs().max().item()


def test_missing_block_message_shows_this_models_blocks(env, flux):
    """The hint named a UNet sub-block ('output_blocks.0.1') on every model; it is one of the model's own now."""
    model, _, _ = flux
    (s,) = call_node("LoraSetBlocks", lora_set=lora_set(["flux_kohya_0.safetensors"]), preset="all",
                     block_weights="double_blocks.9=1", apply_to="last entry")
    with pytest.raises(ValueError, match=r"double_blocks\.9 do not exist.*such as 'double_blocks\.0\.\w+', work too"):
        call_node("LoraSetApply", model=model, lora_set=s)
