"""LoRA Composite and AutoLoRA against independent references.

The references never touch the adapter runtime: each LoRA is baked into its *own* copy of the tiny
UNet with ComfyUI's ``calculate_weight`` (core patching math), and a plain ``CFGGuider`` subclass
runs ComfyUI's ``sampling_function`` (CFG per model) on each copy, then averages (Composite) or
blends (AutoLoRA) — the formulas of algorithms.md §1.4 and §2.2 taken literally. fp32; latents equal
within 1e-5 relative (the order of the averaging and of CFG differs, so not bitwise).
"""
from __future__ import annotations

import logging

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set as lora_set
from harness.sampling import baked_model
from harness.tiny_models import (SDXL_SAMPLING_OVERRIDES, build_sd15_clip, build_sd15_controlnet, build_sdxl_clip,
                                 build_unet, weights_snapshot)

REL = 1e-5
SEED_MODEL = 91


@pytest.fixture(scope="module")
def setup(env):
    model, clip = build_unet("sd15", seed=SEED_MODEL), build_sd15_clip(seed=92)
    sd = model.model.state_dict()
    names = []
    for i, kinds in enumerate([("attn", "proj"), ("attn", "ff"), ("attn", "conv3")]):
        lora = lf.make_lora(sd, lf.pick_targets(sd, kinds), "kohya", rank=2 + i, alpha=1.0, seed=100 + i)
        lora.amplified(8)
        lora.save(env.models_dir / "loras" / f"cp_{i}.safetensors")
        names.append(f"cp_{i}.safetensors")
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return model, names, pos, neg


def baked(env, lora_set_or_none):
    """An independent copy of the tiny UNet with the set's patches baked in by core math."""
    return baked_model(env.engine, build_unet("sd15", seed=SEED_MODEL), lora_set_or_none)


