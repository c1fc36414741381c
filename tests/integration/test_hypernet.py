"""Hypernet → LoRA in real ComfyUI: file format, loading, generation, end to end, bad input.

The image features come from ComfyUI's own ``CLIPVisionEncode`` on a tiny CLIP-vision model built
in memory; generated LoRAs are checked against core's ``LoraLoaderModelOnly`` on the saved file.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import folder_paths
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from harness import hypernet_synthetic as hs
from harness.node_calls import call_node
from harness.tiny_models import build_unet, patched_weights, weights_snapshot


@pytest.fixture(scope="module")
def hn(env):
    folder = env.models_dir / "lora_hypernets"
    folder_paths.add_model_folder_path("lora_hypernets", str(folder), is_default=True)
    return SimpleNamespace(folder=folder, lidb=env.engine("nodes.hypernet.lidb"),
                           ff=env.engine("nodes.hypernet.file_format"), net=env.engine("nodes.hypernet.network"),
                           gen=env.engine("nodes.hypernet.generate"), ui=env.engine("nodes.ui.hypernet"),
                           lora_set=env.engine("nodes.lora_set"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hypernet")
    return SimpleNamespace(tmp=tmp, clip_vision=hs.build_clip_vision(tmp, seed=0), model=build_unet("sd15", seed=11))


def _random_hypernet(hn, model, variant="image", seed=3, head_std=0.3):
    """An untrained but non-trivial hypernet (large heads, so the generated LoRA visibly changes outputs)."""
    spec = hn.lidb.lidb_spec_for_model(model, down_dim=16, up_dim=8, base_seed=seed)
    config = hn.net.HypernetConfig(variant=variant, feature_dim=32, model_dim=32, num_blocks=1, num_heads=1,
                                   iterations=4, base_model="SD15")
    network = hn.net.LidbHypernet(config, spec, seed=seed)
    with torch.no_grad():
        network.head_weight.normal_(0.0, head_std, generator=torch.Generator().manual_seed(seed))
    return network.eval().requires_grad_(False)


def _encode(world, theta=(0.3, -0.5), image=None):
    image = hs.draw_subject(theta) if image is None else image
    return call_node("CLIPVisionEncode", clip_vision=world.clip_vision, image=image, crop="center")[0]


@pytest.fixture(scope="module")
def saved(hn, world):
    network = _random_hypernet(hn, world.model)
    path = hn.folder / "random_image.safetensors"
    hn.ff.save_hypernet(str(path), network, training={"step": 0})
    return SimpleNamespace(network=network, path=path, name="random_image.safetensors")


def _delta(entry, key, lidb):
    t = entry.tensors()
    prefix = lidb.kohya_prefix(key)
    return t[f"{prefix}.lora_up.weight"] @ t[f"{prefix}.lora_down.weight"]


def test_folder_registered_without_clobbering(hn, env):
    name = "lora_hypernets"
    paths, extensions = folder_paths.folder_names_and_paths[name]
    assert ".safetensors" in extensions and paths[0] == str(hn.folder)
    saved = folder_paths.folder_names_and_paths[name]
    try:
        folder_paths.folder_names_and_paths[name] = (["/user/hypernets"], {".st"})
        hn.ui.register_hypernet_folder()
        user_paths, user_ext = folder_paths.folder_names_and_paths[name]
        assert user_paths[0] == "/user/hypernets" and len(user_paths) == 2 and user_ext == {".st", ".safetensors"}
        folder_paths.folder_names_and_paths[name] = (["/user/any"], set())  # empty set = every extension
        hn.ui.register_hypernet_folder()
        assert folder_paths.folder_names_and_paths[name][1] == set()
    finally:
        folder_paths.folder_names_and_paths[name] = saved


def test_file_format_metadata_is_documented_json(hn, saved):
    with safe_open(str(saved.path), framework="pt") as f:
        meta, keys = f.metadata(), list(f.keys())
    assert meta["lora_hypernet_format"] == "lora_composer/lora_hypernet" and meta["lora_hypernet_version"] == "1"
    config = json.loads(meta["lora_hypernet_config"])
    lidb = json.loads(meta["lora_hypernet_lidb"])
    assert config == saved.network.config.to_json() and config["base_model"] == "SD15"
    assert lidb["init_law"] == "xavier_normal" and len(lidb["layers"]) == 56
    assert lidb["layers"][0] == [saved.network.spec.layers[0].key, 32, 32, saved.network.spec.layers[0].seed]
    assert lidb["aux_fingerprint"] == hn.lidb.aux_fingerprint(saved.network.spec)
    assert all(k.startswith("net.") for k in keys) and "net.output_scale" in keys


def test_saved_hypernet_reloads_to_identical_outputs(hn, world, saved):
    hypernet, info = call_node("LoraHypernetLoad", hypernet_name=saved.name)
    assert "56 LiDB layers" in info and "image hypernet for SD15" in info and hypernet.aux_matches
    for k, v in saved.network.state_dict().items():
        assert torch.equal(hypernet.network.state_dict()[k], v), k
    out = _encode(world)
    (loaded_set,) = call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=out, strength_model=1.0,
                              strength_clip=1.0)
    in_memory = hn.ff.LoraHypernet("random_image", saved.network.config, saved.network.spec, saved.network)
    direct = hn.gen.generate_from_image(in_memory, out)
    a, b = loaded_set.entries[0].tensors(), direct.entries[0].tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded_set.entries[0].name.startswith("random_image-image-")


def test_generated_entries_chain_and_are_named_after_the_input(hn, world, saved):
    hypernet, _ = call_node("LoraHypernetLoad", hypernet_name=saved.name)
    (one,) = call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=_encode(world, (0.3, 0.1)),
                       strength_model=0.5, strength_clip=1.0)
    (two,) = call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=_encode(world, (-0.6, 0.4)),
                       strength_model=1.0, strength_clip=1.0, lora_set=one)
    assert len(two) == 2 and two.entries[0].name != two.entries[1].name
    assert two.entries[0].strength_model == 0.5
    key = saved.network.spec.layers[0].key
    assert not torch.allclose(_delta(two.entries[0], key, hn.lidb), _delta(two.entries[1], key, hn.lidb))


def _sample(model, seed=5):
    import comfy.sample

    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 77, 64, generator=g), {}]]
    neg = [[torch.zeros(1, 77, 64), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 4, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)


def test_end_to_end_clip_vision_generate_apply_sample_equals_core(env, hn, world, saved):
    """CLIPVisionEncode → Generate → Apply → sample; Save → core LoraLoaderModelOnly → the same sample."""
    model = world.model
    hypernet, _ = call_node("LoraHypernetLoad", hypernet_name=saved.name)
    out = _encode(world, (0.7, 0.2))
    (lora_set,) = call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=out, strength_model=1.0,
                            strength_clip=1.0, model=model)
    ours_model, _, report = call_node("LoraSetApply", model=model, lora_set=lora_set)
    assert "56 model + 0 CLIP weights patched" in report and "0 unmatched" in report
    (name,) = call_node("LoraSetSave", lora_set=lora_set, filename_prefix="hypernet/e2e", dtype="fp32")
    (core_model,) = call_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)
    base = _sample(model)
    ours = _sample(ours_model)
    core = _sample(core_model)
    assert torch.allclose(ours, core, rtol=1e-5, atol=1e-5)
    assert (ours - base).abs().max() > 1e-2, "the generated LoRA should change the sample"
    entry = lora_set.entries[0]
    factors = hn.gen.generate_factors(hypernet, hn.gen.image_tokens(hypernet, out))
    weights, sd = patched_weights(core_model), model.model.state_dict()
    for key, (up, down) in list(factors.items())[:8]:
        assert torch.allclose(weights[key] - sd[key], up @ down, atol=1e-6)
        assert torch.equal(_delta(entry, key, hn.lidb), up @ down)


@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance"])
def test_generated_loras_compose_in_every_strategy(env, hn, world, saved, node):
    """Two LoRAs generated from two images (in-memory tensors, no file) through the composition nodes: merged (core
    patching math) and unmerged (the hooks, factors staged from memory) agree; base weights bit-identical after.
    Strengths 0.03 / 0.02: this untrained hypernet's heads make ΔW ≈ 550 × W at strength 1, where the two forms'
    float rounding (x·(W + ΔW) against x·W + (x·A)·B) differs by 1e-5 in one forward and 4 steps at cfg 5 amplify it
    to 2 %; at 0.03 they agree to 5e-7 (measured)."""
    model = world.model
    before = weights_snapshot(model.model)
    hypernet, _ = call_node("LoraHypernetLoad", hypernet_name=saved.name)
    (one,) = call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=_encode(world, (0.3, 0.1)),
                       strength_model=0.03, strength_clip=1.0)
    (two,) = call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=_encode(world, (-0.6, 0.4)),
                       strength_model=0.02, strength_clip=1.0, lora_set=one)
    inputs = {"LoraSetSwitch": {"switch_every": 1, "schedule": "paper"}, "AutoLoraGuidance": {"gamma": 0.6}}
    out = {strategy: _sample(call_node(node, model=model, lora_set=two, strategy=strategy,
                                       **inputs.get(node, {}))[0])
           for strategy in ("merged", "unmerged")}
    assert float((out["unmerged"] - out["merged"]).norm() / out["merged"].norm()) < 1e-5
    assert (out["merged"] - _sample(model)).abs().max() > 1e-2, "the generated LoRAs should change the sample"
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


def test_pair_generation_and_reverse_at_minus_one(hn, world):
    network = _random_hypernet(hn, world.model, variant="pair", seed=4)
    hypernet = hn.ff.LoraHypernet("pair", network.config, network.spec, network)
    img = hs.draw_subject((0.1, 0.2))
    before, after = _encode(world, image=img), _encode(world, image=hs.edit_image(img, 1))
    (edit,) = call_node("LoraHypernetGeneratePair", hypernet=hypernet, before=before, after=after,
                        strength_model=-1.0, strength_clip=1.0)
    assert edit.entries[0].strength_model == -1.0 and "-edit-" in edit.entries[0].name
    reverse_model, _, _ = call_node("LoraSetApply", model=world.model, lora_set=edit)
    key = network.spec.layers[3].key
    w, sd = patched_weights(reverse_model), world.model.model.state_dict()
    assert torch.allclose(w[key] - sd[key], -_delta(edit.entries[0], key, hn.lidb), atol=1e-6)
    with pytest.raises(ValueError, match="single-image"):
        call_node("LoraHypernetGeneratePair", hypernet=hn.ff.LoraHypernet("img", *_parts(hn, world)), before=before,
                  after=after, strength_model=1.0, strength_clip=1.0)
    with pytest.raises(ValueError, match="before/after"):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=before, strength_model=1.0,
                  strength_clip=1.0)


def _parts(hn, world):
    network = _random_hypernet(hn, world.model)
    return network.config, network.spec, network


# ----------------------------------------------------------------------------------------------- bad input

def _write_hypernet(hn, saved, name, *, meta=None, drop_meta=(), tensors=None):
    with safe_open(str(saved.path), framework="pt") as f:
        metadata = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    metadata.update(meta or {})
    for k in drop_meta:
        metadata.pop(k)
    if tensors is not None:
        data = tensors(data)
    path = hn.folder / name
    save_file(data, str(path), metadata=metadata)
    return name


@pytest.mark.parametrize("case, match", [
    ("pickle", "pickle-based files"),
    ("garbage", "not a readable safetensors"),
    ("lora", "not a LoRA Composer hypernet.*looks like a LoRA"),
    ("version", "format version '7' is not supported"),
    ("json", "not valid JSON"),
    ("variant", "variant must be one of"),
    ("missing_lidb", "'lora_hypernet_lidb' is missing"),
    ("shapes", "do not match the network its metadata describes"),
    ("unknown_tensor", "unexpected tensors"),
    ("nan", "NaN or Inf"),
])
def test_bad_hypernet_files_are_refused(hn, saved, case, match):
    name = f"bad_{case}.safetensors"
    if case == "pickle":
        name = "bad.pt"
        (hn.folder / name).write_bytes(b"\x80\x04K\x01.")  # a pickle; it must never be unpickled
    elif case == "garbage":
        (hn.folder / name).write_bytes(b"definitely not safetensors")
    elif case == "lora":
        save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 1)}, str(hn.folder / name),
                  metadata={"ss_network_module": "networks.lora"})
    elif case == "version":
        _write_hypernet(hn, saved, name, meta={"lora_hypernet_version": "7"})
    elif case == "json":
        _write_hypernet(hn, saved, name, meta={"lora_hypernet_config": "{not json"})
    elif case == "variant":
        config = dict(saved.network.config.to_json(), variant="video")
        _write_hypernet(hn, saved, name, meta={"lora_hypernet_config": json.dumps(config)})
    elif case == "missing_lidb":
        _write_hypernet(hn, saved, name, drop_meta=("lora_hypernet_lidb",))
    elif case == "shapes":
        config = dict(saved.network.config.to_json(), model_dim=64, num_heads=1)
        _write_hypernet(hn, saved, name, meta={"lora_hypernet_config": json.dumps(config)})
    elif case == "unknown_tensor":
        _write_hypernet(hn, saved, name, tensors=lambda d: {**d, "extra.weight": torch.zeros(1)})
    elif case == "nan":
        _write_hypernet(hn, saved, name, tensors=lambda d: {**d, "net.head_bias": torch.full_like(d["net.head_bias"],
                                                                                                 float("nan"))})
    with pytest.raises(ValueError, match=match):
        call_node("LoraHypernetLoad", hypernet_name=name)


def test_hypernet_for_another_base_model_or_layer_set(hn, world, saved):
    hypernet, _ = call_node("LoraHypernetLoad", hypernet_name=saved.name)
    out = _encode(world)
    sdxl = build_unet("sdxl", seed=2)
    with pytest.raises(ValueError, match="trained for SD15 models; the connected model is SDXL"):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=out, strength_model=1.0,
                  strength_clip=1.0, model=sdxl)
    fewer = build_unet("sd15", seed=2, config_overrides={"transformer_depth": [0, 1],
                                                          "transformer_depth_output": [0, 0, 1, 1]})
    with pytest.raises(ValueError, match=r"target layers are missing: diffusion_model\.input_blocks\.1\.1\."):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=out, strength_model=1.0,
                  strength_clip=1.0, model=fewer)
    narrow = build_unet("sd15", seed=2, config_overrides={"context_dim": 32})
    with pytest.raises(ValueError, match=r"have other shapes: .*attn2\.to_k\.weight is \(32, 32\)"):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=out, strength_model=1.0,
                  strength_clip=1.0, model=narrow)


def test_wrong_features_are_refused(hn, world, saved):
    hypernet, _ = call_node("LoraHypernetLoad", hypernet_name=saved.name)
    wide = hs.build_clip_vision(world.tmp, seed=1, hidden_size=48)
    out = call_node("CLIPVisionEncode", clip_vision=wide, image=hs.draw_subject((0, 0)), crop="center")[0]
    with pytest.raises(ValueError, match="dimension 48, but random_image was trained on dimension 32"):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=out, strength_model=1.0,
                  strength_clip=1.0)
    out = _encode(world)
    broken = type(out)()
    broken["last_hidden_state"] = torch.full_like(out["last_hidden_state"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output=broken, strength_model=1.0,
                  strength_clip=1.0)
    with pytest.raises(ValueError, match="no 'last_hidden_state' tokens"):
        call_node("LoraHypernetGenerate", hypernet=hypernet, clip_vision_output={"image_embeds": torch.zeros(1, 16)},
                  strength_model=1.0, strength_clip=1.0)
