"""LoraSetInfo summaries and LORA_STACK conversion."""
from __future__ import annotations

import json

import pytest

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_sd15_clip, build_unet


@pytest.fixture(scope="module")
def model():
    return build_unet("sd15", seed=41)


def test_info_describes_type_rank_base_and_triggers(env, model):
    sd = model.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd, ("attn", "conv3")), "kohya", rank=4, alpha=2.0, seed=1)
    lora.metadata = {"ss_tag_frequency": json.dumps({"10_sks": {"sks dog": 12, "grass": 3}}),
                     "ss_network_module": "networks.lora"}
    lora.save(env.models_dir / "loras" / "info_a.safetensors")
    lf.make_loha(sd, lf.pick_targets(sd, ("attn",)), seed=2).save(env.models_dir / "loras" / "info_b.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="info_a.safetensors", strength_model=0.8, strength_clip=1.0)
    (s,) = call_node("LoraSetLoad", lora_name="info_b.safetensors", strength_model=1.0, strength_clip=1.0, lora_set=s)
    (text,) = call_node("LoraSetInfo", lora_set=s)
    assert "info_a.safetensors (model 0.8, clip 1)" in text
    assert "LoCon×1" in text and "LoRA×" in text and "rank 4" in text and "alpha 2" in text
    assert "trigger words: sks dog, grass" in text and "kohya (sgm/ldm module names)" in text
    assert "LoHa×" in text
    (text,) = call_node("LoraSetInfo", lora_set=s, model=model, clip=build_sd15_clip())
    assert text.count("0 unmatched") == 2


@pytest.mark.parametrize("style, shown", [("blora", "B-LoRA (diffusers, doubled 'unet.unet.' prefix)"),
                                           ("peft_raw", "PEFT (base_model.model.*)")])
def test_info_names_the_files_own_key_style(env, model, style, shown):
    """Detected on the names as the file spells them: LoraSetInfo looked at them after the prefixes were rewritten
    and called both "diffusers"."""
    sd = model.model.state_dict()
    diffusers = lf.diffusers_paths(model)
    name = f"style_{style}.safetensors"
    lf.make_lora(sd, [k for k in lf.pick_targets(sd, ("attn",)) if k in diffusers], style, diffusers=diffusers,
                 seed=3).save(env.models_dir / "loras" / name)
    (s,) = call_node("LoraSetLoad", lora_name=name, strength_model=1.0, strength_clip=1.0)
    (text,) = call_node("LoraSetInfo", lora_set=s, model=model)
    assert f"key style {shown};" in text and "0 unmatched" in text


@pytest.mark.parametrize("key, style", [
    ("lora_unet_input_blocks_1_1_proj_in.lora_down.weight", "kohya (sgm/ldm module names)"),
    ("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", "kohya (diffusers module names)"),
    ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "kohya (DiT checkpoint module names)"),
    ("lora_unet_single_blocks_3_linear1.lora_down.weight", "kohya (DiT checkpoint module names)"),
    ("lora_unet_blocks_0_self_attn_q.lora_down.weight", "kohya (DiT checkpoint module names)"),  # musubi-tuner Wan
    ("lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight", "kohya (DiT checkpoint module names)"),
    ("lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight", "kohya (diffusers transformer names)"),
    ("lycoris_down_blocks_0_attentions_0_proj_in.lora_down.weight", "LyCORIS / SimpleTuner (lycoris_*)"),
    ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "diffusers/PEFT (lora_A/lora_B)"),
    ("diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight", "ComfyUI generic (diffusion_model.*)"),
])
def test_key_style_names_dit_files(env, key, style):
    """The key style LoraSetInfo reports: kohya Flux / SD3 files were called "diffusers module names" before."""
    assert env.engine("nodes.lora_format").detect_key_style([key]) == style


