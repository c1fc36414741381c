"""LoRAs on quantized base models, through the adapter runtime.

An "fp8 scaled" checkpoint loads with core's quantized Linear layers (0.9.x ``mixed_precision_ops``:
``QuantizedTensor`` weights; 0.3.x ``scaled_fp8_ops``: fp8 weights and a scale), which core patches through the
layer's own ``convert_weight`` / ``set_weight``. The merged strategies do the same (bit-identical weights to core's
static LoRA, Switch = core's step-by-step re-patching); before this file existed ``auto`` Switch raised
NotImplementedError on such models.

Deliberate difference from core (listed here, as for every such difference): *unmerged* execution adds the LoRA to
the layer's output in the compute dtype, so the LoRA is not rounded to fp8 with the weight as core's patching rounds
``W + ΔW``. Its oracle is therefore the LoRA merged in fp32 into the dequantized weights (the fp32 "twin" of the
quantized model), 1e-5; against core's fp8 re-patching it differs by that rounding (bounded below).

Weights some other pack stores in its own form (GGUF's packed blocks; here an int8 weight-only layer written for
this test) cannot be merged by anyone but that pack: the runtime names them and runs unmerged.
"""
from __future__ import annotations

import logging

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set
from harness.sampling import cat_conds, reference, run_custom, sigmas_for
from harness.tiny_models import (build_quantized_unet, build_sd15_clip, build_unet, quantized_ops_missing,
                                 weights_snapshot)

REL = 1e-5
SEED = 21
STRENGTHS = [1.0, 0.8]


@pytest.fixture(autouse=True)
def _inference_mode():
    """Everything under inference mode, as ComfyUI's executor runs prompts (the quantized model is loaded under it
    too): on 0.9.x core's own unpatching of ``QuantizedTensor`` weights fails when a prompt mixes tensors made inside
    and outside it ("Cannot set version_counter for inference tensor"), which no real prompt does. The models are
    unloaded before leaving it, so the suite's own clean-up has nothing left to unpatch outside."""
    import comfy.model_management as mm

    with torch.inference_mode():
        yield
        mm.unload_all_models()


def close(a, b, rel=REL):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


def raw(snapshot: dict) -> dict:
    """State-dict tensors as comparable bytes (fp8 has no ``torch.equal`` on every build)."""
    return {k: v.contiguous().view(torch.uint8) if v.dtype.itemsize == 1 else v for k, v in snapshot.items()}


