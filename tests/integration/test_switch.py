"""LoRA Switch against an independent reference: sampling one step at a time, the model re-patched
with ComfyUI's own LoRA patching (LoraSetApply → add_patches) before each step. Same seed → the same
latents (fp32, 1e-5 relative; not bitwise because the reference round-trips the latent through
process_latent_out/in between its one-step runs).
"""
from __future__ import annotations

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set as lora_set
from harness.sampling import baked_model, reference, run_custom, sigmas_for
from harness.tiny_models import build_sd15_clip, build_unet, weights_snapshot

REL = 1e-5


@pytest.fixture(scope="module")
def setup(env):
    model, clip = build_unet("sd15", seed=51), build_sd15_clip(seed=52)
    sd = model.model.state_dict()
    names = []
    for i, kinds in enumerate([("attn", "proj"), ("attn", "ff"), ("attn", "conv3")]):
        lora = lf.make_lora(sd, lf.pick_targets(sd, kinds), "kohya", rank=2 + i, alpha=1.0, seed=60 + i)
        lora.amplified(8)  # strong deltas so that a wrong LoRA at any step is visible
        name = f"sw_{i}.safetensors"
        lora.save(env.models_dir / "loras" / name)
        names.append(name)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return model, names, pos, neg


def switch(model, s, every, schedule, strategy="auto"):
    out = call_node("LoraSetSwitch", model=model, lora_set=s, switch_every=every, schedule=schedule, strategy=strategy)
    return out[0]


def close(a, b, rel=REL):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("schedule, expected", [
    ("paper", [0, 0, 1, 1, 2, 2, 0, 0, 1]),
    ("reference-code", [0, 0, 0, 1, 1, 2, 2, 0, 0]),
])
def test_schedules(env, schedule, expected):
    schedules = env.engine("nodes.runtime.schedules")
    assert [schedules.switch_index(i, 3, 2, schedule) for i in range(9)] == expected
    assert [schedules.switch_index(i, 2, 5, "reference-code") for i in range(12)] == [0] * 6 + [1] * 5 + [0]


STRENGTHS = [1.0, 0.7, -0.5]


def switch_and_reference(env, setup, sampler_name, schedule, every, strategy="auto", after_switch=None):
    """(Switch's latent, the step-by-step reference's, the runtime) for the 3 LoRAs at ``STRENGTHS``, 6 steps. The
    Switch run samples under ``torch.inference_mode``, as ComfyUI's executor runs nodes; ``after_switch(runtime)``
    runs before the reference (whose core patching puts new Parameter objects into the model)."""
    model, names, pos, neg = setup
    schedules = env.engine("nodes.runtime.schedules")
    sig = sigmas_for(model, STEPS)
    latent = torch.zeros(1, 4, 8, 8)
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, 3)
    sw, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(model, None, lora_set(names, STRENGTHS),
                                                                       every, schedule, strategy)
    with torch.inference_mode():
        got = run_custom(sw, sampler_name, sig, pos, neg, noise, latent)
    if after_switch is not None:
        after_switch(runtime)
    want = reference(model, names, STRENGTHS, lambda i: schedules.switch_index(i, 3, every, schedule), sampler_name,
                     sig, pos, neg, latent)
    return got, want, runtime


