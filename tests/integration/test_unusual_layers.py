"""LoRAs on layers the unmerged hooks cannot run, and the strategy the runtime picks for them.

The hooks add a layer's delta to its output: linear layers, 2-D convs with groups 1 and zero padding, LayerNorm and
GroupNorm (``test_runtime_oracles.py``: ``norm``). Anything else a LoRA file may patch — a grouped or 3-D conv (video
DiTs' patch embeddings), a conv with reflect padding, a parameter that is no layer's weight or bias — has no hook
path; ``nodes.runtime.layers.unmerged_obstacle`` names it and the runtime merges instead (core's own math, exact),
with a log line; where merging is impossible too, a clear error before anything runs. Before, such a layer reached
the hooks and failed mid-sampling (a grouped conv: "groups must be 1").
"""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import load_set
from harness.sampling import cat_conds, run_custom, sigmas_for
from harness.tiny_models import build_unet, weights_snapshot

SEED = 61
GROUPED = "diffusion_model.input_blocks.1.0.in_layers.2"  # a resblock's 3×3 conv, made grouped below


def grouped_model():
    """The tiny UNet with one resblock conv replaced by a grouped (groups 2) conv of the same channels."""
    import comfy.utils

    model = build_unet("sd15", SEED)
    conv = comfy.utils.get_attr(model.model, GROUPED)
    grouped = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding, groups=2)
    with torch.no_grad():
        grouped.weight.copy_(torch.randn(grouped.weight.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    comfy.utils.set_attr(model.model, GROUPED, grouped)
    return model


@pytest.fixture(scope="module")
def loras(env):
    """Two LoRAs on the attention layers; the first also patches the grouped conv with a full ``diff``."""
    model = grouped_model()
    sd = model.model.state_dict()
    targets = lf.pick_targets(sd, ("attn",))
    names = lf.save_strong_loras(sd, targets, env.models_dir / "loras", "grouped", seeds=(70, 71), ranks=(2, 2))
    first = lf.make_lora(sd, targets, "kohya", rank=2, alpha=1.0, seed=70).amplified(8)
    first.tensors[f"{GROUPED}.diff"] = torch.randn(sd[f"{GROUPED}.weight"].shape,
                                                   generator=torch.Generator().manual_seed(4)) * 0.2
    first.save(env.models_dir / "loras" / names[0])
    pos, neg = cat_conds()
    return names, pos, neg


def composite(env, model, names, strategy, pos, neg):
    import comfy.sample

    patched, _clip, runtime, _lines = env.engine("nodes.composition").composite_lora_set(
        model, None, load_set(names), strategy=strategy)
    latent = torch.zeros(1, 4, 8, 8)
    out = run_custom(patched, "euler", sigmas_for(model, 3), pos, neg, comfy.sample.prepare_noise(latent, 3), latent)
    return out, runtime


def test_obstacle_names_the_layer(env, loras):
    names, _, _ = loras
    model = grouped_model()
    patching = env.engine("nodes.patching")
    options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None, load_set(names))]
    obstacle = env.engine("nodes.runtime.layers").unmerged_obstacle(model.model, options)
    assert obstacle is not None and GROUPED in obstacle and "groups 2" in obstacle
    assert env.engine("nodes.runtime.layers").unmerged_obstacle(model.model, options[1:]) is None


@pytest.mark.parametrize("strategy, level", [("auto", logging.INFO), ("unmerged", logging.WARNING)],
                         ids=["auto", "unmerged"])
