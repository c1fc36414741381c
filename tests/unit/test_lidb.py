"""LiDB parameterisation (nodes/hypernet/lidb.py) against the formulas of algorithms.md §3.2.

Oracles: aux matrices re-drawn here from the stated law (randn under the layer seed, xavier std),
the factor products written out by hand, and a fresh Python process regenerating the aux bytes.
"""
from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from harness.node_calls import call_node
from harness.tiny_models import build_sd15_clip, build_unet, patched_weights

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def lidb(env):
    return env.engine("nodes.hypernet.lidb")


def _spec(lidb, law="xavier_normal", rank=2, down_dim=5, up_dim=3):
    layers = (lidb.LidbLayer("diffusion_model.a.attn1.to_q.weight", 7, 6, 11),
              lidb.LidbLayer("diffusion_model.b.attn2.to_k.weight", 9, 4, 12345678901234),
              lidb.LidbLayer("clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", 8, 8, 3))
    return lidb.LidbSpec(layers, rank=rank, down_dim=down_dim, up_dim=up_dim, init_law=law)


def _weights(spec, seed=0):
    g = torch.Generator().manual_seed(seed)
    down = {l.key: torch.randn(spec.rank, spec.down_dim, generator=g) for l in spec.layers}
    up = {l.key: torch.randn(spec.up_dim, spec.rank, generator=g) for l in spec.layers}
    return down, up


def test_xavier_aux_follow_the_stated_law(lidb):
    spec = _spec(lidb)
    for layer in spec.layers:
        g = torch.Generator().manual_seed(layer.seed)
        down_ref = torch.randn(spec.down_dim, layer.in_features, generator=g) * torch.tensor(
            math.sqrt(2 / (layer.in_features + spec.down_dim)), dtype=torch.float32)
        up_ref = torch.randn(layer.out_features, spec.up_dim, generator=g) * torch.tensor(
            math.sqrt(2 / (layer.out_features + spec.up_dim)), dtype=torch.float32)
        down_aux, up_aux = lidb.aux_matrices(spec, layer)
        assert torch.equal(down_aux, down_ref) and torch.equal(up_aux, up_ref)
        assert not down_aux.requires_grad


def test_orthogonal_aux_are_orthonormal(lidb):
    spec = _spec(lidb, "orthogonal", down_dim=5, up_dim=3)
    for layer in spec.layers:
        down_aux, up_aux = lidb.aux_matrices(spec, layer)
        assert torch.allclose(down_aux @ down_aux.t(), torch.eye(spec.down_dim), atol=1e-6)  # 5 ≤ in: rows
        assert torch.allclose(up_aux.t() @ up_aux, torch.eye(spec.up_dim), atol=1e-6)  # 3 ≤ out: columns
    wide = lidb.LidbSpec((lidb.LidbLayer("diffusion_model.x.attn1.to_q.weight", 4, 2, 1),), down_dim=6, up_dim=5,
                         init_law="orthogonal")
    down_aux, up_aux = lidb.aux_matrices(wide, wide.layers[0])
    assert torch.allclose(down_aux.t() @ down_aux, torch.eye(4), atol=1e-6)  # 6 > in 4: columns
    assert torch.allclose(up_aux @ up_aux.t(), torch.eye(2), atol=1e-6)  # 5 > out 2: rows


@pytest.mark.parametrize("law", ["xavier_normal", "orthogonal"])
def test_materialize_equals_the_formula(lidb, law):
    spec = _spec(lidb, law)
    down_w, up_w = _weights(spec)
    factors = lidb.materialize(spec, down_w, up_w)
    for layer in spec.layers:
        down_aux, up_aux = lidb.aux_matrices(spec, layer)
        up, down = factors[layer.key]
        assert up.shape == (layer.out_features, spec.rank) and down.shape == (spec.rank, layer.in_features)
        assert torch.equal(down, down_w[layer.key] @ down_aux)
        assert torch.equal(up, up_aux @ up_w[layer.key])
        # ΔW element by element: Σ_r Σ_u Σ_d up_aux[o,u] up_w[u,r] down_w[r,d] down_aux[d,i]
        dw = torch.einsum("ou,ur,rd,di->oi", up_aux.double(), up_w[layer.key].double(),
                          down_w[layer.key].double(), down_aux.double())
        assert torch.allclose((up @ down).double(), dw, rtol=1e-5, atol=1e-6)


def test_materialize_is_differentiable_and_follows_dtype(lidb):
    spec = _spec(lidb)
    down_w, up_w = _weights(spec)
    down_w = {k: v.double().requires_grad_() for k, v in down_w.items()}
    up_w = {k: v.double().requires_grad_() for k, v in up_w.items()}
    factors = lidb.materialize(spec, down_w, up_w)
    sum((u @ d).square().sum() for u, d in factors.values()).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in (*down_w.values(), *up_w.values()))
    up, down = factors[spec.layers[0].key]
    assert up.dtype == down.dtype == torch.float64


def test_materialize_rejects_wrong_shapes_and_missing_layers(lidb):
    spec = _spec(lidb)
    down_w, up_w = _weights(spec)
    key = spec.layers[0].key
    with pytest.raises(ValueError, match="expected down"):
        lidb.materialize(spec, {**down_w, key: torch.zeros(1, spec.down_dim)}, up_w)
    with pytest.raises(ValueError, match="lack layer"):
        lidb.materialize(spec, {k: v for k, v in down_w.items() if k != key}, up_w)