@pytest.mark.parametrize("sampler_name", ["euler", "heun", "dpm_2"])
@pytest.mark.parametrize("schedule", ["paper", "reference-code"])
def test_switch_equals_step_by_step_reference(env, setup, sampler_name, schedule):
    model, names, pos, neg = setup
    got, want, _ = switch_and_reference(env, setup, sampler_name, schedule, 2)
    assert close(got, want), (got - want).abs().max().item()
    wrong = reference(model, names, STRENGTHS, lambda i: (i // 2 + 1) % 3, sampler_name, sigmas_for(model, 6), pos,
                      neg, torch.zeros(1, 4, 8, 8))
    assert not close(got, wrong), "the test cannot tell LoRAs apart"


@pytest.mark.parametrize("sampler_name", ["euler", "heun"])
def test_merged_lowvram_equals_step_by_step_reference(env, setup, sampler_name, monkeypatch):
    """The in-place swap (``merged-lowvram``: W += ΔW_new − ΔW_old in the model's own weights, originals in host
    memory) against the same reference, switching at every step so that incremental updates and rewrites from the
    originals (here every 2nd update) both happen; the model's Parameters are the same objects throughout (in-place
    writes to normal tensors under ``torch.inference_mode``)."""
    model = setup[0]
    before = dict(model.model.named_parameters())

    def same_parameters(runtime):
        assert runtime.strategies[-1] == "merged-lowvram"
        assert all(v is before[k] for k, v in model.model.named_parameters())

    monkeypatch.setitem(env.engine("nodes.runtime.inplace_swap").REFRESH_EVERY, torch.float32, 2)
    got, want, _ = switch_and_reference(env, setup, sampler_name, "paper", 1, "merged-lowvram", same_parameters)
    assert close(got, want), (got - want).abs().max().item()


def test_switch_on_a_statically_patched_model(env, setup):
    """Switch on top of a LoRA that ComfyUI patches statically (``LoraSetApply`` → core's ``add_patches``): both
    merged forms start from core's patched weights (the copy computes from them, the in-place form writes into core's
    patched Parameters and copies their values back at the end); they agree within 1e-5, and once core unpatches the
    base model's weights are bit-identical to before."""
    import comfy.model_management as mm
    import comfy.sample
    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    static = call_node("LoraSetApply", model=model, lora_set=lora_set(names[2:], [0.6]))[0]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 6)
    outs = {strategy: run_custom(switch(static, lora_set(names[:2], [1.0, 0.7]), 1, "paper", strategy), "euler",
                                 sigmas_for(model, 4), pos, neg, noise, latent)
            for strategy in ("merged", "merged-lowvram", "unmerged")}
    assert close(outs["merged-lowvram"], outs["merged"])
    assert close(outs["unmerged"], outs["merged"], rel=1e-4)  # adapters on outputs: float order differs
    mm.unload_all_models()
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_heun_second_stage_stays_on_its_step(env, setup):
    model, names, pos, neg = setup
    import comfy.sample
    sig = sigmas_for(model, 4)
    latent = torch.zeros(1, 4, 8, 8)
    sw, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(model, None, lora_set(names), 1, "paper")
    run_custom(sw, "heun", sig, pos, neg, comfy.sample.prepare_noise(latent, 1), latent)
    history = runtime.history
    assert history[-1] == [0, 0, 1, 1, 2, 2, 3]  # two calls per step, none after the last (σ → 0)


def test_partial_denoise_counts_steps_run(env, setup):
    """img2img (denoise < 1): step indices are relative to the truncated schedule."""
    model, names, pos, neg = setup
    schedules = env.engine("nodes.runtime.schedules")
    sig = sigmas_for(model, 5, denoise=0.6)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    import comfy.sample
    noise = comfy.sample.prepare_noise(latent, 3)
    got = run_custom(switch(model, lora_set(names), 2, "paper"), "euler", sig, pos, neg, noise, latent)
    want = reference(model, names, [1.0] * 3, lambda i: schedules.switch_index(i, 3, 2, "paper"), "euler", sig, pos,
                     neg, latent)
    assert close(got, want)


@pytest.mark.parametrize("sampler_name", ["euler", "dpmpp_2m", "euler_ancestral"])
def test_merged_and_unmerged_strategies_agree(env, setup, sampler_name):
    model, names, pos, neg = setup
    import comfy.sample
    sig = sigmas_for(model, 5)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 4)
    s = lora_set(names, [0.9, 1.1, 0.6])
    merged = run_custom(switch(model, s, 2, "paper", "merged"), sampler_name, sig, pos, neg, noise, latent)
    unmerged = run_custom(switch(model, s, 2, "paper", "unmerged"), sampler_name, sig, pos, neg, noise, latent)
    assert close(unmerged, merged, rel=1e-4)  # different float summation order; argued in the README


def test_one_entry_switch_equals_static_apply_exactly(env, setup):
    model, names, pos, neg = setup
    import comfy.sample
    s = lora_set(names[:1], [0.8])
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 5)
    static = call_node("LoraSetApply", model=model, lora_set=s)[0]
    a = comfy.sample.sample(static, noise, 4, 5.0, "euler", "normal", pos, neg, latent, disable_pbar=True, seed=5)
    b = comfy.sample.sample(switch(model, s, 2, "paper"), noise, 4, 5.0, "euler", "normal", pos, neg, latent,
                            disable_pbar=True, seed=5)
    assert torch.equal(a, b)


