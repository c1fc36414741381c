"""Adapter-runtime oracles at the level of one model call (no sampler in between).

* unmerged (forward hooks) output == merged output (ComfyUI's own patching) for every format,
  fp32, 1e-5 relative to the output's magnitude;
* per-row routing in one batched forward == each row alone with its LoRA merged;
* merged swapping reproduces static application bit for bit and restores the exact Parameters.
"""
from __future__ import annotations

import logging

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_unet, weights_snapshot

REL = 1e-5


@pytest.fixture(scope="module")
def model():
    return build_unet("sd15", seed=81)


def _formats(env, model):
    sd = model.model.state_dict()
    files = {
        "lora": lf.make_lora(sd, lf.pick_targets(sd, ("attn", "proj", "ff")), "kohya", rank=3, alpha=2.0, seed=1),
        "locon": lf.make_lora(sd, lf.pick_targets(sd, ("conv3", "attn")), "kohya", rank=2, alpha=1.0, seed=2),
        "tucker": lf.make_lora(sd, lf.pick_targets(sd, ("conv3",)), "kohya", rank=2, alpha=1.0, tucker=True, seed=3),
        "loha": lf.make_loha(sd, lf.pick_targets(sd, ("attn", "conv3")), seed=4),
        "lokr": lf.make_lokr(sd, [k for k in lf.pick_targets(sd, ("attn",)) if sd[k].ndim == 2], seed=5),
        "dora": lf.make_dora(sd, lf.pick_targets(sd, ("attn",)), seed=6),
        "diff": lf.make_full_diff(sd, lf.pick_targets(sd, ("attn", "conv3")), seed=7),
        "lora_bias": _with_bias_diffs(sd, lf.make_lora(sd, lf.pick_targets(sd, ("attn", "conv3")), "kohya", rank=2,
                                                       alpha=2.0, seed=8), seed=9),
        "norm": _with_norm_diffs(sd, lf.make_lora(sd, lf.pick_targets(sd, ("attn",)), "kohya", rank=2, alpha=2.0,
                                                  seed=10), seed=11),
    }
    for name, lora in files.items():
        lora.amplified(5, ("lora_up.weight", "lora_mid.weight", "hada_w1_a", "hada_w2_a", "lokr_w1", "lokr_w2_a"))
        lora.save(env.models_dir / "loras" / f"rt_{name}.safetensors")
    return list(files)


def _with_bias_diffs(sd, lora, seed):
    """Add ``.diff_b`` bias offsets (dense bias patches) for every target layer that has a bias."""
    g = torch.Generator().manual_seed(seed)
    for key in list(lora.expected):
        bias = key[:-len("weight")] + "bias"
        if bias in sd:
            lora.tensors[f"{lf.DIFFUSION}{lf.sgm_path(key)}.diff_b"] = torch.randn(sd[bias].shape, generator=g) * 0.5
    assert any(k.endswith(".diff_b") for k in lora.tensors)
    return lora


def _with_norm_diffs(sd, lora, seed):
    """Add LyCORIS ``w_norm`` / ``b_norm`` (norm layers trained: ComfyUI loads them as ``diff`` patches of the affine
    weight and bias) for LayerNorms and GroupNorms (a transformer's ``norm1``, a resblock's ``in_layers.0``, a spatial
    transformer's ``norm``)."""
    g = torch.Generator().manual_seed(seed)
    norms = [k for k in sd if k.endswith((".transformer_blocks.0.norm1.weight", ".in_layers.0.weight", ".1.norm.weight"))]
    assert len(norms) >= 3
    for key in norms:
        name = f"{lf.DIFFUSION}{lf.sgm_path(key)}"
        lora.tensors[f"{name}.w_norm"] = torch.randn(sd[key].shape, generator=g) * 0.5
        lora.tensors[f"{name}.b_norm"] = torch.randn(sd[key].shape, generator=g) * 0.5
    return lora


def _set(names, strengths):
    s = None
    for n, sm in zip(names, strengths):
        (s,) = call_node("LoraSetLoad", lora_name=f"rt_{n}.safetensors", strength_model=sm, strength_clip=1.0, lora_set=s)
    return s


