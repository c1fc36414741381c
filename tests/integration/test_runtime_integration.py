"""The runtime inside a real ComfyUI: LowVram modules, other packs' wrappers and CFG functions,
text encoders, and the step structure of more samplers."""
from __future__ import annotations

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set as lora_set
from harness.tiny_models import build_sd15_clip, build_unet, patched_weights, weights_snapshot


@pytest.fixture(scope="module")
def setup(env):
    model, clip = build_unet("sd15", seed=111), build_sd15_clip(seed=112)
    sd, csd = model.model.state_dict(), clip.cond_stage_model.state_dict()
    names = []
    for i, kinds in enumerate([("attn", "proj"), ("attn", "conv3")]):
        lora = lf.make_lora(sd, lf.pick_targets(sd, kinds), "kohya", rank=3, alpha=1.0, seed=120 + i)
        lora.tensors.update(lf.make_te_lora(csd, seed=130 + i).tensors)
        lora.amplified(6)
        lora.save(env.models_dir / "loras" / f"ri_{i}.safetensors")
        names.append(f"ri_{i}.safetensors")
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a dog"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, clip, names, pos, neg


def sample(model, pos, neg, sampler_name="euler", steps=4, cfg=4.0, seed=2):
    import comfy.sample

    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, cfg, sampler_name, "normal",
                               pos, neg, latent, disable_pbar=True, seed=seed)


def close(a, b, rel=1e-5):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("strategy", ["merged", "merged-lowvram", "unmerged"])
def test_lowvram_modules_with_static_patches(env, setup, strategy):
    """Modules left on the offload device (ComfyUI's LowVram path) still get the runtime's LoRA, on top
    of a statically applied LoRA that ComfyUI applies per forward through LowVramPatch."""
    import comfy.model_management as mm

    model, _, names, _, _ = setup
    layers, unmerged, swap, inplace = (env.engine(f"nodes.runtime.{m}")
                                       for m in ("layers", "unmerged", "merged_swap", "inplace_swap"))
    patching = env.engine("nodes.patching")
    static_a = call_node("LoraSetApply", model=model, lora_set=lora_set(names[:1]))[0]
    both = call_node("LoraSetApply", model=model, lora_set=lora_set(names))[0]
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 2.0), torch.randn(2, 77, 64, generator=g)

    mm.load_models_gpu([both], force_full_load=True)
    with torch.no_grad():
        want = both.model.apply_model(x, t, c_crossattn=ctx).float()
    mm.unload_all_models()

    static_a.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)  # every module LowVram
    try:
        assert any(getattr(m, "weight_function", None) for m in static_a.model.modules()), "LowVram not active"
        options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None,
                                                                                      lora_set(names[1:]))]
        if strategy.startswith("merged"):
            swapper = (swap.MergedSwapper if strategy == "merged" else inplace.InPlaceSwapper)(static_a.model, options)
            swapper.activate(0)
            with torch.no_grad():
                got = static_a.model.apply_model(x, t, c_crossattn=ctx).float()
            swapper.restore()
        else:
            routing = unmerged.Routing()
            hooks = unmerged.UnmergedAdapters(layers.build_layer_plans(static_a.model, options), routing)
            hooks.install(static_a.model, x.device)
            routing.set(torch.ones(1, 1))
            with torch.no_grad():
                got = static_a.model.apply_model(x, t, c_crossattn=ctx).float()
            hooks.remove()
    finally:
        static_a.unpatch_model()
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance"])
def test_other_packs_wrappers_and_cfg_functions_still_run(env, setup, node):
    import comfy.patcher_extension as pe

    model, _, names, pos, neg = setup
    calls = {"predict": 0, "apply": 0, "pre": 0, "post": 0}

    def other_predict(executor, *args, **kwargs):
        calls["predict"] += 1
        return executor(*args, **kwargs)

    def other_apply(executor, *args, **kwargs):
        calls["apply"] += 1
        return executor(*args, **kwargs)

    def pre_cfg(args):
        calls["pre"] += 1
        return args["conds_out"]

    def post_cfg(args):
        calls["post"] += 1
        return args["denoised"]

    other = model.clone()
    other.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, "some_other_pack", other_predict)
    other.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "some_other_pack", other_apply)
    other.set_model_sampler_pre_cfg_function(pre_cfg)
    other.set_model_sampler_post_cfg_function(post_cfg)
    extra = {"switch_every": 1, "schedule": "paper"} if node == "LoraSetSwitch" else (
        {"gamma": 0.5} if node == "AutoLoraGuidance" else {})
    ours_with = call_node(node, model=other, lora_set=lora_set(names), **extra)[0]
    ours_without = call_node(node, model=model, lora_set=lora_set(names), **extra)[0]
    a, b = sample(ours_with, pos, neg), sample(ours_without, pos, neg)
    assert torch.equal(a, b), "identity wrappers of another pack must not change the result"
    assert calls["predict"] == 4 and calls["pre"] == 4 and calls["post"] == 4
    assert calls["apply"] >= 4


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_autolora_guider_replays_pre_and_post_cfg_per_branch(env, setup, strategy):
    model, _, names, pos, neg = setup
    calls = {"pre": 0, "post": 0}
    other = model.clone()
    other.set_model_sampler_pre_cfg_function(lambda args: calls.__setitem__("pre", calls["pre"] + 1) or args["conds_out"])
    other.set_model_sampler_post_cfg_function(lambda args: calls.__setitem__("post", calls["post"] + 1) or args["denoised"])
    (guider,) = call_node("AutoLoraGuider", model=other, lora_set=lora_set(names[:1]), positive=pos, negative=neg,
                          cfg_base=3.0, cfg_lora=5.0, gamma=0.5, strategy=strategy)
    import comfy.sample
    import comfy.samplers
    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
    guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.sampler_object("euler"), sigmas,
                  disable_pbar=True, seed=1)
    assert calls == {"pre": 6, "post": 6}, "both branches, every step"