def same_weights(a: dict, b: dict) -> bool:
    a, b = raw(a), raw(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def base_weights(model) -> dict:
    """The model's weights with nothing loaded: core's static patches (the references') taken out again."""
    import comfy.model_management as mm

    mm.unload_all_models()
    return weights_snapshot(model.model)


def dequantized_twin(model):
    """A plain fp32 tiny UNet holding the quantized model's weights as the layers compute with them (dequantized by
    each layer's own ``convert_weight``, what core's patching starts from)."""
    from comfy.model_patcher import get_key_weight

    twin = build_unet("sd15", SEED)
    with torch.no_grad():
        for key, param in twin.model.named_parameters():
            weight, _set_func, convert = get_key_weight(model.model, key)
            value = weight.to(torch.float32, copy=True)
            param.copy_(convert(value, inplace=True) if convert is not None else value)
    return twin


@pytest.fixture(scope="module")
def loras(env):
    """Two LoRAs on quantized Linear layers and a plain 1×1 conv, and the conditioning: (names, pos, neg)."""
    sd = build_unet("sd15", SEED).model.state_dict()  # same keys and shapes as the quantized model, plain tensors
    targets = lf.pick_targets(sd, ("attn", "ff", "proj"))
    names = lf.save_strong_loras(sd, targets, env.models_dir / "loras", "quant", seeds=(80, 81), ranks=(2, 3))
    pos, neg = cat_conds()
    return names, pos, neg, targets


@pytest.fixture(scope="module", params=["scaled", "fp8", "nvfp4"])
def setup(request, loras):
    """(model, names, pos, neg): the tiny UNet with quantized Linear layers: fp8 scaled (core's quantized ops), plain
    fp8, or nvfp4 (0.9.x: 4-bit, packed two to a byte, whose state-dict entry has another shape than the layer)."""
    import comfy.ops

    names, pos, neg, targets = loras
    missing = quantized_ops_missing()
    if request.param != "fp8" and missing:
        pytest.skip(missing)
    if request.param == "nvfp4" and not hasattr(comfy.ops, "mixed_precision_ops"):
        pytest.skip("nvfp4 layers exist from ComfyUI 0.9 on")
    with torch.inference_mode():
        model, fp8_keys = build_quantized_unet(SEED, form=request.param)
    assert any(t in fp8_keys for t in targets) and any(t not in fp8_keys for t in targets)
    model.form, model.fp8_keys = request.param, set(fp8_keys)
    return model, names, pos, neg


def sample_switch(env, model, names, pos, neg, strategy):
    """(latent, runtime) of a Switch run (τ = 2, 4 steps, euler)."""
    import comfy.sample

    sw, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(
        model, None, load_set(names, STRENGTHS[:len(names)]), 2, "paper", strategy)
    latent = torch.zeros(1, 4, 8, 8)
    out = run_custom(sw, "euler", sigmas_for(model, 4), pos, neg, comfy.sample.prepare_noise(latent, 3), latent)
    return out, runtime


def core_repatching(model, names, pos, neg):
    return reference(model, names, STRENGTHS, lambda i: (i // 2) % 2, "euler", sigmas_for(model, 4), pos, neg,
                     torch.zeros(1, 4, 8, 8))


def test_merged_swap_writes_core_static_lora_bit_for_bit(env, setup):
    """Each LoRA swapped in = core's static LoRA on the quantized layers (its set_weight, the key's seed)."""
    from harness.tiny_models import patched_weights

    model, names, _, _ = setup
    ms = env.engine("nodes.runtime.merged_swap")
    _, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(model, None, load_set(names, STRENGTHS), 2,
                                                                       "paper", "merged")
    before = base_weights(model)
    assert ms.merge_obstacle(model.model, runtime.options) is None
    for j in (0, 1):
        (single,) = call_node("LoraSetLoad", lora_name=names[j], strength_model=STRENGTHS[j], strength_clip=1.0)
        want = patched_weights(call_node("LoraSetApply", model=model, lora_set=single)[0])
        swapper = ms.MergedSwapper(model.model, runtime.options)
        swapper.activate(1 - j)
        swapper.activate(j)  # written over the other LoRA's copy: no trace of it may remain
        got = weights_snapshot(model.model)
        swapper.restore()
        assert same_weights(got, want), [k for k in raw(got) if not torch.equal(raw(got)[k], raw(want)[k])][:5]
    assert same_weights(base_weights(model), before)


def test_merged_copy_is_sized_as_stored(env, setup):
    """The patched copy ``auto`` weighs against free VRAM counts the bytes (and scales) a quantized weight holds, not
    the fp32 it reports as its dtype (0.9.x's QuantizedTensor): four to eight times too much would run such models
    unmerged on cards where the copy fits."""
    model, names, _, _ = setup
    ms = env.engine("nodes.runtime.merged_swap")
    _, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(model, None, load_set(names, STRENGTHS), 2,
                                                                       "paper", "auto")
    import comfy.utils

    keys = ms.patched_keys(runtime.options)
    numel = {k: comfy.utils.get_attr(build_unet("sd15", SEED).model, k).numel() for k in keys}
    scratch = 2 * 4 * max(numel.values())
    # per element: fp8 1 byte; nvfp4 half a byte plus fp8 block scales (one per 16, padded: at most 1 byte in all);
    # the plain conv's fp32 4 bytes; plus at most an fp32 scale per layer
    low, high = (0.5, 1.0) if model.form == "nvfp4" else (1.0, 1.0)
    held = ms.held_bytes(model.model, runtime.options) - scratch
    least = sum(n * (low if k in model.fp8_keys else 4) for k, n in numel.items())
    most = sum(n * (high if k in model.fp8_keys else 4) for k, n in numel.items()) + 4 * len(keys)
    assert least <= held <= most, (least, held, most)


@pytest.mark.parametrize("strategy", ["auto", "merged"])
def test_switch_on_quantized_model_equals_core_repatching(env, setup, strategy):
    model, names, pos, neg = setup
    before = base_weights(model)
    got, runtime = sample_switch(env, model, names, pos, neg, strategy)
    assert runtime.strategies == ["merged"]
    want = core_repatching(model, names, pos, neg)
    assert close(got, want), (got - want).abs().max().item()
    assert same_weights(base_weights(model), before)


def test_unmerged_on_quantized_model_adds_the_lora_unrounded(env, setup):
    """Unmerged equals the LoRA merged in fp32 into the dequantized weights; core's fp8 re-patching differs from that
    by its rounding of W + ΔW."""
    model, names, pos, neg = setup
    before = base_weights(model)
    want, _ = sample_switch(env, dequantized_twin(model), names, pos, neg, "merged")
    got, runtime = sample_switch(env, model, names, pos, neg, "unmerged")
    assert runtime.strategies == ["unmerged"]
    assert close(got, want), (got - want).abs().max().item()
    core = core_repatching(model, names, pos, neg)
    rounding = (core - want).abs().max().item() / want.abs().max().item()
    assert 0 < rounding < 1e-3, rounding  # core's fp8 rounding of the patched weights, not a wrong LoRA
    assert same_weights(base_weights(model), before)


def test_merged_lowvram_on_quantized_model(env, setup, caplog):
    """Plain fp8 weights are rewritten in place from their originals with core's arithmetic (= core's re-patching);
    core's quantized layers cannot be written in place: those run unmerged, with a warning that says why."""
    model, names, pos, neg = setup
    before = base_weights(model)
    with caplog.at_level(logging.WARNING, logger="LoRA Composer"):
        got, runtime = sample_switch(env, model, names, pos, neg, "merged-lowvram")
    if model.form == "fp8":
        assert runtime.strategies == ["merged-lowvram"]
        want = core_repatching(model, names, pos, neg)
    else:
        assert runtime.strategies == ["unmerged"]
        assert "cannot swap weights in place" in caplog.text and "quantized" in caplog.text
        want, _ = sample_switch(env, dequantized_twin(model), names, pos, neg, "merged")
    assert close(got, want), (got - want).abs().max().item()
    assert same_weights(base_weights(model), before)


@pytest.mark.parametrize("strategy", ["unmerged", "merged"])
def test_dense_formats_on_quantized_model(env, setup, strategy):
    """DoRA (whose ΔW depends on the weight's norm) and LoHa take the exact dense path when unmerged: their deltas
    are computed from the dequantized weights, as core computes them (equal to the twin); merged they equal core's
    re-patching."""
    model, _, pos, neg = setup
    sd = build_unet("sd15", SEED).model.state_dict()
    targets = [k for k in lf.pick_targets(sd, ("attn",))]
    names = [f"quant_dora_{model.form}.safetensors", f"quant_loha_{model.form}.safetensors"]
    dora = lf.make_dora(dequantized_twin(model).model.state_dict(), targets, seed=90)
    dora.amplified(8)
    dora.save(env.models_dir / "loras" / names[0])
    lf.make_loha(sd, targets, seed=91).amplified(8, ("hada_w1_a",)).save(env.models_dir / "loras" / names[1])
    before = base_weights(model)
    got, runtime = sample_switch(env, model, names, pos, neg, strategy)
    assert runtime.strategies == [strategy]
    if strategy == "unmerged":
        want, _ = sample_switch(env, dequantized_twin(model), names, pos, neg, "merged")
    else:
        want = core_repatching(model, names, pos, neg)
    assert close(got, want), (got - want).abs().max().item()
    assert same_weights(base_weights(model), before)


def test_merge_on_quantized_model_uses_the_dequantized_weights(env, setup):
    """LoraSetMerge's exact deltas (here DoRA's, which depend on the weight) on the quantized model equal those on
    its dequantized twin: the weight they start from is the one the layer computes with."""
    model, _, _, _ = setup
    sd = build_unet("sd15", SEED).model.state_dict()
    twin = dequantized_twin(model)
    name = f"quant_merge_dora_{model.form}.safetensors"
    lf.make_dora(twin.model.state_dict(), lf.pick_targets(sd, ("attn",)), seed=92).save(env.models_dir / "loras" / name)
    merged = {}
    for label, m in (("quantized", model), ("twin", twin)):
        (lora_set, _report) = call_node("LoraSetMerge", model=m, lora_set=load_set([name], [0.9]), method="linear",
                                        rank=0, density=0.5, seed=0)
        merged[label] = lora_set.entries[0].tensors()
    assert merged["quantized"].keys() == merged["twin"].keys()
    for k, t in merged["twin"].items():
        assert close(merged["quantized"][k], t), k


def test_lora_training_on_quantized_model(env, setup):
    """LoraTrain finds the quantized Linear layers (0.9.x's are no ``torch.nn.Linear``: it found none and said the
    preset "matches no layer") and trains through their own forward: the same LoRA as on the dequantized twin, whose
    weights are exactly what those layers compute with; the model is untouched. SGD, whose steps are proportional to
    the gradient: 0.3.x's scaled-fp8 forward scales the input rather than the weight in some layers, a rounding-level
    difference that Adam's first steps (±lr per element, whatever the gradient's size) would blow up."""
    import comfy.utils
    from harness.training import PROMPT, synthetic_latents

    model, _, _, _ = setup
    before = base_weights(model)
    trained = {}
    progress, comfy.utils.PROGRESS_BAR_ENABLED = comfy.utils.PROGRESS_BAR_ENABLED, False
    try:
        for label, m in (("quantized", model), ("twin", dequantized_twin(model))):
            (lora_set, _curve, report) = call_node(
                "LoraTrain", model=m, clip=build_sd15_clip(seed=4), instance_prompt=PROMPT, identifier="sks",
                parameterisation="standard LoRA", targets="attention", rank=4, alpha=0.0, steps=2,
                learning_rate=1.0, batch_size=2, optimizer="SGD", lambda_prior=0.0, seed=0,
                gradient_checkpointing=False, training_dtype="auto", resolution=0, checkpoint_every=0,
                checkpoint_prefix=f"training/quantized_{model.form}_{label}", latents={"samples": synthetic_latents()})
            assert "56 UNet" in report, report
            trained[label] = lora_set.entries[0].tensors()
    finally:
        comfy.utils.PROGRESS_BAR_ENABLED = progress
    assert trained["quantized"].keys() == trained["twin"].keys()
    for k, t in trained["twin"].items():
        assert close(trained["quantized"][k], t), k
    assert same_weights(base_weights(model), before)


def test_lidb_targets_on_quantized_model(env, setup):
    """The hypernetwork's LiDB layers take each layer's computed shape (nvfp4's state-dict entry is the packed
    ``[out, in / 2]`` bytes): the same spec as on the dequantized twin."""
    model, _, _, _ = setup
    lidb = env.engine("nodes.hypernet.lidb")
    assert lidb.lidb_spec_for_model(model) == lidb.lidb_spec_for_model(dequantized_twin(model))


def test_composite_on_quantized_model(env, setup):
    """Composite (auto: one batch, unmerged) = Composite on the dequantized twin; merged Composite on the quantized
    model = core's patching per evaluation, within fp8's rounding of each LoRA's weights."""
    import comfy.sample

    model, names, pos, neg = setup
    before = base_weights(model)
    twin = dequantized_twin(model)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    outs = {}
    for label, m, strategy in (("auto", model, "auto"), ("twin", twin, "merged"), ("merged", model, "merged")):
        (comp, _clip, _report) = call_node("LoraSetComposite", model=m, lora_set=load_set(names, STRENGTHS),
                                           strategy=strategy)
        outs[label] = run_custom(comp, "euler", sigmas_for(m, 3), pos, neg, noise, latent)
    assert close(outs["auto"], outs["twin"]), (outs["auto"] - outs["twin"]).abs().max().item()
    assert 0 < (outs["merged"] - outs["twin"]).abs().max().item() < 1e-3 * outs["twin"].abs().max().item()
    assert same_weights(base_weights(model), before)


class Int8Linear(torch.nn.Module):
    """A weight-only int8 layer as a third-party pack might write one (no core ``set_weight``): only its own loader
    knows how a LoRA would be merged into it."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        self.scale = torch.nn.Parameter((w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12),
                                        requires_grad=False)
        self.weight = torch.nn.Parameter(torch.round(w / self.scale).to(torch.int8), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().clone(),
                                                                         requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype), self.bias)


def int8_model_and_twin(key: str):
    """The tiny UNet with the layer of ``key`` replaced by an ``Int8Linear``, and its fp32 twin (that layer's weight
    dequantized)."""
    import comfy.utils

    model, twin = build_unet("sd15", SEED), build_unet("sd15", SEED)
    path = key[:-len(".weight")]
    int8 = Int8Linear(comfy.utils.get_attr(model.model, path))
    comfy.utils.set_attr(model.model, path, int8)
    with torch.no_grad():
        comfy.utils.get_attr(twin.model, key).copy_(int8.weight.float() * int8.scale)
    return model, twin


def test_weights_in_a_foreign_form_run_unmerged(env, loras, caplog):
    """``merge_obstacle`` names such a layer; Switch's ``auto`` (merged) then runs unmerged, logging why, and equals
    the LoRA merged into the layer's dequantized weights; the int8 weights are untouched."""
    names, pos, neg, targets = loras
    key = targets[0]
    model, twin = int8_model_and_twin(key)
    _, _, runtime, _ = env.engine("nodes.composition").switch_lora_set(model, None, load_set(names, STRENGTHS), 2,
                                                                       "paper", "auto")
    obstacle = env.engine("nodes.runtime.merged_swap").merge_obstacle(model.model, runtime.options)
    assert obstacle is not None and key in obstacle and "int8" in obstacle
    before = base_weights(model)
    with caplog.at_level(logging.INFO, logger="LoRA Composer"):
        got, runtime = sample_switch(env, model, names, pos, neg, "auto")
    assert runtime.strategies == ["unmerged"]
    assert "cannot merge into these weights" in caplog.text and key in caplog.text
    want, _ = sample_switch(env, twin, names, pos, neg, "merged")
    assert close(got, want), (got - want).abs().max().item()
    assert same_weights(base_weights(model), before)


def test_dense_formats_on_weights_in_a_foreign_form(env, loras):
    """The unmerged dense path cannot read such a weight: a LoHa's ΔW does not depend on it (computed from zeros of
    its shape: exact, = the twin), a DoRA's does — a clear error before sampling, nothing applied; LoraSetMerge the
    same."""
    _, pos, neg, targets = loras
    key = targets[0]
    model, twin = int8_model_and_twin(key)
    sd = twin.model.state_dict()
    loha, dora = "foreign_loha.safetensors", "foreign_dora.safetensors"
    lf.make_loha(sd, [key], seed=93).amplified(8, ("hada_w1_a",)).save(env.models_dir / "loras" / loha)
    lf.make_dora(sd, [key], seed=94).save(env.models_dir / "loras" / dora)
    before = base_weights(model)
    got, runtime = sample_switch(env, model, [loha], pos, neg, "auto")
    assert runtime.strategies == ["unmerged"]
    want, _ = sample_switch(env, twin, [loha], pos, neg, "merged")
    assert close(got, want), (got - want).abs().max().item()
    with pytest.raises(ValueError, match="depend on the weight's values"):
        sample_switch(env, model, [dora], pos, neg, "auto")
    with pytest.raises(ValueError, match="depend on the weight's values"):
        call_node("LoraSetMerge", model=model, lora_set=load_set([dora], [1.0]), method="linear", rank=0,
                  density=0.5, seed=0)
    assert same_weights(base_weights(model), before)


class PackedTensor(torch.Tensor):
    """A weight stored as packed bytes that reports the shape its layer computes with, as GGUF's ``GGMLTensor`` does:
    ``shape`` is the layer's, the data — and so ``ndim`` — the packed blocks' (here fp32 values as ``[out, in · 4]``
    bytes of a 1×1 conv)."""

    @staticmethod
    def __new__(cls, packed: torch.Tensor, logical_shape):
        tensor = torch.Tensor._make_subclass(cls, packed, False)
        tensor.tensor_shape = torch.Size(logical_shape)
        return tensor

    def detach(self, *args, **kwargs):  # nn.Parameter detaches its data: keep the logical shape (GGUF does too)
        new = super().detach(*args, **kwargs)
        new.tensor_shape = self.tensor_shape
        return new

    @property
    def shape(self):
        return getattr(self, "tensor_shape", self.size())


class PackedConv2d(torch.nn.Conv2d):
    """A 1×1 conv whose weight is a ``PackedTensor`` (lossless: the fp32 bytes), unpacked in forward."""

    def __init__(self, conv: torch.nn.Conv2d):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, bias=conv.bias is not None)
        w = conv.weight.detach()
        packed = w.reshape(w.shape[0], -1).contiguous().view(torch.uint8)
        self.weight = torch.nn.Parameter(PackedTensor(packed, w.shape), requires_grad=False)
        if conv.bias is not None:
            self.bias = torch.nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        w = self.weight.as_subclass(torch.Tensor).view(torch.float32).reshape(self.weight.shape)
        return self._conv_forward(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def test_conv_loras_on_packed_conv_weights(env, loras):
    """A LoCon on a conv layer whose weight reports its shape but stores packed blocks (GGUF's form): the runtime reads
    the shape the layer computes with, not the packed data's rank (``as_lowrank`` took such a 4-D conv for a linear
    layer, and sampling failed at the layer's first call), runs it unmerged, and equals the same LoRAs merged into the
    plain model (Switch and Composite); the packed weights stay untouched."""
    import comfy.sample
    import comfy.utils

    names, pos, neg, targets = loras
    key = next(t for t in targets if ".proj_in." in t)
    path = key[:-len(".weight")]
    model, twin = build_unet("sd15", SEED), build_unet("sd15", SEED)
    comfy.utils.set_attr(model.model, path, PackedConv2d(comfy.utils.get_attr(model.model, path)))
    weight = comfy.utils.get_attr(model.model, key)
    assert weight.ndim == 2 and len(weight.shape) == 4  # the form under test
    before = base_weights(model)
    got, runtime = sample_switch(env, model, names, pos, neg, "auto")
    assert runtime.strategies == ["unmerged"]
    want, _ = sample_switch(env, twin, names, pos, neg, "merged")
    assert close(got, want), (got - want).abs().max().item()
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    outs = {}
    for label, m in (("packed", model), ("twin", twin)):
        (comp, _clip, _report) = call_node("LoraSetComposite", model=m, lora_set=load_set(names, STRENGTHS),
                                           strategy="auto")
        outs[label] = run_custom(comp, "euler", sigmas_for(m, 3), pos, neg, noise, latent)
    assert close(outs["packed"], outs["twin"]), (outs["packed"] - outs["twin"]).abs().max().item()
    assert same_weights(base_weights(model), before)