def _inputs(rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.full((rows,), 3.0)
    ctx = torch.randn(rows, 77, 64, generator=g)
    return x, t, ctx


def _static_output(patcher, x, t, ctx):
    import comfy.model_management as mm
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        with torch.no_grad():
            return patcher.model.apply_model(x, t, c_crossattn=ctx).float()
    finally:
        mm.unload_all_models()


def _routed_output(env, model, s, weights, x, t, ctx, grad=False):
    import comfy.model_management as mm
    layers = env.engine("nodes.runtime.layers")
    unmerged = env.engine("nodes.runtime.unmerged")
    patching = env.engine("nodes.patching")
    mm.unload_all_models()
    options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None, s)]
    routing = unmerged.Routing()
    hooks = unmerged.UnmergedAdapters(layers.build_layer_plans(model.model, options), routing)
    hooks.install(model.model, x.device)
    routing.set(weights)
    try:
        with torch.enable_grad() if grad else torch.no_grad():
            return model.model.apply_model(x, t, c_crossattn=ctx).float().detach()
    finally:
        hooks.remove()


def _close(a, b, rel=REL):
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("fmt", ["lora", "locon", "tucker", "loha", "lokr", "dora", "diff", "lora_bias", "norm"])
def test_unmerged_equals_merged_per_format(env, model, fmt):
    _formats(env, model)
    s = _set([fmt], [0.8])
    x, t, ctx = _inputs(2)
    merged = _static_output(call_node("LoraSetApply", model=model, lora_set=s)[0], x, t, ctx)
    base = _static_output(model, x, t, ctx)
    unmerged = _routed_output(env, model, s, torch.ones(1, 1), x, t, ctx)
    assert not _close(merged, base, rel=50 * REL), "the LoRA must change the output well beyond the tolerance"
    assert _close(unmerged, merged), (unmerged - merged).abs().max().item()


def test_unmerged_hooks_keep_autograd_outputs_intact(env, model):
    """Outputs that carry autograd history are not modified in place: the hooks add a separate delta instead, and
    the result equals the in-place (inference) path."""
    _formats(env, model)
    s = _set(["lora", "tucker"], [0.8, 1.1])
    x, t, ctx = _inputs(3)
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    plain = _routed_output(env, model, s, weights, x, t, ctx)
    tracked = _routed_output(env, model, s, weights, x.clone().requires_grad_(True), t, ctx, grad=True)
    assert _close(tracked, plain)


def test_per_row_routing_equals_each_row_alone(env, model):
    names = _formats(env, model)[:5]  # lora, locon, tucker, loha, lokr
    strengths = [0.8, -0.6, 1.2, 0.9, 0.7]
    s = _set(names, strengths)
    x, t, ctx = _inputs(len(names) + 1)
    weights = torch.zeros(len(names) + 1, len(names))
    for i in range(len(names)):
        weights[i, i] = 1.0  # row i → LoRA i; the last row gets no LoRA
    routed = _routed_output(env, model, s, weights, x, t, ctx)
    for i, name in enumerate(names):
        alone = _static_output(call_node("LoraSetApply", model=model, lora_set=_set([name], [strengths[i]]))[0],
                               x[i:i + 1], t[i:i + 1], ctx[i:i + 1])
        assert _close(routed[i:i + 1], alone), (name, (routed[i:i + 1] - alone).abs().max().item())
    base = _static_output(model, x[-1:], t[-1:], ctx[-1:])
    assert _close(routed[-1:], base)


def test_routed_bias_offsets_follow_their_rows(env, model):
    """Bias patches (``.diff_b``) are routed per row like the weights: rows 0/1/2 get LoRA a / LoRA b / both at
    half strength, each equal to that row alone with the same LoRAs merged by core."""
    _formats(env, model)
    s = _set(["lora_bias", "diff"], [1.0, 1.0])
    x, t, ctx = _inputs(3)
    routed = _routed_output(env, model, s, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), x, t, ctx)
    for row, strengths in enumerate([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]):
        kept = [(n, st) for n, st in zip(["lora_bias", "diff"], strengths) if st]
        alone = _static_output(call_node("LoraSetApply", model=model, lora_set=_set(*zip(*kept)))[0],
                               x[row:row + 1], t[row:row + 1], ctx[row:row + 1])
        assert _close(routed[row:row + 1], alone), (row, (routed[row:row + 1] - alone).abs().max().item())