@pytest.mark.parametrize("key, metadata, base", [
    ("lora_unet_down_blocks_0_resnets_0_conv1", {}, "an SD UNet (SD1.x, SD2.x or SDXL: its layers do not tell which)"),
    # attention where only one layout has it: SD1.5's input_blocks 7 / 8 hold attention too (saved SD1.5 merges were
    # called SDXL by them); SDXL's transformer depth > 1, its output_blocks 0-2 attention, SD1.x's input_blocks 1-2
    ("lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q", {},
     "an SD UNet (SD1.x, SD2.x or SDXL: its layers do not tell which)"),
    ("lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q", {"ss_base_model_version": "sd_v1"},
     "SD1.x (from its metadata)"),
    ("lora_unet_input_blocks_7_1_transformer_blocks_4_attn1_to_q", {}, "SDXL"),
    ("lora_unet_output_blocks_1_1_proj_in", {}, "SDXL"),
    ("lora_unet_output_blocks_2_1_conv", {}, "an SD UNet (SD1.x, SD2.x or SDXL: its layers do not tell which)"),
    ("lora_unet_input_blocks_1_1_proj_in", {}, "SD1.x/SD2.x (UNet)"),
    ("transformer.transformer_blocks.1.attn.to_q", {}, "unknown"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", {"ss_base_model_version": "sdxl_base_v1-0"}, "SDXL (from its metadata)"),
    ("lora_unet_down_blocks_0_resnets_0_conv1", {"modelspec.architecture": "stable-diffusion-v1/lora"},
     "SD1.x (from its metadata)"),
    ("some_module", {"modelspec.architecture": "flux-1-dev/lora"}, "Flux (from its metadata)"),
    ("lora_unet_double_blocks_0_img_attn_qkv", {"ss_base_model_version": "sdxl_base_v1-0"}, "Flux"),  # keys win
    ("some_module", {"ss_base_model_version": "something_new"}, "unknown"),
    # video and newer DiTs by their own module names (kohya and ComfyUI forms); Flux's own names stay Flux
    ("lora_unet_blocks_0_self_attn_q", {}, "Wan"),
    ("diffusion_model.blocks.3.cross_attn.o", {}, "Wan"),
    ("diffusion_model.double_blocks.0.img_attn_qkv", {}, "HunyuanVideo"),
    ("lora_unet_double_blocks_0_img_mlp_fc1", {}, "HunyuanVideo"),
    ("lora_unet_double_blocks_0_img_mlp_0", {}, "Flux"),
    ("diffusion_model.double_blocks.0.img_attn.qkv", {}, "Flux"),
    ("transformer.transformer_blocks.0.img_mlp.net.0.proj", {}, "Qwen-Image"),
    ("diffusion_model.double_stream_blocks.0.block.attn1.to_q", {}, "HiDream"),
    ("diffusion_model.noise_refiner.0.attention.qkv", {}, "Lumina 2"),
    ("diffusion_model.distilled_guidance_layer.layers.0.in_layer", {}, "Chroma (Flux-based)"),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", {}, "SD1.x/SD2.x (UNet)"),
])
def test_base_model_guess_uses_metadata_where_keys_leave_it_open(env, key, metadata, base):
    """Keys say what a file physically fits; a file without cross-attention layers (or with unknown keys) is named by
    its ModelSpec / sd-scripts metadata instead, marked as such (LoraSetInfo and the wrong-base-model error)."""
    import torch

    tensors = {f"{key}.lora_down.weight": torch.zeros(2, 4), f"{key}.lora_up.weight": torch.zeros(4, 2)}
    assert env.engine("nodes.lora_format").guess_base_model(tensors, metadata) == base


@pytest.mark.parametrize("width, base", [(768, "SD1.x"), (1024, "SD2.x"), (2048, "SDXL")])
def test_base_model_guess_reads_the_text_width_first(env, width, base):
    """An SD1.5 LoRA with sgm names on input_blocks 7 / 8 (what LoraSetSave writes) is SD1.x by its width."""
    import torch

    key = "lora_unet_input_blocks_7_1_transformer_blocks_0_attn2_to_k"
    tensors = {f"{key}.lora_down.weight": torch.zeros(2, width), f"{key}.lora_up.weight": torch.zeros(640, 2)}
    assert env.engine("nodes.lora_format").guess_base_model(tensors, {}) == base


@pytest.mark.parametrize("prefix, width, base", [
    ("transformer.transformer_blocks.0.attn", 1536, "SD3"), ("transformer.transformer_blocks.0.attn", 2432, "SD3"),
    ("transformer.transformer_blocks.0.attn", 3072, "Flux (or Qwen-Image: as wide)"),
    ("lora_transformer_transformer_blocks_0_attn", 1536, "SD3"),
    ("transformer.transformer_blocks.0.attn", 128, "Flux or SD3 (diffusers joint-attention blocks; width does not tell)"),
])
def test_diffusers_joint_attention_files_are_named_by_width(env, prefix, width, base):
    """diffusers SD3 files and Flux files without single blocks share the joint-attention names (add_q_proj …): they
    were "unknown" (a check needed a 'context_block' no diffusers name has)."""
    import torch

    sep = "." if prefix.startswith("transformer.") else "_"
    tensors = {f"{prefix}{sep}{m}.lora_A.weight": torch.zeros(2, width) for m in ("to_q", "add_q_proj")}
    tensors.update({f"{prefix}{sep}{m}.lora_B.weight": torch.zeros(width, 2) for m in ("to_q", "add_q_proj")})
    assert env.engine("nodes.lora_format").guess_base_model(tensors, {}) == base


def test_stack_round_trip(env, model):
    sd = model.model.state_dict()
    for i in range(2):
        lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=10 + i).save(env.models_dir / "loras" / f"stk_{i}.safetensors")
    stack = [("stk_0.safetensors", 0.7, 0.2), ("None", 1.0, 1.0), ("stk_1.safetensors", -0.3, 1.0)]
    (s,) = call_node("LoraSetFromStack", lora_stack=stack)
    assert [(e.name, e.strength_model, e.strength_clip) for e in s] == [
        ("stk_0.safetensors", 0.7, 0.2), ("stk_1.safetensors", -0.3, 1.0)]
    (back,) = call_node("LoraSetToStack", lora_set=s)
    assert back == [("stk_0.safetensors", 0.7, 0.2), ("stk_1.safetensors", -0.3, 1.0)]


