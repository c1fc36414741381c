"""LoraSetApply equals a chain of ComfyUI's own LoraLoader nodes, bit for bit, and leaks nothing."""
from __future__ import annotations

import torch

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_sd15_clip, build_unet, patched_weights, weights_snapshot


def _write_three(env, model, clip):
    sd, csd = model.model.state_dict(), clip.cond_stage_model.state_dict()
    files = []
    for i, (style, kinds) in enumerate([("kohya", ("attn", "proj")), ("diffusers_attnproc", ("attn", "ff")),
                                        ("kohya", ("conv3", "attn"))]):
        lora = lf.make_lora(sd, lf.pick_targets(sd, kinds), style, rank=2 + i, diffusers=lf.diffusers_paths(model),
                            seed=20 + i)
        lora.tensors.update(lf.make_te_lora(csd, seed=30 + i).tensors)
        path = env.models_dir / "loras" / f"chain_{i}.safetensors"
        lora.save(path)
        files.append(path.name)
    return files


STRENGTHS = [(0.8, 1.0), (-0.4, 0.3), (1.3, 0.0)]


def _ours(model, clip, files):
    lora_set = None
    for name, (sm, sc) in zip(files, STRENGTHS):
        (lora_set,) = call_node("LoraSetLoad", lora_name=name, strength_model=sm, strength_clip=sc, lora_set=lora_set)
    m, c, _ = call_node("LoraSetApply", model=model, lora_set=lora_set, clip=clip)
    return m, c


def _core(model, clip, files):
    for name, (sm, sc) in zip(files, STRENGTHS):
        model, clip = call_node("LoraLoader", model=model, clip=clip, lora_name=name, strength_model=sm,
                                strength_clip=sc)
    return model, clip


def test_weights_bit_identical_to_core_chain(env):
    model, clip = build_unet("sd15", seed=1), build_sd15_clip()
    files = _write_three(env, model, clip)
    base_m, base_c = weights_snapshot(model.model), weights_snapshot(clip.cond_stage_model)
    om, oc = _ours(model, clip, files)
    cm, cc = _core(model, clip, files)
    for a, b in ((patched_weights(om), patched_weights(cm)), (patched_weights(oc.patcher), patched_weights(cc.patcher))):
        assert a.keys() == b.keys()
        diff = [k for k in a if not torch.equal(a[k], b[k])]
        assert not diff, f"differs from core on {diff[:3]}"
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in base_m.items())
    assert all(torch.equal(v, clip.cond_stage_model.state_dict()[k]) for k, v in base_c.items())


def _sample(model, clip, seed=7):
    import comfy.sample

    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, 4, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=seed)


def test_sampling_identical_to_core_and_base_clean_afterwards(env):
    model, clip = build_unet("sd15", seed=2), build_sd15_clip(seed=3)
    files = _write_three(env, model, clip)
    base_m, base_c = weights_snapshot(model.model), weights_snapshot(clip.cond_stage_model)
    plain = _sample(model, clip)
    ours = _sample(*_ours(model, clip, files))
    core = _sample(*_core(model, clip, files))
    assert torch.equal(ours, core)
    assert not torch.allclose(ours, plain)
    assert torch.equal(_sample(model, clip), plain), "base model output changed after LoRA sampling"
    import comfy.model_management as mm
    mm.unload_all_models()
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in base_m.items())
    assert all(torch.equal(v, clip.cond_stage_model.state_dict()[k]) for k, v in base_c.items())


def test_zero_strength_is_a_no_op(env):
    model = build_unet("sd15", seed=1)
    sd = model.model.state_dict()
    lf.make_lora(sd, lf.pick_targets(sd), "kohya", seed=40).save(env.models_dir / "loras" / "zero.safetensors")
    (s,) = call_node("LoraSetLoad", lora_name="zero.safetensors", strength_model=0.0, strength_clip=0.0)
    m, c, report = call_node("LoraSetApply", model=model, lora_set=s)
    assert c is None
    w = patched_weights(m)
    assert all(torch.equal(w[k], sd[k]) for k in sd)