def test_routed_norm_patches_follow_their_rows(env, model):
    """LayerNorm / GroupNorm weight and bias patches (LyCORIS ``w_norm`` / ``b_norm``; they failed in the unmerged
    path before, "deltas[0] must be 2-D") are added as n(x)·Δw + Δb per row: rows 0/1/2 get the norm LoRA / a plain
    LoRA / both at half strength, each equal to that row alone with the same LoRAs merged by core."""
    _formats(env, model)
    names = ["norm", "lora"]
    s = _set(names, [1.0, 1.0])
    x, t, ctx = _inputs(3)
    routed = _routed_output(env, model, s, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]), x, t, ctx)
    for row, strengths in enumerate([(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]):
        kept = [(n, st) for n, st in zip(names, strengths) if st]
        alone = _static_output(call_node("LoraSetApply", model=model, lora_set=_set(*zip(*kept)))[0],
                               x[row:row + 1], t[row:row + 1], ctx[row:row + 1])
        assert _close(routed[row:row + 1], alone), (row, (routed[row:row + 1] - alone).abs().max().item())


def test_fractional_row_weights_scale_lowrank_linearly(env, model):
    _formats(env, model)
    s = _set(["lora", "locon"], [1.0, 1.0])
    x, t, ctx = _inputs(1)
    routed = _routed_output(env, model, s, torch.tensor([[0.5, -0.25]]), x, t, ctx)
    static = _static_output(call_node("LoraSetApply", model=model, lora_set=_set(["lora", "locon"], [0.5, -0.25]))[0],
                            x, t, ctx)
    assert _close(routed, static)


def test_merged_swap_is_bit_exact_and_restores_parameters(env, model):
    """Each option's weights equal core's static patching bit for bit, and the original Parameters come back.
    Between activations core loads and unloads a static LoRA on the same module, which puts back *new* Parameter
    objects sharing the originals' storage: the swapper must never write into a Parameter it did not make."""
    import comfy.model_management as mm
    _formats(env, model)
    patching = env.engine("nodes.patching")
    swap = env.engine("nodes.runtime.merged_swap")
    s = _set(["lora", "dora", "loha"], [0.7, 1.0, -0.4])
    resolved = patching.resolve_set(model, None, s)
    options = [patching.model_patch_lists(e, p) for e, p in resolved]
    mm.unload_all_models()
    before = {k: v for k, v in model.model.named_parameters()}
    snapshot = weights_snapshot(model.model)
    swapper = swap.MergedSwapper(model.model, options)
    for j, (entry, _) in enumerate(resolved):
        swapper.activate(j)
        ours = weights_snapshot(model.model)
        swapper.activate(None)
        static = call_node("LoraSetApply", model=model, lora_set=_set([entry.name[3:-12]], [entry.strength_model]))[0]
        mm.load_models_gpu([static], force_full_load=True)
        core = weights_snapshot(static.model)
        mm.unload_all_models()
        assert all(torch.equal(ours[k], core[k]) for k in core), entry.name
    swapper.activate(1)
    swapper.restore()
    after = {k: v for k, v in model.model.named_parameters()}
    assert all(after[k] is before[k] for k in before), "the original Parameter objects are back"
    assert all(torch.equal(snapshot[k], v) for k, v in model.model.state_dict().items())


@pytest.mark.parametrize("cached_sets", [0, 1])
def test_in_place_swaps_stay_bit_exact(env, model, cached_sets):
    """Back-to-back switches reuse the previous patched copy in place (the fast path for plain LoRA):
    every activation must still equal core's static patching bit for bit, in any order, with and without
    the weight-set cache, and mixing fast-path (lora, locon) with general-path (tucker, dora) entries."""
    _assert_in_place_swaps_bit_exact(env, model, cached_sets)


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("weights, compute", [("fp32", "fp16"), ("fp16", None), ("bf16", None), ("bf16", "fp16")])
def test_in_place_swaps_bit_exact_in_other_dtypes(env, weights, compute, monkeypatch):
    """The fast path also covers half-precision weights and ComfyUI 0.9.2's fp16 LoRA compute dtype (what
    its ``lora_compute_dtype`` picks on fp16-capable GPUs; on an H100 every swap used to fall back to
    ``calculate_weight`` because of it): still bit-identical to core's static patching with the same settings."""
    import comfy.model_management as mm
    if compute is not None:
        if not hasattr(mm, "LORA_COMPUTE_DTYPES"):
            pytest.skip("this ComfyUI computes LoRA patches in fp32 only (no lora_compute_dtype)")
        monkeypatch.setitem(mm.LORA_COMPUTE_DTYPES, torch.device("cpu"), DTYPES[compute])
    model = build_unet("sd15", seed=81, dtype=DTYPES[weights])
    _assert_in_place_swaps_bit_exact(env, model, cached_sets=0)


# In-place swaps round once per incremental update (see inplace_swap): their weights are held to core's static
# patching within this many units of the weight dtype's precision, relative to the layer's largest weight.
IN_PLACE_EPS = {"fp32": 8, "fp16": 4, "bf16": 4}


@pytest.mark.parametrize("weights", ["fp32", "fp16", "bf16"])
def test_in_place_low_vram_swaps_match_core_patching(env, weights):
    """``InPlaceSwapper`` (strategy ``merged-lowvram``): every activation — plain LoRA / LoCon swapped by ``addmm_``
    into the weights, Tucker and DoRA rewritten from the host copy of the originals, a mixture, ``None`` — matches
    core's static patching of that option within ``IN_PLACE_EPS`` (fp32: 8 · 2⁻²³ ≈ 1e-6 of the layer's largest
    weight, inside the 1e-5 bound), through 60 switches so that rewrites from the originals (every 16th update in
    fp32, 2nd in half precision) keep the drift bounded. The model's Parameters are never replaced (no copy is held)
    and ``restore`` brings the original values back bit for bit."""
    model = build_unet("sd15", seed=81, dtype=DTYPES[weights])
    _formats(env, model)
    patching = env.engine("nodes.patching")
    inplace = env.engine("nodes.runtime.inplace_swap")
    names, strengths = ["lora", "locon", "tucker", "dora"], [0.7, -1.3, 0.9, 1.0]
    options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None, _set(names, strengths))]
    core = [_core_weights(model, _set([n], [sm])) for n, sm in zip(names, strengths)]
    core_mixture = _core_weights(model, _set(["lora", "locon"], [0.7 * 0.5, -1.3 * 0.25]))
    snapshot = weights_snapshot(model.model)
    before = dict(model.model.named_parameters())
    pointers = {k: v.data_ptr() for k, v in before.items()}
    swapper = inplace.InPlaceSwapper(model.model, options)
    eps = IN_PLACE_EPS[weights] * torch.finfo(DTYPES[weights]).eps
    order = [0, 1, 0, 2, 3, 1, 2, 0] + [0, 1] * 26
    for n, j in enumerate(order):
        swapper.activate(j)
        _assert_weights_close(model, core[j], eps, (n, names[j]))
    swapper.activate((0.5, 0.25, 0.0, 0.0))
    _assert_weights_close(model, core_mixture, eps, "mixture")
    swapper.activate(None)
    _assert_weights_close(model, snapshot, eps, "no LoRA")
    assert all(v is before[k] and v.data_ptr() == pointers[k] for k, v in model.model.named_parameters())
    assert swapper.fast_writes > 10 * len(options[0]) and swapper.exact_writes > 0
    swapper.activate(2)
    swapper.restore()
    assert all(v is before[k] for k, v in model.model.named_parameters())
    assert all(torch.equal(snapshot[k], v) for k, v in model.model.state_dict().items())