def reference_guider(model, models_and_weights, cfgs, pos, neg, cfg):
    import comfy.samplers

    class Reference(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            acc = 0
            for (m, w), c in zip(models_and_weights, cfgs):
                acc = acc + w * comfy.samplers.sampling_function(m, x, timestep, self.conds.get("negative"),
                                                                 self.conds.get("positive"), c,
                                                                 model_options=model_options, seed=seed)
            return acc

    g = Reference(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return g


def sample_guider(guider, sampler_name="euler", steps=4, seed=3, batch=1):
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(batch, 4, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps)
    return guider.sample(comfy.sample.prepare_noise(latent, seed), latent, comfy.samplers.sampler_object(sampler_name),
                         sigmas, disable_pbar=True, seed=seed)


def sample_model(model, pos, neg, cfg, sampler_name="euler", steps=4, seed=3, batch=1):
    import comfy.samplers

    g = comfy.samplers.CFGGuider(model)
    g.set_conds(pos, neg)
    g.set_cfg(cfg)
    return sample_guider(g, sampler_name, steps, seed, batch)


# What sample_node builds each composition node with (the guider has its own CFG scales; MODEL nodes sample at 4).
NODE_INPUTS = {"LoraSetSwitch": {"switch_every": 1, "schedule": "paper"}, "AutoLoraGuidance": {"gamma": 0.6},
               "AutoLoraGuider": {"cfg_base": 3.0, "cfg_lora": 5.0, "gamma": 0.6}}
MODEL_CFG = 4.0


def sample_node(node, model, s, pos, neg, strategy, steps=3, batch=1):
    """Build ``node`` over ``model`` with LoRA set ``s`` (settings from NODE_INPUTS) and sample it."""
    inputs = NODE_INPUTS.get(node, {})
    if node == "AutoLoraGuider":
        (guider,) = call_node(node, model=model, lora_set=s, positive=pos, negative=neg, strategy=strategy, **inputs)
        return sample_guider(guider, steps=steps, batch=batch)
    m = call_node(node, model=model, lora_set=s, strategy=strategy, **inputs)[0]
    return sample_model(m, pos, neg, MODEL_CFG, steps=steps, batch=batch)


def close(a, b, rel=REL):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


# --- Composite ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [4.0, 1.0])
@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_composite_equals_average_of_guided_scores(env, setup, cfg, sampler_name):
    model, names, pos, neg = setup
    strengths = [1.0, 0.8, -0.6]
    s = lora_set(names, strengths)
    comp = call_node("LoraSetComposite", model=model, lora_set=s)[0]
    got = sample_model(comp, pos, neg, cfg, sampler_name)
    refs = [(baked(env, lora_set([n], [st])), 1 / 3) for n, st in zip(names, strengths)]
    want = sample_guider(reference_guider(model, refs, [cfg] * 3, pos, neg, cfg), sampler_name)
    assert close(got, want), (got - want).abs().max().item()
    merge_like = sample_model(call_node("LoraSetApply", model=model, lora_set=s)[0], pos, neg, cfg, sampler_name)
    assert not close(got, merge_like, rel=20 * REL), "Composite must differ from Merge well beyond the tolerance"


def test_composite_weights_are_normalised(env, setup):
    model, names, pos, neg = setup
    s = lora_set(names[:2])
    comp = call_node("LoraSetComposite", model=model, lora_set=s, entry_weights="1, 3")[0]
    got = sample_model(comp, pos, neg, 4.0)
    refs = [(baked(env, lora_set([names[0]])), 0.25), (baked(env, lora_set([names[1]])), 0.75)]
    assert close(got, sample_guider(reference_guider(model, refs, [4.0] * 2, pos, neg, 4.0)))


def test_composite_of_one_equals_plain_lora_exactly(env, setup):
    model, names, pos, neg = setup
    s = lora_set(names[:1], [0.7])
    a = sample_model(call_node("LoraSetComposite", model=model, lora_set=s)[0], pos, neg, 4.0)
    b = sample_model(call_node("LoraSetApply", model=model, lora_set=s)[0], pos, neg, 4.0)
    assert torch.equal(a, b)


def test_composite_batched_equals_sequential_and_splits_to_fit(env, setup):
    model, names, pos, neg = setup
    composition = env.engine("nodes.composition")
    s = lora_set(names, [1.0, 0.5, 0.9])
    seq = sample_model(call_node("LoraSetComposite", model=model, lora_set=s, strategy="merged")[0], pos, neg, 4.0)
    m, _, runtime, _ = composition.composite_lora_set(model, None, s, strategy="unmerged")
    batched = sample_model(m, pos, neg, 4.0)
    assert close(batched, seq, rel=1e-4)  # per-row low-rank path vs merged weights: float order differs
    in_place = sample_model(call_node("LoraSetComposite", model=model, lora_set=s, strategy="merged-lowvram")[0],
                            pos, neg, 4.0)
    assert close(in_place, seq)  # the same merged passes, weights swapped in place (rounding per update)
    assert runtime.forwards[-1] == 4, "one batched forward per model call (4 euler steps)"
    need = None

    def one_component_free(device):  # simulate a GPU whose free memory fits one copy of the batch
        return need * 1.6

    m2, _, runtime2, _ = composition.composite_lora_set(model, None, s, strategy="unmerged",
                                                        free_memory=one_component_free)
    need = model.model.memory_required([2, 4, 8, 8]) * 1.5
    split = sample_model(m2, pos, neg, 4.0)
    assert close(split, batched, rel=1e-5) and runtime2.forwards[-1] == 4 * 3, "split into one LoRA per forward"
    m3, _, _, _ = composition.composite_lora_set(model, None, s, strategy="unmerged", free_memory=lambda d: 1.0)
    with pytest.raises(MemoryError, match="even one LoRA's batch"):
        sample_model(m3, pos, neg, 4.0)
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in weights_snapshot(baked(env, None)).items())


def test_composite_merged_keeps_no_weight_copies_and_alternates_its_order(env, setup):
    """Merged Composite holds one patched copy (like one static LoRA), not one per LoRA, recomputing the next
    LoRA's weights in place; every other call visits the LoRAs backwards (k − 1 swaps per call, not k) and still
    sums in set order, so the result equals the forward-only order bit for bit."""
    model, names, pos, neg = setup
    composition = env.engine("nodes.composition")
    swap = env.engine("nodes.runtime.merged_swap")
    s = lora_set(names, [1.0, 0.5, 0.9])
    m, _, runtime, _ = composition.composite_lora_set(model, None, s, strategy="merged")
    activations, caches = [], []
    plain_activate = swap.MergedSwapper.activate

    def spy(self, option):
        caches.append(len(self._cache))
        changed = plain_activate(self, option)
        activations.append(changed)
        return changed

    swap.MergedSwapper.activate = spy
    try:
        got = sample_model(m, pos, neg, 4.0)
    finally:
        swap.MergedSwapper.activate = plain_activate
    assert runtime.cached_sets == 0 and max(caches) == 0
    calls = runtime.forwards[-1] // 3
    assert sum(activations) == 3 + (calls - 1) * 2, "k swaps on the first call, k - 1 on each later one"
    refs = [(baked(env, lora_set([n], [st])), 1 / 3) for n, st in zip(names, [1.0, 0.5, 0.9])]
    assert close(got, sample_guider(reference_guider(model, refs, [4.0] * 3, pos, neg, 4.0)))
    assert all(torch.equal(v, model.model.state_dict()[k]) for k, v in weights_snapshot(baked(env, None)).items())


def test_composite_of_equal_rank_loras_runs_blocks_batched(env, setup):
    """LoRAs of one rank on the same layers: every linear layer runs all LoRAs' row blocks as one batched GEMM pair
    (block segments), and the result still equals the independent reference."""
    model, _, pos, neg = setup
    sd = model.model.state_dict()
    names = []
    for i in range(3):
        lora = lf.make_lora(sd, lf.pick_targets(sd, ("attn", "ff", "conv3")), "kohya", rank=4, alpha=2.0, seed=300 + i)
        lora.amplified(8)
        lora.save(env.models_dir / "loras" / f"cp_equal_{i}.safetensors")
        names.append(f"cp_equal_{i}.safetensors")
    dispatch, routed = env.engine("kernels.dispatch"), env.engine("kernels.lowrank_routed")
    blocks = []

    def recording(prepared, x, out, segments):
        blocks.extend(len(seg.blocks) for seg in segments if seg.blocks and prepared.down_blocks is not None)
        return routed.add_routed_torch(prepared, x, out, segments)

    dispatch.register_backend("lowrank_routed", "test_recording", recording, 1000, lambda: (True, "test"))
    try:
        strengths = [1.0, 0.7, -0.5]
        s = lora_set(names, strengths)
        got = sample_model(call_node("LoraSetComposite", model=model, lora_set=s, strategy="unmerged")[0], pos, neg, 4.0)
    finally:
        dispatch.unregister_backend("lowrank_routed", "test_recording")
    assert blocks and set(blocks) == {3}, "the shared linear layers ran their 3 row blocks batched"
    refs = [(baked(env, lora_set([n], [st])), 1 / 3) for n, st in zip(names, strengths)]
    assert close(got, sample_guider(reference_guider(model, refs, [4.0] * 3, pos, neg, 4.0)))


def test_unmerged_runs_upload_their_factors_packed_once(env, setup):
    """The hooks' LoRA factors reach the device in one packed copy per dtype (``staging.PackedUpload``), made at the
    first unmerged run and kept for the next (the same factor tensors each run), its device copies dropped at the end
    of each run; the second run's result is the first's bit for bit."""
    model, names, pos, neg = setup
    composition = env.engine("nodes.composition")
    unmerged = env.engine("nodes.runtime.unmerged")
    comp, _, runtime, _ = composition.composite_lora_set(model, None, lora_set(names[:2]), strategy="unmerged")
    first = sample_model(comp, pos, neg, 4.0, steps=2)
    upload = runtime._hook_upload
    assert upload is not None and upload.sources and not upload._on, "device copies live for one run only"
    second = sample_model(comp, pos, neg, 4.0, steps=2)
    assert runtime._hook_upload is upload and torch.equal(first, second)
    plans = env.engine("nodes.runtime.layers").build_layer_plans(model.model, runtime.options,
                                                                 lowrank_memo=runtime._lowrank_memo)
    assert unmerged.lowrank_upload(plans, kept=upload) is upload  # the same tensors: nothing packed again
    assert unmerged.lowrank_upload(plans) is not upload


def test_packed_upload_lays_out_one_flat_tensor_per_dtype(env):
    """The packed layout another device's upload unpacks: one flat host tensor per source dtype, views shaped like
    the sources (cast once when a dtype is asked for); on the sources' own device no copy at all."""
    staging = env.engine("nodes.runtime.staging")
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(3, 4, generator=g), torch.randn(2, 2, 1, 1, generator=g).half(),
               torch.randn(5, generator=g), torch.randn(4, 3, generator=g).half()]
    upload = staging.PackedUpload(sources)
    assert all(a is b for a, b in zip(upload.to("cpu"), sources))
    packed = upload._packed(torch.device("cpu"))
    assert {dtype: flat.numel() for dtype, (flat, _) in packed.items()} == {torch.float32: 17, torch.float16: 16}
    flats = {dtype: flat.clone() for dtype, (flat, _) in packed.items()}
    for got, source in zip(upload.unpack(flats), sources):
        assert got.dtype == source.dtype and torch.equal(got, source)
    for got, source in zip(upload.unpack(flats, torch.float32), sources):
        assert got.dtype == torch.float32 and torch.equal(got, source.float())
    on_meta = upload.to("meta", torch.float16)
    assert [t.shape for t in on_meta] == [t.shape for t in sources] and all(t.is_meta for t in on_meta)
    staged = staging.StagedTensors(upload, "meta")
    assert staged.get(sources[2]).is_meta and staged.get(torch.ones(1)).device.type == "cpu"
    upload.release()
    assert not upload._on


