"""Bad input gives a clear error that names the input and the file, and leaves the model untouched."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_unet, patched_weights, weights_snapshot


@pytest.fixture(scope="module")
def model():
    return build_unet("sd15", seed=31)


@pytest.fixture
def untouched(model):
    before = weights_snapshot(model.model)
    patches_before = dict(model.patches)
    yield
    after = model.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "base weights changed"
    assert dict(model.patches) == patches_before, "the input ModelPatcher gained patches"


def _loras(env):
    return env.models_dir / "loras"


def test_corrupt_file(env, model, untouched):
    (_loras(env) / "corrupt.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.safetensors: not a readable safetensors file"):
        call_node("LoraSetLoad", lora_name="corrupt.safetensors", strength_model=1.0, strength_clip=1.0)


def test_truncated_file(env, model, untouched):
    sd = model.model.state_dict()
    good = _loras(env) / "good_for_truncation.safetensors"
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=1).save(good)
    data = good.read_bytes()
    (_loras(env) / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"truncated\.safetensors: not a readable safetensors file, corrupt or truncated"):
        call_node("LoraSetLoad", lora_name="truncated.safetensors", strength_model=1.0, strength_clip=1.0)


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_pickle_files_are_refused_unread(env, model, untouched, suffix):
    path = _loras(env) / f"evil{suffix}"
    path.write_bytes(b"this would be unpickled by torch.load")
    with pytest.raises(ValueError, match="never loaded.*unpickling can run arbitrary code"):
        call_node("LoraSetLoad", lora_name=path.name, strength_model=1.0, strength_clip=1.0)


def test_lora_for_another_architecture(env, model, untouched):
    sdxl = build_unet("sdxl", seed=1, config_overrides={"context_dim": 2048})  # SDXL's text width: named by it
    xsd = sdxl.model.state_dict()
    targets = [k for k in xsd if (".input_blocks.7.1." in k or ".input_blocks.8.1." in k) and k.endswith("to_k.weight")]
    lf.make_lora(xsd, targets, "kohya", seed=2).save(_loras(env) / "made_for_sdxl.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="made_for_sdxl.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match=r"made_for_sdxl\.safetensors: .*none of its 4 modules match the connected SD15 model .*looks made for SDXL"):
        call_node("LoraSetApply", model=model, lora_set=s)


BROKEN_KEY = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # a [32, 32] weight in this model


@pytest.mark.parametrize("case, tensors, problem", [
    ("ranks", {"lora_down.weight": torch.ones(3, 32), "lora_up.weight": torch.ones(32, 4), "alpha": torch.tensor(2.)},
     "up 32×4 has 4 columns but down 3×32 has 3 rows"),
    ("rank0", {"lora_down.weight": torch.ones(0, 32), "lora_up.weight": torch.ones(32, 0), "alpha": torch.tensor(8.)},
     r"rank 0 \(up 32×0, down 0×32\)"),
    ("dora", {"lora_down.weight": torch.ones(4, 32), "lora_up.weight": torch.ones(32, 4), "alpha": torch.tensor(4.),
              "dora_scale": torch.ones(1, 17)}, "dora_scale 1×17 fits neither the weight's 32 outputs nor its 32 inputs"),
    ("loha", {"hada_w1_a": torch.ones(32, 2), "hada_w1_b": torch.ones(3, 32), "hada_w2_a": torch.ones(32, 2),
              "hada_w2_b": torch.ones(2, 32), "alpha": torch.tensor(2.)}, "hada_w1_a 32×2 and hada_w1_b 3×32 do not share"),
])
def test_internally_broken_modules_are_refused_by_name(env, model, untouched, case, tensors, problem):
    """Core's loader logs an error for such a layer and skips it (the rest applies), so our report said "1 weight
    patched" for a layer nothing changed, an svd merge wrote it as zeros and a rank-0 module with an alpha divided by
    zero while the model loaded. Now every node that resolves the file refuses it, naming file, layer and fault."""
    name = f"broken_{case}.safetensors"
    save_file({f"{BROKEN_KEY}.{k}": v for k, v in tensors.items()}, str(_loras(env) / name))
    (s,) = call_node("LoraSetLoad", lora_name=name, strength_model=1.0, strength_clip=1.0)
    message = rf"{name}: the module for diffusion_model\.input_blocks\.1\.1\..*attn1\.to_q\.weight is broken: {problem}"
    with pytest.raises(ValueError, match=message):
        call_node("LoraSetApply", model=model, lora_set=s)
    with pytest.raises(ValueError, match=message):
        call_node("LoraSetMerge", model=model, lora_set=s, method="svd", rank=4, density=0.5, seed=0)
    (info,) = call_node("LoraSetInfo", lora_set=s, model=model)
    assert "does not fit" in info and "is broken" in info


def test_same_names_other_shapes_are_refused(env, model, untouched):
    """A LoRA whose keys exist in the model but whose shapes do not (another model size)."""
    other = build_unet("sd15", seed=1, config_overrides={"model_channels": 64})
    osd = other.model.state_dict()
    lf.make_lora(osd, lf.pick_targets(osd), "kohya", seed=3).save(_loras(env) / "other_width.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="other_width.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match=r"other_width\.safetensors: \d+ of its layers do not fit"):
        call_node("LoraSetApply", model=model, lora_set=s)


def test_lora_for_the_base_model_on_its_inpainting_variant(env, model, untouched, caplog):
    """A LoCon trained on the base model, first conv included, on its inpainting variant (9 input channels): the
    first conv does not fit and is skipped, named in the report and the log; every other layer is patched exactly as
    core's loader patches it (which skips that layer too, logging an error). Before, the whole file was refused."""
    import logging

    import comfy.sd
    import comfy.utils

    from harness.tiny_models import patched_weights

    sd = model.model.state_dict()
    first = "diffusion_model.input_blocks.0.0.weight"
    lora = lf.make_lora(sd, [first] + lf.pick_targets(sd, ("attn",)), "kohya", rank=2, seed=6)
    lora.save(_loras(env) / "base_locon.safetensors")
    inpaint = build_unet("sd15", seed=0, config_overrides={"in_channels": 9})
    (s,) = call_node("LoraSetLoad", lora_name="base_locon.safetensors", strength_model=1.0, strength_clip=1.0)
    with caplog.at_level(logging.WARNING, logger="LoRA Composer"):
        ours, _clip, report = call_node("LoraSetApply", model=inpaint, lora_set=s)
    assert "1 layer(s) skipped" in report and first in report and "0 unmatched" in report
    assert any(first in r.getMessage() for r in caplog.records)
    path = str(_loras(env) / "base_locon.safetensors")
    core, _ = comfy.sd.load_lora_for_models(inpaint, None, comfy.utils.load_torch_file(path, safe_load=True), 1.0, 0)
    a, b = patched_weights(ours), patched_weights(core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a[first], inpaint.model.state_dict()[first])  # the first conv untouched
    assert sum(not torch.equal(a[k], inpaint.model.state_dict()[k]) for k in lora.expected) == len(lora.expected) - 1