def _core_weights(model, lora_set) -> dict[str, torch.Tensor]:
    import comfy.model_management as mm
    static = call_node("LoraSetApply", model=model, lora_set=lora_set)[0]
    mm.load_models_gpu([static], force_full_load=True)
    try:
        return weights_snapshot(static.model)
    finally:
        mm.unload_all_models()


def _assert_weights_close(model, expected: dict[str, torch.Tensor], eps: float, label) -> None:
    ours = weights_snapshot(model.model)
    for k, want in expected.items():
        error = (ours[k].double() - want.double()).abs().max().item()
        assert error <= eps * want.abs().max().item(), (label, k, error / want.abs().max().item() / eps)


def test_in_place_swaps_wait_for_transfers_from_pinned_host_weights(env, monkeypatch):
    """ComfyUI 0.9.x pins offloaded (LowVram) weights in host memory and streams them to the GPU asynchronously: an
    in-place swap rewriting such a weight first waits for the device (one ``torch.cuda.synchronize`` per activation
    and at ``restore``), and only then. (CUDA itself is simulated here: the CPU has no pinned weights.)"""
    model = build_unet("sd15", seed=81)
    _formats(env, model)
    patching = env.engine("nodes.patching")
    inplace = env.engine("nodes.runtime.inplace_swap")
    options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None,
                                                                                  _set(["lora", "locon"], [1, 1]))]
    assert not inplace.pinned_host_weights([p for p in model.model.parameters()])
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append(1))
    for pinned, expected in ((False, 0), (True, 3)):
        monkeypatch.setattr(inplace, "pinned_host_weights", lambda weights: pinned)
        waits.clear()
        swapper = inplace.InPlaceSwapper(model.model, options)
        swapper.activate(0)
        swapper.activate(1)
        swapper.restore()
        assert len(waits) == expected, pinned