def test_switch_clip_sums_every_text_encoder_part(env, setup):
    model, clip, names, _, _ = setup
    s = lora_set(names, [1.0, 0.5])
    _, sw_clip, _ = call_node("LoraSetSwitch", model=model, lora_set=s, switch_every=2, schedule="paper", clip=clip)
    _, static_clip, _ = call_node("LoraSetApply", model=model, lora_set=s, clip=clip)
    a, b = patched_weights(sw_clip.patcher), patched_weights(static_clip.patcher)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in weights_snapshot(clip.cond_stage_model).items())


@pytest.mark.parametrize("sampler_name, expected", [
    ("dpmpp_2s_ancestral", [0, 0, 1, 1, 2, 2, 3]),  # midpoint evaluation, none at the last step (σ_down = 0)
    ("dpm_2", [0, 0, 1, 1, 2, 2, 3]),
    ("dpmpp_2m", [0, 1, 2, 3]),
    ("euler_ancestral", [0, 1, 2, 3]),
])
def test_step_structure_of_multi_evaluation_samplers(env, setup, sampler_name, expected):
    model, _, names, pos, neg = setup
    composition = env.engine("nodes.composition")
    sw, _, runtime, _ = composition.switch_lora_set(model, None, lora_set(names), 1, "paper")
    sample(sw, pos, neg, sampler_name=sampler_name, steps=4)
    assert runtime.history[-1] == expected


def test_per_run_diagnostics_stay_bounded(env, setup, monkeypatch):
    """ComfyUI keeps a node's output (and so its runtime) cached across prompts: the per-run records keep the last
    RUNS_KEPT runs, oldest dropped first."""
    model, _, names, pos, neg = setup
    binding = env.engine("nodes.runtime.binding")
    monkeypatch.setattr(binding, "RUNS_KEPT", 2)
    composition = env.engine("nodes.composition")
    sw, _, runtime, _ = composition.switch_lora_set(model, None, lora_set(names), 1, "paper")
    for steps in (2, 3, 4):
        sample(sw, pos, neg, steps=steps)
    assert runtime.history == [[0, 1, 2], [0, 1, 2, 3]]
    assert len(runtime.forwards) == 2 and runtime.strategies == ["merged", "merged"]


@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance"])
def test_mismatched_architectures_are_refused(env, setup, node):
    model, _, names, _, _ = setup
    sdxl = build_unet("sdxl", seed=1, config_overrides={"context_dim": 2048})  # SDXL's text width: named by it
    xsd = sdxl.model.state_dict()
    lf.make_lora(xsd, [k for k in xsd if ".input_blocks.8.1." in k and k.endswith("to_k.weight")], "kohya",
                 seed=3).save(env.models_dir / "loras" / "ri_sdxl.safetensors")
    (mixed,) = call_node("LoraSetLoad", lora_name="ri_sdxl.safetensors", strength_model=1.0, strength_clip=1.0,
                         lora_set=lora_set(names[:1]))
    extra = {"gamma": 0.5} if node == "AutoLoraGuidance" else {}
    with pytest.raises(ValueError, match="ri_sdxl.safetensors: none of its .* looks made for SDXL"):
        call_node(node, model=model, lora_set=mixed, **extra)