def test_packed_upload_pins_only_up_to_its_limit(env, monkeypatch):
    """For a CUDA device the packed host tensor is page-locked (one asynchronous copy), but only up to
    ``PIN_LIMIT_BYTES`` per dtype: larger sets stay pageable (page-locked memory is scarce)."""
    staging = env.engine("nodes.runtime.staging")
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.dtype) or self)
    monkeypatch.setattr(staging, "PIN_LIMIT_BYTES", 4 * 10)
    upload = staging.PackedUpload([torch.ones(10), torch.ones(3, 4, dtype=torch.float16), torch.ones(2)])
    upload._packed(torch.device("cuda"))
    assert pinned == [torch.float16]  # 24 bytes pinned; the 48-byte fp32 pack stays pageable
    staging.PackedUpload([torch.ones(3)])._packed(torch.device("cpu"))
    assert pinned == [torch.float16]  # nothing pinned for the CPU


@pytest.mark.parametrize("strategy", ["merged", "unmerged", "auto"])
@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance"])
def test_text_encoder_only_loras_leave_the_unet_alone(env, setup, node, strategy):
    """A set whose LoRAs patch no UNet weight (a text-encoder-only file) samples exactly as the base model; merged
    runs failed with "max() arg is an empty sequence" (a swapper with no layers). Base weights bit-identical after."""
    model, _, pos, neg = setup
    te = lf.make_te_lora(build_sd15_clip(seed=92).cond_stage_model.state_dict(), seed=7)
    te.save(env.models_dir / "loras" / "cp_te_only.safetensors")
    before = weights_snapshot(model.model)
    inputs = {**NODE_INPUTS.get(node, {}), "strategy": strategy}
    patched = call_node(node, model=model, lora_set=lora_set(["cp_te_only.safetensors"]), **inputs)[0]
    got = sample_model(patched, pos, neg, MODEL_CFG)
    assert close(got, sample_model(model, pos, neg, MODEL_CFG))
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


def test_composite_bad_input(env, setup):
    model, names, pos, neg = setup
    with pytest.raises(ValueError, match="entry_weights has 1 numbers but the set has 3"):
        call_node("LoraSetComposite", model=model, lora_set=lora_set(names), entry_weights="2")
    with pytest.raises(ValueError, match="non-negative"):
        call_node("LoraSetComposite", model=model, lora_set=lora_set(names), entry_weights="1, -1, 1")
    with pytest.raises(ValueError, match="lora_set is empty"):
        call_node("LoraSetComposite", model=model, lora_set=env.engine("nodes.lora_set").LoraSet())
    # finite weights whose sum overflows normalised to 0, 0 (a crash in the sampler); only their ratios count
    assert env.engine("nodes.composition").parse_entry_weights("1e308, 1e308, 0", 3) == [0.5, 0.5, 0.0]


# --- AutoLoRA -----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_autolora_gamma_one_and_zero_are_exact(env, setup, strategy):
    model, names, pos, neg = setup
    s = lora_set(names[:2], [0.9, 0.6])
    plain_lora = sample_model(call_node("LoraSetApply", model=model, lora_set=s)[0], pos, neg, 4.0)
    plain_base = sample_model(model, pos, neg, 4.0)
    g1 = sample_model(call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=1.0, strategy=strategy)[0],
                      pos, neg, 4.0)
    g0 = sample_model(call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=0.0, strategy=strategy)[0],
                      pos, neg, 4.0)
    if strategy == "merged":
        assert torch.equal(g1, plain_lora) and torch.equal(g0, plain_base)
    else:  # unmerged adds the low-rank product to the output instead of the weight
        assert close(g1, plain_lora, 1e-4) and torch.equal(g0, plain_base)


@pytest.mark.parametrize("gamma", [0.5, 1.7, -0.4])
def test_autolora_model_form_equals_blend_of_guided_branches(env, setup, gamma):
    model, names, pos, neg = setup
    s = lora_set(names[:2], [0.9, 0.6])
    got = sample_model(call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=gamma)[0], pos, neg, 4.0)
    refs = [(baked(env, None), 1 - gamma), (baked(env, s), gamma)]
    want = sample_guider(reference_guider(model, refs, [4.0, 4.0], pos, neg, 4.0))
    assert close(got, want), (got - want).abs().max().item()


def test_autolora_guider_separate_cfg(env, setup):
    model, names, pos, neg = setup
    s = lora_set(names[:2], [0.9, 0.6])
    (guider,) = call_node("AutoLoraGuider", model=model, lora_set=s, positive=pos, negative=neg, cfg_base=3.0,
                          cfg_lora=6.0, gamma=0.6)
    got = sample_guider(guider)
    refs = [(baked(env, None), 0.4), (baked(env, s), 0.6)]
    want = sample_guider(reference_guider(model, refs, [3.0, 6.0], pos, neg, 6.0))
    assert close(got, want), (got - want).abs().max().item()
    (g1,) = call_node("AutoLoraGuider", model=model, lora_set=s, positive=pos, negative=neg, cfg_base=3.0,
                      cfg_lora=6.0, gamma=1.0)
    assert torch.equal(sample_guider(g1), sample_model(call_node("LoraSetApply", model=model, lora_set=s)[0],
                                                        pos, neg, 6.0))


@pytest.mark.parametrize("strategy", ["merged", "merged-lowvram", "unmerged"])
@pytest.mark.parametrize("cfg_base, cfg_lora, gamma", [(3.0, 6.0, 0.6), (1.0, 6.0, 0.6), (4.0, 1.0, -0.4)])
def test_autolora_guider_strategies_equal_the_reference(env, setup, strategy, cfg_base, cfg_lora, gamma):
    """Merged (a pass per branch, weights swapped; as a copy or in place) and unmerged (both branches' conds in ONE
    batched network call, rows routed by cond) against the independent reference, including a branch whose cfg is 1
    (core's shortcut: its uncond is not evaluated). Network evaluations per step: 2 merged, 1 unmerged."""
    model, names, pos, neg = setup
    s = lora_set(names[:2], [0.9, 0.6])
    (guider,) = call_node("AutoLoraGuider", model=model, lora_set=s, positive=pos, negative=neg, cfg_base=cfg_base,
                          cfg_lora=cfg_lora, gamma=gamma, strategy=strategy)
    got = sample_guider(guider, steps=3)
    refs = [(baked(env, None), 1 - gamma), (baked(env, s), gamma)]
    want = sample_guider(reference_guider(model, refs, [cfg_base, cfg_lora], pos, neg, cfg_lora), steps=3)
    assert close(got, want), (got - want).abs().max().item()
    assert guider.runtime.forwards[-1] == (6 if strategy.startswith("merged") else 3)