def test_in_place_swap_is_refused_for_tied_weights(env, caplog):
    """Two keys sharing one tensor would be patched twice by in-place writes: ``in_place_obstacle`` names them, and
    the runtime then runs unmerged (with a warning) even when ``merged-lowvram`` was asked for."""
    model = build_unet("sd15", seed=81)
    _formats(env, model)
    patching = env.engine("nodes.patching")
    inplace = env.engine("nodes.runtime.inplace_swap")
    options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None, _set(["lora"], [1.0]))]
    assert inplace.in_place_obstacle(model.model, options) is None
    import comfy.utils
    by_shape: dict[tuple, list[str]] = {}
    for key in sorted(options[0]):
        by_shape.setdefault(tuple(comfy.utils.get_attr(model.model, key).shape), []).append(key)
    first, second = next(keys for keys in by_shape.values() if len(keys) > 1)[:2]
    module_path, _, name = second.rpartition(".")
    setattr(comfy.utils.get_attr(model.model, module_path), name, comfy.utils.get_attr(model.model, first))
    assert "share one tensor" in inplace.in_place_obstacle(model.model, options)
    runtime = env.engine("nodes.composition").switch_lora_set(model, None, _set(["lora"], [1.0]), 2, "paper",
                                                              "merged-lowvram")[2]
    with caplog.at_level(logging.WARNING, logger="LoRA Composer"):
        assert runtime.strategy_for_run(None, model.model, torch.device("cpu"), (1, 4, 8, 8)) == "unmerged"
    assert "cannot swap weights in place" in caplog.text and first in caplog.text