def test_nan_tensors(env, model, untouched):
    sd = model.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=4)
    first = next(iter(lora.tensors))
    lora.tensors[first] = lora.tensors[first].clone()
    lora.tensors[first][0] = float("nan")
    lora.save(_loras(env) / "has_nan.safetensors")
    with pytest.raises(ValueError, match=r"has_nan\.safetensors: 1 tensor\(s\) contain NaN or Inf"):
        call_node("LoraSetLoad", lora_name="has_nan.safetensors", strength_model=1.0, strength_clip=1.0)


def test_nan_in_an_fp8_file(env, model, untouched):
    """fp8 tensors have no isfinite kernel on every build: the check upcasts them (exact) and still names the file."""
    sd = model.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=4)
    lora.tensors = {k: v if k.endswith(".alpha") else v.to(torch.float8_e4m3fn) for k, v in lora.tensors.items()}
    first = next(k for k in lora.tensors if not k.endswith(".alpha"))
    lora.tensors[first] = lora.tensors[first].float()
    lora.tensors[first][0] = float("nan")
    lora.tensors[first] = lora.tensors[first].to(torch.float8_e4m3fn)
    lora.save(_loras(env) / "fp8_has_nan.safetensors")
    with pytest.raises(ValueError, match=r"fp8_has_nan\.safetensors: 1 tensor\(s\) contain NaN or Inf"):
        call_node("LoraSetLoad", lora_name="fp8_has_nan.safetensors", strength_model=1.0, strength_clip=1.0)