@pytest.mark.parametrize("mix", ["cfg-then-blend", "blend-then-cfg"])
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_autolora_guider_cfg_functions_that_call_the_model_see_their_branch(env, setup, strategy, mix):
    """Post-CFG functions such as core's SAG and PAG evaluate the model again (``calc_cond_batch`` on
    ``args["model"]``): in cfg-then-blend each branch's call must see that branch's weights (base or LoRA), as in
    the reference where each branch is its own model; blend-then-cfg's one CFG runs with the LoRA branch."""
    import comfy.samplers

    model, names, pos, neg = setup

    def post_cfg(args):  # depends on which model answers the extra call
        (extra,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"],
                                                  args["model_options"])
        return args["denoised"] + 0.3 * (extra - args["uncond_denoised"])

    other = model.clone()
    other.set_model_sampler_post_cfg_function(post_cfg)
    s = lora_set(names[:2], [0.9, 0.6])
    cfgs = (3.0, 6.0) if mix == "cfg-then-blend" else (6.0, 6.0)
    (guider,) = call_node("AutoLoraGuider", model=other, lora_set=s, positive=pos, negative=neg, cfg_base=cfgs[0],
                          cfg_lora=cfgs[1], gamma=0.6, mix=mix, strategy=strategy)
    got = sample_guider(guider, steps=3)
    if mix == "cfg-then-blend":
        refs = [(baked(env, None), 0.4), (baked(env, s), 0.6)]
        want = sample_guider(reference_guider(other, refs, list(cfgs), pos, neg, cfgs[1]), steps=3)
    else:
        (merged_guider,) = call_node("AutoLoraGuider", model=other, lora_set=s, positive=pos, negative=neg,
                                     cfg_base=6.0, cfg_lora=6.0, gamma=0.6, mix=mix, strategy="merged")
        want = sample_guider(merged_guider, steps=3)
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("patch", ["SelfAttentionGuidance", "PerturbedAttentionGuidance"])
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_autolora_guider_with_core_sag_and_pag(env, setup, strategy, patch):
    """Core's SAG records the uncond attention map in an attention patch during the network call and reads it in
    its post-CFG function; PAG calls the model again with a perturbed attention. Per branch, each must act as on
    that branch's own model (the reference); an unmerged run therefore evaluates branch by branch when CFG functions
    and attention patches meet, instead of sharing one batched call (where SAG saw one branch's map)."""
    model, names, pos, neg = setup
    options = {"scale": 0.5, "blur_sigma": 2.0} if patch == "SelfAttentionGuidance" else {"scale": 2.0}
    (patched,) = call_node(patch, model=model, **options)
    s = lora_set(names[:2], [0.9, 0.6])
    (guider,) = call_node("AutoLoraGuider", model=patched, lora_set=s, positive=pos, negative=neg, cfg_base=3.0,
                          cfg_lora=5.0, gamma=0.6, strategy=strategy)
    got = sample_guider(guider, steps=3)
    refs = [(baked(env, None), 0.4), (baked(env, s), 0.6)]
    want = sample_guider(reference_guider(patched, refs, [3.0, 5.0], pos, neg, 5.0), steps=3)
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance"])
def test_model_patch_mixtures_with_core_sag_agree_across_strategies(env, setup, node):
    """SAG on a mixture's model call sees one component's attention map (README): with CFG functions next to
    attention patches both strategies evaluate the components one by one in set order, so merged and unmerged give
    the same image."""
    model, names, pos, neg = setup
    (patched,) = call_node("SelfAttentionGuidance", model=model, scale=0.5, blur_sigma=2.0)
    extra = {"gamma": 0.6} if node == "AutoLoraGuidance" else {}
    outs = [sample_model(call_node(node, model=patched, lora_set=lora_set(names[:2]), strategy=strategy, **extra)[0],
                         pos, neg, 4.0, steps=3) for strategy in ("merged", "unmerged")]
    assert close(outs[1], outs[0]), (outs[1] - outs[0]).abs().max().item()


def per_lora_reference(env, node, names, s):
    """(models and weights, CFG scales) of ``reference_guider`` for ``node`` over ``s`` = LoRAs 0 and 1 at 0.9 / 0.6
    with NODE_INPUTS: Composite averages the two LoRA models, AutoLoRA blends base and LoRA model with γ 0.6."""
    if node == "LoraSetComposite":
        refs = [(baked(env, lora_set(names[0:1], [0.9])), 0.5), (baked(env, lora_set(names[1:2], [0.6])), 0.5)]
    else:
        refs = [(baked(env, None), 0.4), (baked(env, s), 0.6)]
    inputs = NODE_INPUTS.get(node, {})
    return refs, [inputs.get("cfg_base", MODEL_CFG), inputs.get("cfg_lora", MODEL_CFG)]


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_timestep_ranged_conds(env, setup, node, strategy):
    """ConditioningSetTimestepRange: core leaves a cond out of the steps outside its range, so which conds (and
    rows, and cond_or_uncond indices) a model call carries changes from step to step; here the negative is absent
    from the first steps altogether. Against per-LoRA models, both strategies."""
    model, names, pos, neg = setup
    (early,) = call_node("ConditioningSetTimestepRange", conditioning=pos, start=0.0, end=0.6)
    (late,) = call_node("ConditioningSetTimestepRange", conditioning=neg, start=0.4, end=1.0)
    (positive,) = call_node("ConditioningCombine", conditioning_1=early, conditioning_2=late)
    (negative,) = call_node("ConditioningSetTimestepRange", conditioning=neg, start=0.3, end=1.0)
    s = lora_set(names[:2], [0.9, 0.6])
    got = sample_node(node, model, s, positive, negative, strategy, steps=4)
    refs, cfgs = per_lora_reference(env, node, names, s)
    want = sample_guider(reference_guider(model, refs, cfgs, positive, negative, cfgs[-1]), steps=4)
    unranged = sample_guider(reference_guider(model, refs, cfgs, pos, neg, cfgs[-1]), steps=4)
    assert not close(unranged, want), "the ranges must change the result"
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_controlnet_reaches_every_lora_evaluation(env, setup, node, strategy):
    """A ControlNet on the conds (core's ControlNetApplyAdvanced): the UNet consumes its residual lists with
    ``pop()``, so a merged mixture's second evaluation of the same model call ran without ControlNet (0.59 abs off
    the reference for Composite) until each evaluation got its own lists. Against per-LoRA models."""
    model, names, pos, neg = setup
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    cpos, cneg = call_node("ControlNetApplyAdvanced", positive=pos, negative=neg, control_net=build_sd15_controlnet(),
                           image=image, strength=1.0, start_percent=0.0, end_percent=1.0)[:2]
    s = lora_set(names[:2], [0.9, 0.6])
    got = sample_node(node, model, s, cpos, cneg, strategy)
    refs, cfgs = per_lora_reference(env, node, names, s)
    want = sample_guider(reference_guider(model, refs, cfgs, cpos, cneg, cfgs[-1]), steps=3)
    without = sample_guider(reference_guider(model, refs, cfgs, pos, neg, cfgs[-1]), steps=3)
    assert not close(without, want, 1e-3), "the ControlNet must change the result"
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_latent_batch_of_two(env, setup, node, strategy):
    """Two latents with their own noise: every row of the routed batches keeps its own LoRAs (against the
    per-LoRA models)."""
    model, names, pos, neg = setup
    s = lora_set(names[:2], [0.9, 0.6])
    got = sample_node(node, model, s, pos, neg, strategy, batch=2)
    refs, cfgs = per_lora_reference(env, node, names, s)
    want = sample_guider(reference_guider(model, refs, cfgs, pos, neg, cfgs[-1]), steps=3, batch=2)
    assert not torch.allclose(want[0], want[1]), "the two rows have their own noise"
    assert close(got, want), (got - want).abs().max().item()