def test_unmerged_in_bfloat16_is_as_accurate_as_core_patching(env):
    """A bf16 model: each hook casts its LoRA factors, dense deltas and bias offsets once per run to the dtype its
    layer computes in. Against the same network in fp32 (the bf16 weights upcast, core patching), the unmerged
    bf16 output is no further off than core's own bf16 patching (bf16 keeps 8 mantissa bits, so the fp32 1e-5
    bound does not apply; this bounds our rounding by core's instead)."""
    model = build_unet("sd15", seed=81, dtype=torch.bfloat16)
    exact = build_unet("sd15", seed=81)
    exact.model.load_state_dict({k: v.float() for k, v in model.model.state_dict().items()})
    _formats(env, model)
    s = _set(["lora", "loha", "lora_bias"], [0.8, 0.9, 1.0])
    x, t, ctx = _inputs(2)
    reference = _static_output(call_node("LoraSetApply", model=exact, lora_set=s)[0], x, t, ctx)
    base = _static_output(exact, x, t, ctx)
    x, ctx = x.bfloat16(), ctx.bfloat16()
    core = _static_output(call_node("LoraSetApply", model=model, lora_set=s)[0], x, t, ctx)
    ours = _routed_output(env, model, s, torch.ones(1, 3), x, t, ctx)
    effect, core_error, our_error = ((a - b).norm().item() for a, b in [(reference, base), (core, reference),
                                                                         (ours, reference)])
    assert core_error < 0.2 * effect, "the LoRAs must change the output well beyond bf16 rounding"
    assert our_error <= 1.5 * core_error, (our_error, core_error, effect)


def _assert_in_place_swaps_bit_exact(env, model, cached_sets):
    import comfy.model_management as mm
    _formats(env, model)
    patching = env.engine("nodes.patching")
    swap = env.engine("nodes.runtime.merged_swap")
    names, strengths = ["lora", "locon", "tucker", "dora"], [0.7, -1.3, 0.9, 1.0]
    resolved = patching.resolve_set(model, None, _set(names, strengths))
    options = [patching.model_patch_lists(e, p) for e, p in resolved]
    core = []
    for name, strength in zip(names, strengths):
        static = call_node("LoraSetApply", model=model, lora_set=_set([name], [strength]))[0]
        mm.load_models_gpu([static], force_full_load=True)
        core.append(weights_snapshot(static.model))
        mm.unload_all_models()
    mixture = call_node("LoraSetApply", model=model, lora_set=_set(["lora", "locon"], [0.7 * 0.5, -1.3 * 0.25]))[0]
    mm.load_models_gpu([mixture], force_full_load=True)
    core_mixture = weights_snapshot(mixture.model)
    mm.unload_all_models()
    snapshot = weights_snapshot(model.model)
    before = dict(model.model.named_parameters())
    swapper = swap.MergedSwapper(model.model, options, cached_sets=cached_sets)
    for j in (0, 1, 0, 2, 3, 1, 2, 0):
        swapper.activate(j)
        ours = weights_snapshot(model.model)
        assert all(torch.equal(ours[k], core[j][k]) for k in core[j]), (j, names[j])
    swapper.activate((0.5, 0.25, 0.0, 0.0))
    ours = weights_snapshot(model.model)
    assert all(torch.equal(ours[k], core_mixture[k]) for k in core_mixture)
    assert swapper.fast_writes > len(options[0]), "the in-place fast path ran (and was reused across switches)"
    swapper.restore()
    after = dict(model.model.named_parameters())
    assert all(after[k] is before[k] for k in before)
    assert all(torch.equal(snapshot[k], v) for k, v in model.model.state_dict().items())