def test_flat_layout_round_trips(lidb):
    spec = _spec(lidb)
    flat = torch.arange(4 * spec.params_per_layer, dtype=torch.float32).reshape(4, -1)
    down_w, up_w = lidb.split_flat(spec, flat)
    assert down_w.shape == (4, spec.rank, spec.down_dim) and up_w.shape == (4, spec.up_dim, spec.rank)
    assert torch.equal(down_w[1].flatten(), flat[1, : spec.rank * spec.down_dim])  # down first, row-major
    assert torch.equal(lidb.join_flat(down_w, up_w), flat)
    with pytest.raises(ValueError, match="numbers per layer"):
        lidb.split_flat(spec, flat[:, :-1])


def test_spec_validation_and_json(lidb):
    spec = _spec(lidb)
    assert lidb.LidbSpec.from_json(spec.to_json()) == spec
    layer = spec.layers[0]
    with pytest.raises(ValueError, match="init_law"):
        lidb.LidbSpec((layer,), init_law="uniform")
    with pytest.raises(ValueError, match="twice"):
        lidb.LidbSpec((layer, layer))
    with pytest.raises(ValueError, match="rank"):
        lidb.LidbSpec((layer,), rank=0)
    with pytest.raises(ValueError, match="no target layers"):
        lidb.LidbSpec(())
    with pytest.raises(ValueError, match="lacks the field 'rank'"):
        lidb.LidbSpec.from_json({"layers": []})
    assert lidb.layer_seed(0, "a") == lidb.layer_seed(0, "a") != lidb.layer_seed(1, "a")


_CHILD = textwrap.dedent("""
    import hashlib, json, sys
    sys.path.insert(0, sys.argv[1])
    from nodes.hypernet import lidb          # plain import: no ComfyUI in this process
    spec = lidb.LidbSpec.from_json(json.loads(sys.argv[2]))
    h = hashlib.sha256()
    for layer in spec.layers:
        for t in lidb.aux_matrices(spec, layer):
            h.update(t.numpy().tobytes())
    print(h.hexdigest(), lidb.aux_fingerprint(spec))
""")


@pytest.mark.parametrize("law", ["xavier_normal", "orthogonal"])
def test_aux_regeneration_is_bit_exact_across_processes(lidb, law):
    import json

    spec = _spec(lidb, law, down_dim=100, up_dim=50)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(REPO_ROOT), json.dumps(spec.to_json())],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    child_bytes, child_fingerprint = out.stdout.split()
    h = hashlib.sha256()
    for layer in spec.layers:
        for t in lidb.aux_matrices(spec, layer):
            h.update(t.numpy().tobytes())
    assert child_bytes == h.hexdigest()
    assert child_fingerprint == lidb.aux_fingerprint(spec)


def test_kohya_names(lidb):
    assert lidb.kohya_prefix("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight") == \
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_out_0"
    te = "clip_l.transformer.text_model.encoder.layers.3.self_attn.k_proj.weight"
    assert lidb.kohya_prefix(te) == "lora_te_text_model_encoder_layers_3_self_attn_k_proj"
    assert lidb.kohya_prefix(te, sdxl_text_encoders=True).startswith("lora_te1_")
    assert lidb.kohya_prefix(te.replace("clip_l", "clip_g"), sdxl_text_encoders=True).startswith("lora_te2_")


def test_spec_for_model_and_entry_apply_exactly(env, lidb):
    model, clip = build_unet("sd15", seed=3), build_sd15_clip(seed=4)
    spec = lidb.lidb_spec_for_model(model, rank=1, down_dim=8, up_dim=4, base_seed=5)
    sd = model.model.state_dict()
    assert len(spec.layers) == 56 and all(lidb.UNET_ATTENTION.match(l.key) for l in spec.layers)
    assert {l.key.rsplit(".", 2)[-2] for l in spec.layers} == {"to_q", "to_k", "to_v", "0"}
    assert all((l.out_features, l.in_features) == tuple(sd[l.key].shape) for l in spec.layers)
    with pytest.raises(ValueError, match="needs a CLIP"):
        lidb.lidb_spec_for_model(model, include_text_encoder=True)
    with_te = lidb.lidb_spec_for_model(model, clip, include_text_encoder=True, down_dim=8, up_dim=4)
    assert len(with_te.layers) == 56 + 8 and with_te.layers[-1].is_text_encoder

    down_w, up_w = _weights(with_te, seed=9)
    factors = lidb.materialize(with_te, down_w, up_w)
    entry = lidb.lora_entry_from_factors("lidb-test", factors, strength_clip=0.5)
    assert entry.tensors()["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.alpha"].item() == 1.0
    patched_model, patched_clip, _report = call_node("LoraSetApply", model=model, clip=clip,
                                                     lora_set=env.engine("nodes.lora_set").LoraSet((entry,)))
    weights = patched_weights(patched_model)
    for layer in spec.layers:
        up, down = factors[layer.key]
        assert torch.allclose(weights[layer.key] - sd[layer.key], up @ down, atol=1e-6), layer.key
    clip_weights = patched_weights(patched_clip.patcher)
    clip_sd = clip.cond_stage_model.state_dict()
    te_layer = with_te.layers[-1]
    up, down = factors[te_layer.key]
    expected = (clip_sd[te_layer.key].float() + 0.5 * up @ down).to(clip_sd[te_layer.key].dtype)  # CLIP may be fp16
    assert torch.allclose(clip_weights[te_layer.key].float(), expected.float(), rtol=1e-3, atol=1e-5)

    bad = dict(factors)
    bad[spec.layers[0].key] = (torch.full_like(factors[spec.layers[0].key][0], float("nan")),
                               factors[spec.layers[0].key][1])
    with pytest.raises(ValueError, match="NaN"):
        lidb.lora_entry_from_factors("nan", bad)