def two_attention_loras(env, model, prefix: str, seed: int) -> list[str]:
    """Two strong rank-2 kohya LoRAs on every attention layer of ``model``, written to the loras folder."""
    sd = model.model.state_dict()
    names = []
    for i in range(2):
        lora = lf.make_lora(sd, lf.pick_targets(sd, ("attn",)), "kohya", rank=2, alpha=1.0, seed=seed + i)
        lora.amplified(8)
        lora.save(env.models_dir / "loras" / f"{prefix}_{i}.safetensors")
        names.append(f"{prefix}_{i}.safetensors")
    return names


@pytest.fixture(scope="module")
def sdxl_setup(env):
    """A class-conditional tiny SDXL (``y``: pooled text + size embedding), its CLIP-L+G and two attention LoRAs."""
    model = build_unet("sdxl", seed=11, config_overrides=SDXL_SAMPLING_OVERRIDES)
    clip = build_sdxl_clip(seed=12)
    names = two_attention_loras(env, model, "cp_xl", 300)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    return model, names, pos, neg


def unmerged_and_merged(node, model, s, pos, neg):
    """One node's sampled latents with strategy merged and unmerged (3 euler steps)."""
    return [sample_node(node, model, s, pos, neg, strategy) for strategy in ("merged", "unmerged")]


ALL_NODES = ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"]


@pytest.mark.parametrize("node", ALL_NODES)
def test_sdxl_sampling_unmerged_equals_merged(env, sdxl_setup, node):
    """SDXL's extra conditioning (``y``) travels with every routed row: unmerged == merged (core patching math)."""
    model, names, pos, neg = sdxl_setup
    merged, unmerged = unmerged_and_merged(node, model, lora_set(names), pos, neg)
    assert close(unmerged, merged), (unmerged - merged).abs().max().item()


@pytest.mark.parametrize("node", ALL_NODES)
def test_inpainting_model_unmerged_equals_merged(env, node):
    """An inpainting UNet (9 input channels: the concat latent and mask ride along as ``c_concat``)."""
    import node_helpers

    model, clip = build_unet("sd15", seed=21, config_overrides={"in_channels": 9}), build_sd15_clip(seed=22)
    names = two_attention_loras(env, model, "cp_inpaint", 400)
    g = torch.Generator().manual_seed(4)
    values = {"concat_latent_image": torch.randn(1, 4, 8, 8, generator=g),
              "concat_mask": torch.rand(1, 1, 64, 64, generator=g)}
    pos, neg = (node_helpers.conditioning_set_values(clip.encode_from_tokens_scheduled(clip.tokenize(t)), values)
                for t in ("a cat", "blurry"))
    merged, unmerged = unmerged_and_merged(node, model, lora_set(names), pos, neg)
    assert close(unmerged, merged), (unmerged - merged).abs().max().item()


@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_autolora_guider_network_sees_cond_and_uncond_indices(env, setup, strategy):
    """Attention patches that tell cond (0) from uncond (1) by ``cond_or_uncond`` see 0/1 for both branches, also
    when the runtime batches [cond, uncond, cond, uncond] in one call (calc_cond_batch numbers them 0..3)."""
    model, names, pos, neg = setup
    seen = []

    def attn1(q, k, v, extra_options):
        seen.append(list(extra_options["cond_or_uncond"]))
        return q, k, v

    other = model.clone()
    other.set_model_attn1_patch(attn1)
    (guider,) = call_node("AutoLoraGuider", model=other, lora_set=lora_set(names[:1]), positive=pos, negative=neg,
                          cfg_base=3.0, cfg_lora=5.0, gamma=0.5, strategy=strategy)
    sample_guider(guider, steps=2)
    per_call = [0, 1] if strategy == "merged" else [0, 0, 1, 1]  # in calc_cond_batch's order (it varies)
    assert seen and all(sorted(s) == per_call for s in seen), seen[:3]


def test_autolora_guider_gives_a_custom_calc_function_one_pair_per_branch(env, setup):
    """Another pack's ``sampler_calc_cond_batch_function`` is written for [cond, uncond] (core's SkipLayerGuidance
    unpacks exactly two): an unmerged guider then evaluates branch by branch, same result as batched."""
    import comfy.samplers

    model, names, pos, neg = setup
    sizes = []

    def calc(args):
        cond, uncond = args["conds"]
        sizes.append(len(args["conds"]))
        return comfy.samplers.calc_cond_batch(args["model"], [cond, uncond], args["input"], args["sigma"],
                                              args["model_options"])

    other = model.clone()
    other.set_model_sampler_calc_cond_batch_function(calc)
    outs = []
    for m in (other, model):
        (guider,) = call_node("AutoLoraGuider", model=m, lora_set=lora_set(names[:2]), positive=pos, negative=neg,
                              cfg_base=3.0, cfg_lora=5.0, gamma=0.5, strategy="unmerged")
        outs.append(sample_guider(guider, steps=2))
    assert sizes == [2] * 4, "one [cond, uncond] pair per branch and step"
    assert close(outs[0], outs[1])