def test_stack_rejects_malformed_items(env, model):
    with pytest.raises(ValueError, match="lora_stack item 0"):
        call_node("LoraSetFromStack", lora_stack=[("only-a-name",)])
    sd = model.model.state_dict()
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=12).save(env.models_dir / "loras" / "stk_n.safetensors")
    with pytest.raises(ValueError, match=r"lora_stack item 1 \('stk_n.safetensors'\): strength_model must be a "
                                         r"number, got None"):  # was a bare TypeError from float(None)
        call_node("LoraSetFromStack", lora_stack=[("None", 1.0, 1.0), ("stk_n.safetensors", None, 1.0)])


def test_block_rules_that_change_nothing_convert_and_save(env, model):
    """'*=1' (or the 'all' preset) leaves the LoRA as it is: LoraSetToStack and LoraSetSave refused it as "block
    weights a stack / file cannot carry" by its label."""
    sd = model.model.state_dict()
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=14).save(env.models_dir / "loras" / "stk_one.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="stk_one.safetensors", strength_model=1.0, strength_clip=1.0)
    (ones,) = call_node("LoraSetBlocks", lora_set=s, preset="all", block_weights="*=1, input_blocks=1",
                        apply_to="last entry")
    assert call_node("LoraSetToStack", lora_set=ones)[0] == [("stk_one.safetensors", 1.0, 1.0)]
    merged, _ = call_node("LoraSetMerge", model=model, lora_set=s, method="linear", rank=4, density=0.5, seed=0)
    (merged_ones,) = call_node("LoraSetBlocks", lora_set=merged, preset="all", block_weights="*=1",
                               apply_to="last entry")
    (name,) = call_node("LoraSetSave", lora_set=merged_ones, filename_prefix="tests/ones", dtype="fp32")
    assert name.endswith(".safetensors")
    (halved,) = call_node("LoraSetBlocks", lora_set=s, preset="all", block_weights="*=0.5", apply_to="last entry")
    with pytest.raises(ValueError, match="cannot carry them"):
        call_node("LoraSetToStack", lora_set=halved)


def test_to_stack_refuses_in_memory_and_block_weighted_entries(env, model):
    sd = model.model.state_dict()
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=13).save(env.models_dir / "loras" / "stk_b.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="stk_b.safetensors", strength_model=1.0, strength_clip=1.0)
    (blocked,) = call_node("LoraSetBlocks", lora_set=s, preset="input", block_weights="", apply_to="last entry")
    with pytest.raises(ValueError, match="cannot carry them"):
        call_node("LoraSetToStack", lora_set=blocked)
    merged, _ = call_node("LoraSetMerge", model=model, lora_set=s, method="linear", rank=4, density=0.5, seed=0)
    with pytest.raises(ValueError, match="lives in memory"):
        call_node("LoraSetToStack", lora_set=merged)


def test_load_reruns_when_the_file_changes(env, model):
    """ComfyUI serves a node's cached output while its inputs are unchanged: a LoRA rewritten under the same name
    (a new training checkpoint) was served stale — core's LoraLoader has the same gap. IS_CHANGED follows the file."""
    import os

    import nodes

    sd = model.model.state_dict()
    path = env.models_dir / "loras" / "rewritten.safetensors"
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=15).save(path)
    cls = nodes.NODE_CLASS_MAPPINGS["LoraSetLoad"]
    first = cls.IS_CHANGED(lora_name="rewritten.safetensors", strength_model=1.0, strength_clip=1.0)
    assert first and first == cls.IS_CHANGED(lora_name="rewritten.safetensors", strength_model=0.5, strength_clip=1.0)
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=16).save(path)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # coarse file-system clocks: a surely new time
    assert cls.IS_CHANGED(lora_name="rewritten.safetensors") != first
    assert cls.IS_CHANGED(lora_name="not_there.safetensors") == ""