def test_low_rank_terms_are_worked_out_once_and_serve_every_run(env, model):
    """The fast path's view of the options (``LowRankTerms``) is made once per runtime: plain LoRA / LoCon patch
    lists become ``factor · (up @ down)`` terms over shared fp32 matrices, everything else stays with
    ``calculate_weight``. Two runs of one swapper configuration sharing it stay bit-exact, and a run's end drops
    the matrices' copies on other devices (the CPU's views of fp32 LoRA tensors, no copies, stay)."""
    _formats(env, model)
    patching = env.engine("nodes.patching")
    swap = env.engine("nodes.runtime.merged_swap")
    lowrank_terms = env.engine("nodes.runtime.lowrank_terms")
    names, strengths = ["lora", "locon", "tucker", "dora", "loha"], [0.7, -1.3, 0.9, 1.0, 0.5]
    options = [patching.model_patch_lists(e, p) for e, p in patching.resolve_set(model, None, _set(names, strengths))]
    terms = lowrank_terms.LowRankTerms(options)
    for j, name in enumerate(names):
        kinds = {key: terms.terms(j, key, patches) is not None for key, patches in options[j].items()}
        assert all(kinds.values()) if name in ("lora", "locon") else not any(kinds.values()), name
    key, patches = next(iter(options[0].items()))
    ((factor, up, down),) = terms.terms(0, key, patches)
    adapter = patches[0][1]
    assert factor == 0.7 * adapter.weights[2] / adapter.weights[1].shape[0]
    matrices = terms.matrices(torch.device("cpu"))
    assert torch.equal(matrices[up], adapter.weights[0].float().flatten(1))
    assert torch.equal(matrices[down], adapter.weights[1].float().flatten(1))
    # the layout another device's single upload unpacks ("meta" stands in for a GPU: the packed path, no values)
    on_meta = terms.matrices(torch.device("meta"))
    assert [m.shape for m in on_meta] == [m.shape for m in matrices] and all(m.is_meta for m in on_meta)
    terms.release()
    snapshot = weights_snapshot(model.model)
    first = None
    for _run in range(2):
        swapper = swap.MergedSwapper(model.model, options, terms=terms)
        for j in (0, 1, 2, 0):
            swapper.activate(j)
        weights = weights_snapshot(model.model)
        swapper.restore()
        assert list(terms._on) == [(torch.device("cpu"), torch.float32)], "only views of the fp32 CPU LoRAs are kept"
        if first is None:
            first = weights
        assert all(torch.equal(first[k], v) for k, v in weights.items())
        assert all(torch.equal(snapshot[k], v) for k, v in model.model.state_dict().items())


def _hooked_linear(env, dtype, weights):
    """A bare Linear (parameters tracked by autograd) with one rank-2 LoRA hooked on, rows routed by ``weights``."""
    layers, unmerged = env.engine("nodes.runtime.layers"), env.engine("nodes.runtime.unmerged")
    lowrank = env.engine("kernels.lowrank")
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(8, 6).to(dtype)
    adapter = lowrank.LowRankAdapter(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), scale=0.5)
    plan = layers.LayerPlan(key="layer.weight", module_path="layer", conv=None, lowrank_columns=[0],
                            lowrank=[adapter])
    root = torch.nn.Module()
    root.layer = layer
    routing = unmerged.Routing()
    routing.set(torch.tensor(weights))
    hooks = unmerged.UnmergedAdapters([plan], routing)
    delta = 0.5 * adapter.up.double() @ adapter.down.double()  # ΔW in fp64, the oracle
    return layer, root, hooks, delta


def test_a_float64_layer_keeps_float64_with_autograd_on(env):
    """Outputs that need gradients take the out-of-place path, which rounded a float64 output (and its LoRA delta)
    to float32: a row routed to no LoRA changed by 2e-8, the delta was 2e-8 off. Now exact to fp64 rounding."""
    layer, root, hooks, delta = _hooked_linear(env, torch.float64, [[1.0], [0.0]])
    x = torch.randn(2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    base = layer(x).detach()
    hooks.install(root, torch.device("cpu"))
    try:
        got = layer(x)
    finally:
        hooks.remove()
    assert got.requires_grad and got.dtype == torch.float64
    assert torch.equal(got[1].detach(), base[1])
    want = base[0] + x[0] @ delta.t()
    assert (got[0].detach() - want).abs().max() <= 1e-12 * want.abs().max()


def test_hooks_run_under_autocast(env):
    """Under torch.autocast, mm runs in bf16 but the in-place addmm_ the kernels accumulate with does not (a dtype
    error in every hooked layer). The hooks now switch autocast off for their own arithmetic: the LoRA delta in
    fp32, added to the layer's bf16 output."""
    layer, root, hooks, delta = _hooked_linear(env, torch.float32, [[1.0], [1.0], [0.0]])
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        base = layer(x).detach()
        hooks.install(root, torch.device("cpu"))
        try:
            got = layer(x).detach()
        finally:
            hooks.remove()
    assert got.dtype == torch.bfloat16 and torch.equal(got[2], base[2])
    want = base[:2].double() + x[:2].double() @ delta.t()
    assert (got[:2].double() - want).abs().max() <= 1e-2 * want.abs().max()  # bf16 output: 8 bits of mantissa
