"""LoraSetMerge in delta space against independent oracles, and LoraSetSave round trips.

Oracles: the exact per-layer deltas of the applied set (ComfyUI patching through LoraSetApply),
and kernels.merge_math applied by hand to the formula deltas from the test's own LoRA factory.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import build_unet, patched_weights

REL = 1e-5


@pytest.fixture(scope="module")
def model():
    return build_unet("sd15", seed=21)


@pytest.fixture(scope="module")
def loras(env, model):
    sd = model.model.state_dict()
    a = lf.make_lora(sd, lf.pick_targets(sd, ("attn", "proj")), "kohya", rank=3, alpha=1.5, seed=1)
    b = lf.make_lora(sd, lf.pick_targets(sd, ("attn", "conv3")), "kohya", rank=2, alpha=4.0, seed=2)
    c = lf.make_loha(sd, lf.pick_targets(sd, ("attn",))[:2], seed=3)
    for name, lora in (("m_a", a), ("m_b", b), ("m_c", c)):
        lora.save(env.models_dir / "loras" / f"{name}.safetensors")
    return {"m_a": a, "m_b": b, "m_c": c}


def _set(names_strengths):
    s = None
    for name, sm in names_strengths:
        (s,) = call_node("LoraSetLoad", lora_name=f"{name}.safetensors", strength_model=sm, strength_clip=1.0, lora_set=s)
    return s


def _deltas(model, patcher):
    w, base = patched_weights(patcher), model.model.state_dict()
    return {k: w[k] - base[k] for k in base}


def _close(a, b, tol=REL, floor=1e-7):
    return (a - b).abs().max().item() <= tol * max(b.abs().max().item(), floor) + floor


def _merge(model, s, method, rank=32, density=0.5, seed=0):
    return call_node("LoraSetMerge", model=model, lora_set=s, method=method, rank=rank, density=density, seed=seed)


@pytest.mark.parametrize("method", ["linear", "concat"])
def test_linear_and_concat_equal_applying_the_set(env, model, loras, method):
    s = _set([("m_a", 0.7), ("m_b", -1.2)])
    merged, report = _merge(model, s, method)
    applied = _deltas(model, call_node("LoraSetApply", model=model, lora_set=s)[0])
    via_merge = _deltas(model, call_node("LoraSetApply", model=model, lora_set=merged)[0])
    for k in applied:
        assert _close(via_merge[k], applied[k]), k
    tensors = merged.entries[0].tensors()
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")}
    assert ranks <= {2, 3, 5}, "stacked rank is the sum of the ranks of the LoRAs sharing a layer"


def test_linear_keeps_loha_exact_as_dense(env, model, loras):
    s = _set([("m_a", 1.0), ("m_c", 0.5)])
    merged, report = _merge(model, s, "linear")
    assert "stored dense" in report
    applied = _deltas(model, call_node("LoraSetApply", model=model, lora_set=s)[0])
    via_merge = _deltas(model, call_node("LoraSetApply", model=model, lora_set=merged)[0])
    assert all(_close(via_merge[k], applied[k]) for k in applied)


def test_concat_refuses_loha(env, model, loras):
    with pytest.raises(ValueError, match="concat merges plain LoRA"):
        _merge(model, _set([("m_a", 1.0), ("m_c", 1.0)]), "concat")


def test_text_encoder_only_set_without_clip_says_so(env, model, loras):
    """A set of text-encoder LoRAs merged without the CLIP input: the error says to connect it (it said "every
    strength or block weight is 0", with strengths of 1); with the CLIP it merges."""
    from harness.tiny_models import build_sd15_clip

    clip = build_sd15_clip(seed=92)
    lf.make_te_lora(clip.cond_stage_model.state_dict(), seed=7).save(env.models_dir / "loras" / "m_te.safetensors")
    s = _set([("m_te", 1.0)])
    with pytest.raises(ValueError, match="patch no weight of this model .* connect the CLIP input"):
        _merge(model, s, "svd")
    merged, _report = call_node("LoraSetMerge", model=model, lora_set=s, method="svd", rank=32, density=0.5, seed=0,
                                clip=clip)
    assert any(k.startswith("lora_te") for k in merged.entries[0].tensors())
    with pytest.raises(ValueError, match="every strength or block weight is 0"):
        _merge(model, _set([("m_a", 0.0)]), "svd")


def test_svd_full_rank_is_exact_and_truncation_reports_error(env, model, loras):
    s = _set([("m_a", 1.0), ("m_b", 1.0), ("m_c", 1.0)])
    applied = _deltas(model, call_node("LoraSetApply", model=model, lora_set=s)[0])
    merged, report = _merge(model, s, "svd", rank=1024)
    via = _deltas(model, call_node("LoraSetApply", model=model, lora_set=merged)[0])
    assert all(_close(via[k], applied[k], tol=1e-4) for k in applied), "full-rank SVD reproduces the sum"
    merged1, report1 = _merge(model, s, "svd", rank=1)
    worst = float(report1.split("worst ")[1].split(" ")[0])
    via1 = _deltas(model, call_node("LoraSetApply", model=model, lora_set=merged1)[0])
    errors = [((via1[k] - applied[k]).norm() / applied[k].norm()).item() for k in applied if applied[k].norm() > 0]
    assert worst == pytest.approx(max(errors), rel=1e-3)
    # Eckart–Young: a rank-1 SVD of the sum is the best rank-1 approximation
    k = max(applied, key=lambda k: applied[k].norm())
    flat = applied[k].reshape(applied[k].shape[0], -1)
    s_vals = torch.linalg.svdvals(flat)
    best = (s_vals[1:].square().sum().sqrt() / s_vals.square().sum().sqrt()).item()
    got = ((via1[k] - applied[k]).norm() / applied[k].norm()).item()
    assert got == pytest.approx(best, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_dare_match_merge_math_on_formula_deltas(env, model, loras, method):
    from kernels import merge_math

    s = _set([("m_a", 0.9), ("m_b", 0.6)])
    merged, _ = _merge(model, s, method, rank=0, density=0.4, seed=5)
    via = _deltas(model, call_node("LoraSetApply", model=model, lora_set=merged)[0])
    a, b = loras["m_a"].expected, loras["m_b"].expected
    layer_keys = sorted(set(a) | set(b))  # the merge walks target keys in sorted order; dare seeds with index
    for index, k in enumerate(layer_keys):
        deltas, weights = [], []
        for lora, w in ((a, 0.9), (b, 0.6)):
            if k in lora:
                deltas.append(lora[k])
                weights.append(w)
        want = (merge_math.ties_merge(deltas, weights, 0.4) if method == "ties"
                else merge_math.dare_merge(deltas, weights, 0.4, seed=5 + index))
        assert _close(via[k], want, tol=1e-4), k


def test_dare_is_seeded(env, model, loras):
    s = _set([("m_a", 1.0), ("m_b", 1.0)])
    t1 = _merge(model, s, "dare", rank=0, seed=1)[0].entries[0].tensors()
    t2 = _merge(model, s, "dare", rank=0, seed=1)[0].entries[0].tensors()
    t3 = _merge(model, s, "dare", rank=0, seed=2)[0].entries[0].tensors()
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert any(not torch.equal(t1[k], t3[k]) for k in t1)


def test_save_round_trip_with_core_loader(env, model, loras):
    s = _set([("m_a", 0.8), ("m_b", 0.5)])
    merged, _ = _merge(model, s, "svd", rank=8)
    (name,) = call_node("LoraSetSave", lora_set=merged, filename_prefix="tests/merged", dtype="fp32")
    path = env.models_dir / "loras" / name
    assert path.name.endswith("_00001.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["lora_composer_method"] == "svd" and meta["ss_network_module"] == "networks.lora"
    assert [x["name"] for x in json.loads(meta["lora_composer_sources"])] == ["m_a.safetensors", "m_b.safetensors"]
    in_memory = _deltas(model, call_node("LoraSetApply", model=model, lora_set=merged)[0])
    (reloaded,) = call_node("LoraSetLoad", lora_name=name, strength_model=1.0, strength_clip=1.0)
    ours = _deltas(model, call_node("LoraSetApply", model=model, lora_set=reloaded)[0])
    core = _deltas(model, call_node("LoraLoaderModelOnly", model=model, lora_name=name, strength_model=1.0)[0])
    assert all(torch.equal(ours[k], core[k]) for k in ours)
    assert all(_close(ours[k], in_memory[k]) for k in ours)
    (name2,) = call_node("LoraSetSave", lora_set=merged, filename_prefix="tests/merged", dtype="fp16")
    assert name2.endswith("_00002.safetensors")


@pytest.mark.parametrize("bad, match", [
    ("multi", "merge them into one"), ("strength", "fold them in"), ("prefix", "relative name"),
])
def test_save_refuses_what_a_file_cannot_hold(env, model, loras, bad, match):
    s = {"multi": _set([("m_a", 1.0), ("m_b", 1.0)]), "strength": _set([("m_a", 0.5)]),
         "prefix": _set([("m_a", 1.0)])}[bad]
    prefix = "../escape" if bad == "prefix" else "x"
    with pytest.raises(ValueError, match=match):
        call_node("LoraSetSave", lora_set=s, filename_prefix=prefix, dtype="fp16")


def test_save_refuses_values_its_dtype_cannot_hold(env, model, loras):
    """A strong (finite) merge whose up factor exceeds fp16's 65504: the fp16 file was written and LoraSetLoad then
    refused it as NaN / Inf. Now nothing is written and the message says which dtype holds it."""
    s = _set([("m_a", 1.0)])
    merged, _ = _merge(model, s, "svd", rank=8)
    (entry,) = merged.entries
    strong = dict(entry.tensors())
    up = next(k for k in strong if k.endswith("lora_up.weight"))
    strong[up] = strong[up] * 1e6
    huge = type(merged)((dataclasses.replace(entry, memory_tensors=strong),))
    before = set((env.models_dir / "loras").rglob("*.safetensors"))
    with pytest.raises(ValueError, match=r"1 tensor\(s\) exceed the range of fp16 .*nothing was written. Save as bf16"):
        call_node("LoraSetSave", lora_set=huge, filename_prefix="tests/overflow", dtype="fp16")
    assert set((env.models_dir / "loras").rglob("*.safetensors")) == before
    (name,) = call_node("LoraSetSave", lora_set=huge, filename_prefix="tests/overflow", dtype="bf16")
    call_node("LoraSetLoad", lora_name=name, strength_model=1.0, strength_clip=1.0)