def test_unmerged_routing_holds_with_area_and_mask_conditioning(env, setup):
    """Area and mask conds make calc_cond_batch crop the input and split one step into several network calls (a
    crop does not concatenate with the full latent), each with its own cond_or_uncond list: the unmerged rows must
    still carry their own LoRAs in every call. Unmerged == merged (which is core patching, tested above) for
    Composite, AutoLoraGuidance and AutoLoraGuider."""
    model, names, pos, neg = setup
    (area,) = call_node("ConditioningSetArea", conditioning=pos, width=32, height=24, x=16, y=8, strength=0.8)
    (masked,) = call_node("ConditioningSetMask", conditioning=neg, mask=torch.linspace(0, 1, 64).reshape(8, 8),
                          strength=1.0, set_cond_area="mask bounds")
    (positive,) = call_node("ConditioningCombine", conditioning_1=pos, conditioning_2=area)
    (negative,) = call_node("ConditioningCombine", conditioning_1=neg, conditioning_2=masked)
    s = lora_set(names[:2], [0.9, 0.6])
    outs = []
    for strategy in ("merged", "unmerged"):
        composite = call_node("LoraSetComposite", model=model, lora_set=s, strategy=strategy)[0]
        auto = call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=0.6, strategy=strategy)[0]
        (guider,) = call_node("AutoLoraGuider", model=model, lora_set=s, positive=positive, negative=negative,
                              cfg_base=3.0, cfg_lora=5.0, gamma=0.6, strategy=strategy)
        outs.append([sample_model(composite, positive, negative, 4.0, steps=2),
                     sample_model(auto, positive, negative, 4.0, steps=2), sample_guider(guider, steps=2)])
    assert guider.runtime.forwards[-1] > 2, "area/mask conds split a step into several network calls"
    for merged, unmerged, what in zip(*outs, ("Composite", "AutoLoraGuidance", "AutoLoraGuider")):
        assert close(unmerged, merged), (what, (unmerged - merged).abs().max().item())


@pytest.mark.parametrize("strategy", ["merged", "merged-lowvram", "unmerged"])
def test_stacked_runtimes_compose_exactly(env, setup, strategy, caplog):
    """LoraSetComposite (LoRAs 1, 2) → AutoLoraGuider (LoRA 3) on its output: the guider's LoRA branch is
    Composite's average with LoRA 3 on top. Two merged swappers on one model would overwrite each other's LoRAs, so
    the second to start runs unmerged (logged when merged was asked for). Against the independent reference
    0.5·CFG₃(avg(W+Δ1, W+Δ2)) + 0.5·CFG₅(avg(W+Δ1+Δ3, W+Δ2+Δ3)); base weights bit-identical afterwards."""
    import comfy.samplers

    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    composition = env.engine("nodes.composition")
    comp, _, comp_runtime, _ = composition.composite_lora_set(model, None, lora_set(names[:2]), strategy=strategy)
    (guider,) = call_node("AutoLoraGuider", model=comp, lora_set=lora_set(names[2:3]), positive=pos, negative=neg,
                          cfg_base=3.0, cfg_lora=5.0, gamma=0.5, strategy=strategy)
    with caplog.at_level(logging.WARNING):
        got = sample_guider(guider, steps=2)
    strategies = sorted([comp_runtime.strategies[-1], guider.runtime.strategies[-1]])
    assert strategies == sorted([strategy, "unmerged"])
    assert any("stacked on another LoRA Composer node" in r.getMessage() for r in caplog.records) == (
        strategy != "unmerged")
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())

    m1, m2 = baked(env, lora_set(names[0:1])), baked(env, lora_set(names[1:2]))
    m13, m23 = baked(env, lora_set([names[0], names[2]])), baked(env, lora_set([names[1], names[2]]))

    class Reference(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            def guided(m, cfg):
                return comfy.samplers.sampling_function(m, x, timestep, self.conds["negative"],
                                                        self.conds["positive"], cfg, model_options, seed)
            return 0.25 * (guided(m1, 3.0) + guided(m2, 3.0)) + 0.25 * (guided(m13, 5.0) + guided(m23, 5.0))

    ref = Reference(model)
    ref.set_conds(pos, neg)
    ref.set_cfg(5.0)
    want = sample_guider(ref, steps=2)
    assert close(got, want), (got - want).abs().max().item()


@pytest.mark.parametrize("node", ["LoraSetSwitch", "LoraSetComposite", "AutoLoraGuidance", "AutoLoraGuider"])
def test_core_hook_loras_on_the_conditioning_compose_and_leave_no_trace(env, setup, node, caplog):
    """ComfyUI's hook LoRAs (``create_hook_lora`` on both conds, strength 1 at every step) act like a static LoRA,
    so each node over hooked conds must equal the same node over the model with that LoRA applied statically. Core
    copies hook-patched weights into the model's Parameters and its backups back at the end, which a merged swap
    turned into a leak (the Switch's LoRA baked into the base weights); merged is asked for, unmerged runs, with a
    warning. Base weights bit-identical afterwards."""
    import comfy.hooks
    import comfy.model_management as mm
    import comfy.utils
    import folder_paths

    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    hook = comfy.hooks.create_hook_lora(comfy.utils.load_torch_file(folder_paths.get_full_path("loras", names[2]),
                                                                    safe_load=True), 1.0, 1.0)
    hooked_pos, hooked_neg = (comfy.hooks.set_hooks_for_conditioning(c, hook) for c in (pos, neg))
    static = call_node("LoraSetApply", model=model, lora_set=lora_set(names[2:3]))[0]
    s = lora_set(names[:2])
    outs = []
    for base, p, n in ((model, hooked_pos, hooked_neg), (static, pos, neg)):
        with caplog.at_level(logging.WARNING):
            outs.append(sample_node(node, base, s, p, n, "merged"))
        if base is model:
            assert any("ComfyUI hook LoRAs" in r.getMessage() for r in caplog.records)
            caplog.clear()
    mm.unload_all_models()
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items()), "base weights changed"
    assert close(outs[0], outs[1]), (outs[0] - outs[1]).abs().max().item()
    assert not any("ComfyUI hook LoRAs" in r.getMessage() for r in caplog.records), "no hooks: merged as asked"


def test_autolora_guider_blend_then_cfg_equals_model_form(env, setup):
    model, names, pos, neg = setup
    s = lora_set(names[:1])
    (guider,) = call_node("AutoLoraGuider", model=model, lora_set=s, positive=pos, negative=neg, cfg_base=5.0,
                          cfg_lora=5.0, gamma=0.3, mix="blend-then-cfg")
    model_form = sample_model(call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=0.3)[0], pos, neg, 5.0)
    assert close(sample_guider(guider), model_form)