def _tiny_gligen(model):
    """A core GLIGEN shaped for the tiny UNet (one gated self-attention per transformer block), as a ModelPatcher."""
    import comfy.gligen
    import comfy.model_patcher

    from harness.tiny_models import init_weights_

    dims = [m.attn1.to_q.weight.shape[0] for m in model.model.diffusion_model.modules()
            if type(m).__name__ == "BasicTransformerBlock"]
    fusers = [comfy.gligen.GatedSelfAttentionDense(d, 64, 2, d // 2) for d in dims]
    for fuser in fusers:
        init_weights_(fuser, seed=3)
        with torch.no_grad():
            fuser.alpha_attn.fill_(0.8)
            fuser.alpha_dense.fill_(0.5)
    position_net = comfy.gligen.PositionNet(64, 64)
    init_weights_(position_net, seed=4)
    return comfy.model_patcher.ModelPatcher(comfy.gligen.Gligen(fusers, position_net, 64),
                                            load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance"])
def test_gligen_boxes_with_mixtures(env, setup, node):
    """GLIGEN's conds put a middle_patch made for the call's batch into transformer_options: the batched mixture
    (the default on CPUs and GPUs) crashed in torch.cat. Calls carrying patches the conds brought evaluate one
    component at a time: every strategy agrees, and GLIGEN still acts."""
    model, clip, names, pos, neg = setup
    (boxed,) = call_node("GLIGENTextBoxApply", conditioning_to=pos, clip=clip, gligen_textbox_model=_tiny_gligen(model),
                         text="a red ball", width=32, height=32, x=16, y=16)
    extra = {"gamma": 0.5} if node == "AutoLoraGuidance" else {}
    before = weights_snapshot(model.model)
    out = {strategy: sample(call_node(node, model=model, lora_set=lora_set(names), strategy=strategy, **extra)[0],
                            boxed, neg) for strategy in ("auto", "merged", "unmerged")}
    assert close(out["auto"], out["merged"]) and close(out["unmerged"], out["merged"])
    without = sample(call_node(node, model=model, lora_set=lora_set(names), **extra)[0], pos, neg)
    assert not close(out["auto"], without, rel=1e-4), "GLIGEN must still act"
    import comfy.model_management as mm

    mm.unload_all_models()
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


@pytest.mark.parametrize("node, strategy", [("LoraSetComposite", "unmerged"), ("LoraSetComposite", "merged"),
                                            ("AutoLoraGuidance", "unmerged"), ("AutoLoraGuider", "unmerged"),
                                            ("AutoLoraGuider", "merged")])
def test_each_lora_component_carries_its_own_uuids(env, setup, node, strategy):
    """A cond's uuid names its rows' output: per-uuid caches (core's EasyCache keeps one output per uuid and skips a
    step by the first cond's) served one LoRA's cached output to another's rows — Composite / AutoLoRA 3-10 % off
    with EasyCache, differently per strategy. Each component now carries uuids derived from its conds' and its
    option, the same at every step; the base model's rows keep the conds' own."""
    import comfy.patcher_extension as pe

    model, _, names, pos, neg = setup
    seen = []

    def record(executor, *args, **kwargs):
        options = args[-1] if isinstance(args[-1], dict) else kwargs.get("transformer_options", {})
        seen.append((args[0].shape[0], list(options["uuids"]), list(options["cond_or_uncond"])))
        return executor(*args, **kwargs)

    other = model.clone()
    other.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "uuid_probe", record)
    if node == "AutoLoraGuider":
        (guider,) = call_node(node, model=other, lora_set=lora_set(names), positive=pos, negative=neg, cfg_base=3.0,
                              cfg_lora=5.0, gamma=0.5, strategy=strategy)
        import comfy.sample
        import comfy.samplers

        latent = torch.zeros(1, 4, 8, 8)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 3)
        guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.sampler_object("euler"), sigmas,
                      disable_pbar=True, seed=1)
    else:
        extra = {"gamma": 0.5} if node == "AutoLoraGuidance" else {}
        sample(call_node(node, model=other, lora_set=lora_set(names), strategy=strategy, **extra)[0], pos, neg, steps=3)
    per_step = len(seen) // 3
    steps = [sorted(str(u) for _, call_uuids, _ in seen[i * per_step:(i + 1) * per_step] for u in call_uuids)
             for i in range(3)]
    assert steps[1] == steps[0] and steps[2] == steps[0], "the same uuids at every step (merged visits the LoRAs " \
                                                          "in alternating order)"
    components = 2  # Composite: 2 LoRAs; AutoLoRA: base and LoRA branch
    assert len(steps[0]) == 2 * components and len(set(steps[0])) == 2 * components, "cond / uncond per component"
