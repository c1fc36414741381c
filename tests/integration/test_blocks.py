"""Block presets and per-block weights, by block name; B-LoRA content/style on an SDXL-shaped UNet."""
from __future__ import annotations

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_unet, patched_weights


@pytest.fixture(scope="module")
def sdxl():
    return build_unet("sdxl", seed=11)


def _blora_file(env, model, name="blora.safetensors"):
    """A B-LoRA author-style file (doubled 'unet.unet.' prefix, no alpha) over all attention layers."""
    sd = model.model.state_dict()
    targets = [k for k in sd if ".transformer_blocks." in k and any(
        p in k for p in (".to_q.", ".to_k.", ".to_v.", ".to_out.0.")) and k.endswith(".weight")]
    lora = lf.make_lora(sd, targets, "blora", rank=2, diffusers=lf.diffusers_paths(model), seed=12)
    lora.save(env.models_dir / "loras" / name)
    return lora


def _changed(model, patched):
    sd = model.model.state_dict()
    return {k for k in sd if not torch.equal(sd[k], patched[k])}


@pytest.mark.parametrize("preset, prefixes", [
    ("B-LoRA content (SDXL output_blocks.0.1)", ["output_blocks.0.1."]),
    ("B-LoRA style (SDXL output_blocks.1.1)", ["output_blocks.1.1."]),
    ("B-LoRA content+style", ["output_blocks.0.1.", "output_blocks.1.1."]),
    ("input", ["input_blocks."]),
    ("middle", ["middle_block."]),
])
def test_presets_patch_only_their_blocks(env, sdxl, preset, prefixes):
    lora = _blora_file(env, sdxl)
    (s,) = call_node("LoraSetLoad", lora_name="blora.safetensors", strength_model=1.0, strength_clip=1.0)
    (s,) = call_node("LoraSetBlocks", lora_set=s, preset=preset, block_weights="", apply_to="last entry")
    m, _, report = call_node("LoraSetApply", model=sdxl, lora_set=s)
    assert "0 unmatched" in report
    changed = _changed(sdxl, patched_weights(m))
    expected = {k for k in lora.expected if any(k.startswith("diffusion_model." + p) for p in prefixes)}
    assert expected and changed == expected


def test_custom_weights_scale_blocks(env, sdxl):
    lora = _blora_file(env, sdxl)
    (s,) = call_node("LoraSetLoad", lora_name="blora.safetensors", strength_model=1.0, strength_clip=1.0)
    (s,) = call_node("LoraSetBlocks", lora_set=s, preset="all",
                     block_weights="output_blocks.0.1=0.5\ninput_blocks=0, output_blocks.0.1.transformer_blocks.0.attn1=2",
                     apply_to="all entries")
    m, _, _ = call_node("LoraSetApply", model=sdxl, lora_set=s)
    w, base = patched_weights(m), sdxl.model.state_dict()
    for key, delta in lora.expected.items():
        path = key[len("diffusion_model."):]
        want = (2.0 if path.startswith("output_blocks.0.1.transformer_blocks.0.attn1.") else
                0.5 if path.startswith("output_blocks.0.1.") else 0.0 if path.startswith("input_blocks.") else 1.0)
        got = w[key] - base[key]
        assert torch.allclose(got, want * delta, rtol=1e-5, atol=1e-7), key


def test_unknown_block_names_the_models_blocks(env, sdxl):
    _blora_file(env, sdxl)
    (s,) = call_node("LoraSetLoad", lora_name="blora.safetensors", strength_model=1.0, strength_clip=1.0)
    (s,) = call_node("LoraSetBlocks", lora_set=s, preset="all", block_weights="output_blocks.42=1", apply_to="last entry")
    with pytest.raises(ValueError, match=r"output_blocks\.42 do not exist.*middle_block"):
        call_node("LoraSetApply", model=sdxl, lora_set=s)


def test_bad_rule_syntax(env, sdxl):
    _blora_file(env, sdxl)
    (s,) = call_node("LoraSetLoad", lora_name="blora.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match="block_weights: cannot read"):
        call_node("LoraSetBlocks", lora_set=s, preset="all", block_weights="output_blocks.0.1 = heavy",
                  apply_to="last entry")


@pytest.mark.parametrize("rules", ["input_blocks=1e400", "*=1e400", "*=5000", "output_blocks.0.1=1, *=-101"])
def test_out_of_range_block_weights_are_refused(env, sdxl, rules):
    """The '*' default was not checked like the rules: '*=1e400' patched inf into every other block."""
    _blora_file(env, sdxl)
    (s,) = call_node("LoraSetLoad", lora_name="blora.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match=r"block_weights must be a finite number in \[-100, 100\]"):
        call_node("LoraSetBlocks", lora_set=s, preset="all", block_weights=rules, apply_to="last entry")


def test_blocks_apply_to_last_entry_only(env, sdxl):
    """B-LoRA recipe: content from one LoRA, style from another."""
    a = _blora_file(env, sdxl, "content.safetensors")
    _blora_file(env, sdxl, "style.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="content.safetensors", strength_model=1.0, strength_clip=1.0)
    (s,) = call_node("LoraSetBlocks", lora_set=s, preset="B-LoRA content (SDXL output_blocks.0.1)", block_weights="",
                     apply_to="last entry")
    (s,) = call_node("LoraSetLoad", lora_name="style.safetensors", strength_model=1.0, strength_clip=1.0, lora_set=s)
    (s,) = call_node("LoraSetBlocks", lora_set=s, preset="B-LoRA style (SDXL output_blocks.1.1)", block_weights="",
                     apply_to="last entry")
    assert [e.blocks.label for e in s] == ["B-LoRA content", "B-LoRA style"]
    m, _, _ = call_node("LoraSetApply", model=sdxl, lora_set=s)
    changed = _changed(sdxl, patched_weights(m))
    assert changed == {k for k in a.expected if ".output_blocks.0.1." in k or ".output_blocks.1.1." in k}