def test_autolora_guider_bad_input(env, setup):
    """Each bad guider input is refused with an error naming it, before anything touches the model: an empty set,
    an unknown strategy, a LoRA made for another base model, a non-finite CFG scale."""
    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    good = dict(model=model, positive=pos, negative=neg, cfg_base=3.0, cfg_lora=5.0, gamma=0.5)
    with pytest.raises(ValueError, match="lora_set is empty"):
        call_node("AutoLoraGuider", lora_set=None, **good)
    with pytest.raises(ValueError, match="strategy must be one of"):
        call_node("AutoLoraGuider", lora_set=lora_set(names[:1]), strategy="fastest", **good)
    with pytest.raises(ValueError, match="cfg_lora must be finite"):
        call_node("AutoLoraGuider", lora_set=lora_set(names[:1]), **{**good, "cfg_lora": float("inf")})
    sdxl = build_unet("sdxl", seed=1, config_overrides={"context_dim": 2048})  # SDXL's text width: named by it
    xsd = sdxl.model.state_dict()
    lf.make_lora(xsd, [k for k in xsd if ".input_blocks.8.1." in k and k.endswith("to_k.weight")], "kohya",
                 seed=3).save(env.models_dir / "loras" / "cp_guider_sdxl.safetensors")
    with pytest.raises(ValueError, match="cp_guider_sdxl.safetensors: none of its .* looks made for SDXL"):
        call_node("AutoLoraGuider", lora_set=lora_set(["cp_guider_sdxl.safetensors"]), **good)
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())


def test_gamma_schedules(env):
    guidance = env.engine("nodes.guidance")
    assert [guidance.gamma_at(i, 5, 0.2, 1.0, "constant") for i in range(5)] == [0.2] * 5
    assert [round(guidance.gamma_at(i, 5, 0.0, 1.0, "linear"), 6) for i in range(5)] == [0, 0.25, 0.5, 0.75, 1.0]
    cos = [guidance.gamma_at(i, 5, 1.0, 0.0, "cosine") for i in range(5)]
    assert cos[0] == 1.0 and abs(cos[2] - 0.5) < 1e-12 and abs(cos[4]) < 1e-12
    # an adaptive sampler (dpm_adaptive) can take more steps than the schedule has: γ stays at gamma_end (it went on
    # to 1.67 — and the cosine back down)
    assert guidance.gamma_at(7, 5, 0.0, 1.0, "linear") == 1.0 and guidance.gamma_at(7, 5, 0.0, 1.0, "cosine") == 1.0


def test_autolora_schedule_is_used_per_step(env, setup):
    """A linear schedule from 0 to 1 over 2 steps: step 0 is the base model, step 1 the LoRA model."""
    model, names, pos, neg = setup
    s = lora_set(names[:1])
    (guider,) = call_node("AutoLoraGuider", model=model, lora_set=s, positive=pos, negative=neg, cfg_base=4.0,
                          cfg_lora=4.0, gamma=0.0, gamma_schedule="linear", gamma_end=1.0)
    got = sample_guider(guider, steps=2)
    import comfy.samplers

    base, lora = baked(env, None), baked(env, s)

    class StepwiseReference(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            sigmas = model_options["transformer_options"]["sample_sigmas"]
            m = base if float(timestep[0]) >= float(sigmas[0]) - 1e-6 else lora
            return comfy.samplers.sampling_function(m, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), 4.0, model_options, seed)

    ref = StepwiseReference(model)
    ref.set_conds(pos, neg)
    ref.set_cfg(4.0)
    assert close(got, sample_guider(ref, steps=2))


def test_autolora_bad_input(env, setup, caplog):
    model, names, pos, neg = setup
    s = lora_set(names[:1])
    with pytest.raises(ValueError, match="gamma must be a finite number"):
        call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=float("nan"))
    with caplog.at_level(logging.WARNING):
        call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=5.0)
    assert any("outside the documented sensible range" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="gamma_end must be a finite number"):
        call_node("AutoLoraGuider", model=model, lora_set=s, positive=pos, negative=neg, cfg_base=4.0, cfg_lora=4.0,
                  gamma=0.5, gamma_schedule="linear", gamma_end=float("inf"))


@pytest.mark.parametrize("node", ["LoraSetComposite", "AutoLoraGuidance"])
def test_interrupted_sampling_leaves_model_clean(env, setup, node):
    model, names, pos, neg = setup
    import comfy.sample
    import comfy.samplers
    before = weights_snapshot(model.model)
    extra = {"gamma": 0.5} if node == "AutoLoraGuidance" else {}
    m = call_node(node, model=model, lora_set=lora_set(names[:2]), **extra)[0]

    def interrupt(step, *_):
        if step == 1:
            raise KeyboardInterrupt("cancel")

    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 4)
    with pytest.raises(KeyboardInterrupt):
        comfy.sample.sample_custom(m, comfy.sample.prepare_noise(latent, 1), 4.0, comfy.samplers.sampler_object("euler"),
                                   sigmas, pos, neg, latent, callback=interrupt, disable_pbar=True, seed=1)
    assert all(torch.equal(before[k], model.model.state_dict()[k]) for k in before)


def test_auto_strategy_choice(env, setup):
    """auto (as measured by the benchmarks on a CPU and an H100): mixtures (Composite, AutoLoRA in both forms) run
    unmerged (one batch with per-row LoRAs, no weight copies); one evaluation per call (Composite of one LoRA,
    AutoLoRA at γ = 0 or 1) merged and exact. The rule does not depend on the device; ``strategy_for_run`` adds the
    limits (stacking, core hook LoRAs, free memory on an accelerator: tested separately)."""
    model, names, pos, neg = setup
    composition = env.engine("nodes.composition")
    s = lora_set(names[:2])
    composite = composition.composite_lora_set(model, None, s)[2]
    assert composite.chosen_strategy() == "unmerged"
    single = composition.composite_lora_set(model, None, lora_set(names[:1]))[2]
    assert single.chosen_strategy() == "merged"
    for gamma, expected in ((0.5, "unmerged"), (1.7, "unmerged"), (0.0, "merged"), (1.0, "merged")):
        runtime = composition.autolora_guidance(model, None, s, gamma)[2]
        assert runtime.chosen_strategy() == expected, gamma
    guidance = env.engine("nodes.guidance")
    for gamma, end, schedule, expected in ((0.5, 0.5, "constant", "unmerged"), (1.0, 1.0, "constant", "merged"),
                                           (0.0, 0.0, "constant", "merged"), (0.0, 1.0, "linear", "unmerged"),
                                           (1.0, 0.0, "constant", "merged")):  # constant: gamma_end is not used
        runtime = guidance.autolora_guider(model, s, pos, neg, 4.0, 4.0, gamma, schedule, end).runtime
        assert runtime.chosen_strategy() == expected, (gamma, end)
    assert composite.cached_sets == 0, "Composite never keeps a weight copy per LoRA"