def test_layers_without_a_hook_path_merge_instead(env, loras, strategy, level, caplog):
    """Composite's unmerged choice (auto on a CPU, or asked by name) merges when a LoRA'd layer has no hook path,
    saying so (info for auto, a warning when unmerged was asked for); the result is merged Composite's, and the
    base weights are bit-identical afterwards."""
    import comfy.model_management as mm

    names, pos, neg = loras
    model = grouped_model()
    before = weights_snapshot(model.model)
    with caplog.at_level(logging.INFO, logger="LoRA Composer"):
        got, runtime = composite(env, model, names, strategy, pos, neg)
    assert runtime.strategies == ["merged"]
    records = [r for r in caplog.records if "hooks cannot run" in r.getMessage()]
    assert records and records[0].levelno == level and GROUPED in records[0].getMessage()
    want, _ = composite(env, model, names, "merged", pos, neg)
    assert torch.equal(got, want)
    base, _ = composite(env, model, names[1:], "merged", pos, neg)
    assert not torch.equal(got, base)  # the grouped conv's LoRA acted
    mm.unload_all_models()
    after = weights_snapshot(model.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_neither_merged_nor_unmerged_is_a_clear_error(env, loras):
    """Where the weights cannot be merged either (here: another LoRA Composer node already swaps this model's
    weights, the stacked case), the run is refused before anything is patched, naming both reasons."""
    names, _, _ = loras
    model = grouped_model()
    _patched, _clip, runtime, _lines = env.engine("nodes.composition").composite_lora_set(
        model, None, load_set(names), strategy="auto")
    binding = env.engine("nodes.runtime.binding")
    binding._SWAPPING[id(model.model)] = "another-runtime"
    try:
        with pytest.raises(ValueError, match=r"neither be merged .*another LoRA Composer node.* nor run as adapters "
                                             r"\(the hooks cannot run .*in_layers\.2"):
            runtime.strategy_for_run(SimpleNamespace(model_patcher=None), model.model, torch.device("cpu"))
    finally:
        binding._SWAPPING.pop(id(model.model), None)


@pytest.mark.parametrize("strategy, level", [("auto", logging.INFO), ("unmerged", logging.WARNING)],
                         ids=["auto", "unmerged"])
def test_dense_deltas_over_budget_merge_instead(env, strategy, level, caplog, monkeypatch):
    """LoHa / LoKr LoRAs run unmerged as exact dense deltas, at most ``DENSE_BUDGET_BYTES`` of them (2 GiB: a LoKr on
    every SDXL attention layer is more). Over it, Composite's unmerged choice merges instead, saying so, where it
    failed mid-run with DenseBudgetError; the result is merged Composite's."""
    layers = env.engine("nodes.runtime.layers")
    model = build_unet("sd15", SEED)
    sd = model.model.state_dict()
    attn = [k for k in lf.pick_targets(sd, ("attn",)) if sd[k].ndim == 2]
    names = ["budget_loha.safetensors", "budget_lokr.safetensors"]
    lf.make_loha(sd, attn, seed=80).amplified(4, ("hada_w1_a",)).save(env.models_dir / "loras" / names[0])
    lf.make_lokr(sd, attn, seed=81).amplified(4, ("lokr_w1",)).save(env.models_dir / "loras" / names[1])
    pos, neg = cat_conds()
    need = sum(4 * sd[k].numel() for k in attn) * 2
    monkeypatch.setattr(layers, "DENSE_BUDGET_BYTES", need - 1)
    with caplog.at_level(logging.INFO, logger="LoRA Composer"):
        got, runtime = composite(env, model, names, strategy, pos, neg)
    assert runtime.strategies == ["merged"]
    (record,) = [r for r in caplog.records if "dense deltas need" in r.getMessage()]
    assert record.levelno == level
    want, _ = composite(env, model, names, "merged", pos, neg)
    assert torch.equal(got, want)
    monkeypatch.setattr(layers, "DENSE_BUDGET_BYTES", need)  # exactly the budget: the hooks run them
    got_unmerged, runtime = composite(env, model, names, strategy, pos, neg)
    assert runtime.strategies == ["unmerged"]
    assert float((got_unmerged - want).norm() / want.norm()) < 1e-5  # fp32: summation order only


@pytest.mark.parametrize("case", ["in place asked", "auto, no room for the copy"])
def test_fallback_to_the_patched_copy_is_logged(env, loras, case, caplog):
    """Where the weights cannot be swapped in place (here: said to be quantized) and the hooks cannot run a layer
    (the grouped conv), the runtime swaps a patched copy — and says so (it used to fall back silently)."""
    names, _, _ = loras
    model = grouped_model()
    strategy = "merged-lowvram" if case == "in place asked" else "auto"
    _patched, _clip, runtime, _lines = env.engine("nodes.composition").composite_lora_set(
        model, None, load_set(names), strategy=strategy)
    runtime._obstacles[model.model] = {"in place": "some.layer.weight is stored in another form (quantized)"}
    runtime.free_memory = lambda device: 0  # an accelerator with no room for a patched copy
    if case == "in place asked":
        args = (torch.device("cpu"),)
        expected, message = "merged", "cannot swap weights in place"
    else:
        args = (torch.device("meta"), (1, 4, 8, 8))
        expected, message = "merged", "not in place either"
    with caplog.at_level(logging.INFO, logger="LoRA Composer"):
        got = runtime.strategy_for_run(SimpleNamespace(model_patcher=None), model.model, *args)
    assert got == expected
    (record,) = [r for r in caplog.records if message in r.getMessage()]
    assert record.levelno == logging.WARNING and GROUPED in record.getMessage()


def test_rms_norm_weights_run_unmerged_exactly(env, loras):
    """An RMSNorm (torch's, which ComfyUI's RMSNorm layers subclass) patched by a LyCORIS ``w_norm``: the hooks add
    rms(x)·Δw per row, so Composite stays unmerged (auto on a CPU) and equals merged Composite; the base weights are
    untouched."""
    import comfy.model_management as mm
    import comfy.utils

    if not hasattr(torch.nn, "RMSNorm"):
        pytest.skip("this torch has no nn.RMSNorm")
    _, pos, neg = loras
    norm = "diffusion_model.input_blocks.1.1.transformer_blocks.0.norm1"
    model = build_unet("sd15", SEED)
    width = comfy.utils.get_attr(model.model, norm).normalized_shape[0]
    rms = torch.nn.RMSNorm(width, eps=1e-6)
    with torch.no_grad():
        rms.weight.copy_(1.0 + 0.1 * torch.randn(width, generator=torch.Generator().manual_seed(5)))
    comfy.utils.set_attr(model.model, norm, rms)
    sd = model.model.state_dict()
    targets = lf.pick_targets(sd, ("attn",))
    names = lf.save_strong_loras(sd, targets, env.models_dir / "loras", "rms", seeds=(72, 73), ranks=(2, 2))
    without, _ = composite(env, model, names, "merged", pos, neg)  # before the norm joins the first LoRA
    first = lf.make_lora(sd, targets, "kohya", rank=2, alpha=1.0, seed=72).amplified(8)
    first.tensors[f"{norm}.w_norm"] = torch.randn(width, generator=torch.Generator().manual_seed(6)) * 20
    first.save(env.models_dir / "loras" / names[0])
    before = weights_snapshot(model.model)
    got, runtime = composite(env, model, names, "auto", pos, neg)
    assert runtime.strategies == ["unmerged"]
    want, _ = composite(env, model, names, "merged", pos, neg)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item(), (got - want).abs().max().item()
    assert (want - without).abs().max().item() > 1e-3 * want.abs().max().item()  # the norm's patch acts
    mm.unload_all_models()
    after = weights_snapshot(model.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