def test_empty_file(env, model, untouched):
    save_file({}, str(_loras(env) / "empty.safetensors"))
    with pytest.raises(ValueError, match="holds no tensors"):
        call_node("LoraSetLoad", lora_name="empty.safetensors", strength_model=1.0, strength_clip=1.0)


def test_empty_set(env, model, untouched):
    pack_set = env.engine("nodes.lora_set")
    with pytest.raises(ValueError, match="lora_set is empty"):
        call_node("LoraSetApply", model=model, lora_set=pack_set.LoraSet())
    with pytest.raises(ValueError, match="lora_stack is empty"):
        call_node("LoraSetFromStack", lora_stack=[("None", 1.0, 1.0)])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 1e6])
def test_strength_out_of_range(env, model, untouched, value):
    sd = model.model.state_dict()
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=5).save(_loras(env) / "strength.safetensors")
    with pytest.raises(ValueError, match="strength_model must be a finite number"):
        call_node("LoraSetLoad", lora_name="strength.safetensors", strength_model=value, strength_clip=1.0)


def test_duplicate_entries(env, model, untouched):
    sd = model.model.state_dict()
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=6).save(_loras(env) / "dup.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="dup.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match=r"already contains 'dup\.safetensors'"):
        call_node("LoraSetLoad", lora_name="dup.safetensors", strength_model=0.5, strength_clip=1.0, lora_set=s)


def test_missing_file(env, model, untouched):
    with pytest.raises(Exception, match="not_there"):
        call_node("LoraSetLoad", lora_name="not_there.safetensors", strength_model=1.0, strength_clip=1.0)


def test_partly_unmatched_keys_are_reported(env, model, untouched):
    sd = model.model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=7)
    lora.tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(2, 4)
    lora.tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 2)
    lora.save(_loras(env) / "partly.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="partly.safetensors", strength_model=1.0, strength_clip=1.0)
    _, _, report = call_node("LoraSetApply", model=model, lora_set=s)
    assert "1 unmatched (lora_unet_no_such_layer)" in report


def test_a_bias_only_module_counts_as_matched(env, model, untouched):
    """A module whose only patch is its bias (``diff_b``) applied, but was reported unmatched (with a warning)."""
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"
    save_file({f"{key}.diff_b": torch.full((32,), 0.1)}, str(_loras(env) / "bias_only.safetensors"))
    (s,) = call_node("LoraSetLoad", lora_name="bias_only.safetensors", strength_model=1.0, strength_clip=1.0)
    patched, _, report = call_node("LoraSetApply", model=model, lora_set=s)
    assert "1 model + 0 CLIP weights patched from 1 modules; 0 unmatched" in report
    weights = patched_weights(patched)
    assert torch.equal(weights[f"{key}.bias"], model.model.state_dict()[f"{key}.bias"] + 0.1)


def test_a_lokr_of_the_wrong_size_does_not_fit(env, model, untouched):
    """kron(w1, w2) of 1152 values for a 32×32 weight: core logs an error and skips the layer; we said "patched"."""
    save_file({f"{BROKEN_KEY}.lokr_w1": torch.ones(4, 4), f"{BROKEN_KEY}.lokr_w2": torch.ones(8, 9),
               f"{BROKEN_KEY}.alpha": torch.tensor(1.0)}, str(_loras(env) / "lokr_size.safetensors"))
    (s,) = call_node("LoraSetLoad", lora_name="lokr_size.safetensors", strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match=r"lokr_size\.safetensors: 1 of its layers do not fit"):
        call_node("LoraSetApply", model=model, lora_set=s)