def test_auto_merged_needs_room_for_its_weight_copy(env, setup, caplog):
    """On an accelerator a merged run holds one patched copy of the LoRA'd weights beyond a static LoRA (ComfyUI
    keeps a static LoRA's originals on the offload device, the swapper keeps them in place: 1.2 GB of VRAM on the
    H100 benchmark). auto keeps that copy only where it fits in the free memory next to ComfyUI's estimate for one
    model call (cond + uncond rows); otherwise it swaps in place (``merged-lowvram``: only the LoRA factors on the
    device, the originals in host memory), and where the host cannot hold the originals either, runs unmerged; it
    logs why. An explicit ``merged`` is kept; on a CPU (where a static LoRA holds both copies as well) memory does
    not limit the choice."""
    import comfy.utils
    model, names, _, _ = setup
    composition = env.engine("nodes.composition")
    base = model.model
    runtime = composition.switch_lora_set(model, None, lora_set(names), 2, "paper")[2]
    weights = [comfy.utils.get_attr(base, k) for k in {k for option in runtime.options for k in option}]
    copy = runtime.merged_copy_bytes(base)
    factors = {id(t): t for option in runtime.options for patches in option.values() for p in patches
               for t in p[1].weights[:2]}  # every LoRA up and down, held in fp32 on the device during a run
    assert copy == (sum(w.numel() * 4 for w in weights) + 2 * 4 * max(w.numel() for w in weights)
                    + sum(4 * t.numel() for t in factors.values()))
    shape, cuda = (1, 4, 8, 8), torch.device("cuda")
    room = copy + base.memory_required([2, 4, 8, 8])
    runtime.free_memory = lambda device: room
    assert runtime.strategy_for_run(None, base, cuda, shape) == "merged"
    inplace = env.engine("nodes.runtime.inplace_swap")
    originals = inplace.backup_bytes(base, runtime.options)
    assert originals >= sum(w.numel() * 4 for w in weights)
    runtime.free_memory = lambda device: room - 1 if device.type == "cuda" else originals
    with caplog.at_level(logging.INFO, logger="LoRA Composer"):
        assert runtime.strategy_for_run(None, base, cuda, shape) == "merged-lowvram"
    assert "does not fit" in caplog.text and f"{copy / 2**20:.0f} MiB" in caplog.text and "in place" in caplog.text
    caplog.clear()
    runtime.free_memory = lambda device: room - 1 if device.type == "cuda" else originals - 1
    with caplog.at_level(logging.INFO, logger="LoRA Composer"):
        assert runtime.strategy_for_run(None, base, cuda, shape) == "unmerged"
    assert "not in place either" in caplog.text and "free host memory" in caplog.text
    low = composition.switch_lora_set(model, None, lora_set(names), 2, "paper", strategy="merged-lowvram")[2]
    low.free_memory = lambda device: 0
    assert low.strategy_for_run(None, base, cuda, shape) == "merged-lowvram"
    assert low.strategy_for_run(None, base, torch.device("cpu"), shape) == "merged-lowvram"
    assert runtime.strategy_for_run(None, base, torch.device("cpu"), shape) == "merged"
    explicit = composition.switch_lora_set(model, None, lora_set(names), 2, "paper", strategy="merged")[2]
    explicit.free_memory = lambda device: 0
    assert explicit.strategy_for_run(None, base, cuda, shape) == "merged"


@pytest.mark.parametrize("node", ["AutoLoraGuidance", "AutoLoraGuider"])
def test_dora_after_another_lora_on_a_layer_runs_in_core_order(env, setup, node):
    """AutoLoRA's LoRA rows apply the whole set. Core patches a set's LoRAs in order, so a DoRA after another LoRA on
    the same layer normalises the weight that LoRA made: the hooks' sum of per-LoRA deltas of the base weight was
    1e-3 off (auto at 0 < γ < 1, the guider always). Such sets now merge (exact), with the reason logged; the other
    order adds up and stays unmerged. Oracle: merged = LoraSetApply's core patching, checked at γ = 1 too."""
    model, names, pos, neg = setup
    sd = model.model.state_dict()
    layers = [k for k in lf.pick_targets(sd, ("attn",)) if k.endswith("to_q.weight")]
    lf.make_lora(sd, layers, "kohya", rank=2, alpha=1.0, seed=140).amplified(8).save(
        env.models_dir / "loras" / "ord_plain.safetensors")
    lf.make_dora(sd, layers, rank=2, alpha=2.0, seed=141).save(env.models_dir / "loras" / "ord_dora.safetensors")
    before = weights_snapshot(model.model)
    runs = {}
    for order in (("ord_plain.safetensors", "ord_dora.safetensors"), ("ord_dora.safetensors", "ord_plain.safetensors")):
        s = lora_set(list(order))
        for strategy in ("auto", "merged"):
            if node == "AutoLoraGuider":
                (guider,) = call_node(node, model=model, lora_set=s, positive=pos, negative=neg, cfg_base=3.0,
                                      cfg_lora=5.0, gamma=0.6, strategy=strategy)
                runs[order, strategy] = sample_guider(guider, steps=3), guider.runtime.strategies[-1]
            else:
                m = call_node(node, model=model, lora_set=s, gamma=0.6, strategy=strategy)[0]
                runs[order, strategy] = sample_model(m, pos, neg, MODEL_CFG, steps=3), None
        assert close(runs[order, "auto"][0], runs[order, "merged"][0], rel=REL), order
    if node == "AutoLoraGuider":
        assert runs[("ord_plain.safetensors", "ord_dora.safetensors"), "auto"][1] == "merged"
        assert runs[("ord_dora.safetensors", "ord_plain.safetensors"), "auto"][1] == "unmerged"
    s = lora_set(["ord_plain.safetensors", "ord_dora.safetensors"])
    static = call_node("LoraSetApply", model=model, lora_set=s)[0]
    full = call_node("AutoLoraGuidance", model=model, lora_set=s, gamma=1.0, strategy="unmerged")[0]
    assert close(sample_model(full, pos, neg, MODEL_CFG, steps=3), sample_model(static, pos, neg, MODEL_CFG, steps=3),
                 rel=REL)
    import comfy.model_management as mm

    mm.unload_all_models()
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())