def test_ksampler_nodes_and_clean_model_afterwards(env, setup):
    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    sw = switch(model, lora_set(names), 1, "paper")
    (a,) = call_node("KSampler", model=sw, seed=1, steps=3, cfg=4.0, sampler_name="euler", scheduler="normal",
                     positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    (b,) = call_node("KSamplerAdvanced", model=sw, add_noise="enable", noise_seed=1, steps=4, cfg=4.0,
                     sampler_name="euler", scheduler="normal", positive=pos, negative=neg, latent_image=latent,
                     start_at_step=1, end_at_step=10000, return_with_leftover_noise="disable")
    assert a["samples"].isfinite().all() and b["samples"].isfinite().all()
    import comfy.model_management as mm
    for state in (model.model.state_dict(),):
        assert all(torch.equal(before[k], state[k]) for k in before)
    mm.unload_all_models()
    assert all(torch.equal(before[k], model.model.state_dict()[k]) for k in before)
    assert not any("lora_composer" in k for v in model.wrappers.values() for k in v), "wrappers leaked onto input"


@pytest.mark.parametrize("strategy", ["merged", "merged-lowvram", "unmerged"])
def test_interrupted_sampling_leaves_model_clean(env, setup, strategy):
    model, names, pos, neg = setup
    import comfy.sample
    before = weights_snapshot(model.model)
    hooks_before = {n: len(m._forward_hooks) for n, m in model.model.named_modules()}

    def interrupt(step, *_):
        if step == 1:
            raise KeyboardInterrupt("user pressed cancel")

    latent = torch.zeros(1, 4, 8, 8)
    with pytest.raises(KeyboardInterrupt):
        run_custom(switch(model, lora_set(names), 1, "paper", strategy), "euler", sigmas_for(model, 4), pos, neg,
                   comfy.sample.prepare_noise(latent, 1), latent, callback=interrupt)
    assert all(torch.equal(before[k], model.model.state_dict()[k]) for k in before)
    assert {n: len(m._forward_hooks) for n, m in model.model.named_modules()} == hooks_before


def test_bad_input(env, setup):
    model, names, pos, neg = setup
    pack_set = env.engine("nodes.lora_set")
    with pytest.raises(ValueError, match="lora_set is empty"):
        call_node("LoraSetSwitch", model=model, lora_set=pack_set.LoraSet(), switch_every=2, schedule="paper")
    with pytest.raises(ValueError, match="switch_every must be ≥ 1"):
        call_node("LoraSetSwitch", model=model, lora_set=lora_set(names), switch_every=0, schedule="paper")
    sdxl = build_unet("sdxl", seed=1)
    xsd = sdxl.model.state_dict()
    lf.make_lora(xsd, [k for k in xsd if ".input_blocks.7.1." in k and k.endswith("to_k.weight")], "kohya",
                 seed=2).save(env.models_dir / "loras" / "sw_sdxl.safetensors")
    (mixed,) = call_node("LoraSetLoad", lora_name="sw_sdxl.safetensors", strength_model=1.0, strength_clip=1.0,
                         lora_set=lora_set(names[:1]))
    with pytest.raises(ValueError, match="sw_sdxl.safetensors: none of its"):
        call_node("LoraSetSwitch", model=model, lora_set=mixed, switch_every=2, schedule="paper")


def test_dense_formats_switch_unmerged_equals_merged(env, setup):
    """LoHa and DoRA go through exact dense deltas in the unmerged runtime."""
    model, names, pos, neg = setup
    import comfy.sample
    sd = model.model.state_dict()
    lf.make_loha(sd, lf.pick_targets(sd, ("attn", "conv3")), seed=70).save(env.models_dir / "loras" / "sw_loha.safetensors")
    lf.make_dora(sd, lf.pick_targets(sd, ("attn",)), seed=71).save(env.models_dir / "loras" / "sw_dora.safetensors")
    s = lora_set(["sw_loha.safetensors", "sw_dora.safetensors", names[0]], [1.5, 1.0, 0.5])
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 8)
    sig = sigmas_for(model, 4)
    merged = run_custom(switch(model, s, 1, "paper", "merged"), "euler", sig, pos, neg, noise, latent)
    unmerged = run_custom(switch(model, s, 1, "paper", "unmerged"), "euler", sig, pos, neg, noise, latent)
    assert close(unmerged, merged, rel=1e-4)


ONE_CALL_PER_STEP = ["dpmpp_2m", "uni_pc", "uni_pc_bh2", "deis", "ipndm", "ipndm_v", "lcm", "ddim", "res_multistep",
                     "gradient_estimation", "dpmpp_2m_sde", "dpmpp_3m_sde", "euler_ancestral"]
STEPS = 6


# Heun-shaped samplers that read the guider's model_patcher (SDE noise, SA-Solver's schedule): the step probe failed
# on them, and the sigma rule put the second evaluation (at σ_{i+1}) on the next step.
PATCHER_READING = {"exp_heun_2_x0": 2, "exp_heun_2_x0_sde": 2, "seeds_2": 2, "dpmpp_sde": 2, "seeds_3": 3}


def calls_per_step(sampler_name: str) -> list[int]:
    """How many model calls each of the 6 steps makes, read off the sampler's code: one for most; heunpp2 (Heun++,
    which also reads σ_0 and σ_{i+2}, so no one-step restart can reproduce it) makes 3, then 2 for the step before
    the last, then 1; the PATCHER_READING ones n per step and 1 at the last (σ → 0); sa_solver_pece 1, then 2 (its
    corrector's evaluation at σ_{i+1} after the step's own)."""
    if sampler_name == "heunpp2":
        return [3] * (STEPS - 2) + [2, 1]
    if sampler_name in PATCHER_READING:
        return [PATCHER_READING[sampler_name]] * (STEPS - 1) + [1]
    if sampler_name == "sa_solver_pece":
        return [1] + [2] * (STEPS - 1)
    return [1] * STEPS


def baked_per_lora(env, names) -> list:
    """Per LoRA of the fixture's set (at its strength), an independent copy of the UNet with it baked in by core
    math: the references' models."""
    return [baked_model(env.engine, build_unet("sd15", seed=51), lora_set([name], [strength]))
            for name, strength in zip(names, STRENGTHS)]


@pytest.mark.parametrize("sampler_name", ONE_CALL_PER_STEP + ["heunpp2", *PATCHER_READING, "sa_solver_pece"])
def test_multistep_samplers_switch_at_their_steps(env, setup, sampler_name):
    """Samplers that keep a history between steps or read the whole schedule (the step-by-step reference cannot
    restart them): an independent reference is a guider whose model calls run the UNet with LoRA schedule(step)
    baked in by core math, the step of each call read off the sampler's code (``calls_per_step``), not from the
    runtime's probe. Same seed, same latents (1e-5)."""
    import comfy.sample
    import comfy.samplers

    if sampler_name not in comfy.samplers.SAMPLER_NAMES:
        pytest.skip(f"{sampler_name} is not in this ComfyUI")
    model, names, pos, neg = setup
    schedules = env.engine("nodes.runtime.schedules")
    baked = baked_per_lora(env, names)
    active = [schedules.switch_index(step, 3, 2, "paper")
              for step, calls in enumerate(calls_per_step(sampler_name)) for _ in range(calls)]

    class PerCall(comfy.samplers.CFGGuider):
        calls = 0

        def predict_noise(self, x, timestep, model_options={}, seed=None):
            m = baked[active[min(PerCall.calls, len(active) - 1)]]
            PerCall.calls += 1
            return comfy.samplers.sampling_function(m, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), self.cfg, model_options=model_options,
                                                    seed=seed)

    sig = sigmas_for(model, STEPS)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    got = run_custom(switch(model, lora_set(names, STRENGTHS), 2, "paper"), sampler_name, sig, pos, neg, noise, latent)
    ref = PerCall(model)
    ref.set_conds(pos, neg)
    ref.set_cfg(4.0)
    want = ref.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sig, disable_pbar=True, seed=3)
    assert PerCall.calls == len(active), f"{sampler_name} made {PerCall.calls} model calls, not {len(active)}"
    assert close(got, want), (got - want).abs().max().item()


def test_dpm_adaptive_steps_are_its_callbacks(env, setup):
    """dpm_adaptive calls back after all evaluations of an accepted step (the others after the first), and how many
    steps it takes depends on the model: a call's step is the index of the callback that follows it. The probe's
    zero model took fewer steps, so calls were one or two steps early and the sigma rule then sent the index back
    from 5 to 2. Reference: a guider that counts the real run's callbacks itself."""
    import comfy.sample
    import comfy.samplers

    model, names, pos, neg = setup
    schedules = env.engine("nodes.runtime.schedules")
    baked = baked_per_lora(env, names)
    callbacks = []

    class NextCallback(comfy.samplers.CFGGuider):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            m = baked[schedules.switch_index(len(callbacks), 3, 1, "paper")]
            return comfy.samplers.sampling_function(m, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), self.cfg, model_options=model_options,
                                                    seed=seed)

    sig = sigmas_for(model, 4)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    sw, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(model, None, lora_set(names, STRENGTHS), 1,
                                                                        "paper")
    got = run_custom(sw, "dpm_adaptive", sig, pos, neg, noise, latent)
    steps = runtime.history[-1]
    assert steps == sorted(steps) and steps[-1] >= 4, f"monotonic, past the 4-step schedule: {steps}"
    ref = NextCallback(model)
    ref.set_conds(pos, neg)
    ref.set_cfg(4.0)
    want = ref.sample(noise, latent, comfy.samplers.sampler_object("dpm_adaptive"), sig, disable_pbar=True, seed=3,
                      callback=lambda i, *_: callbacks.append(i))
    assert close(got, want), (got - want).abs().max().item()
