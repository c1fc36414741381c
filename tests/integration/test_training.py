"""LoraTrain on tiny models against real ComfyUI: learning, prior preservation, rank-relaxed, B-LoRA,
LiDB, text encoder, clean-up, and core's TrainLoraNode afterwards.

The tiny models are built under ``torch.inference_mode`` — what ComfyUI does when a graph loads a
checkpoint — so training must cope with inference-tensor weights exactly as in real use.
Oracles are independent of the engine: core ``LoraLoader`` applying the saved file, the LoRA
factory's formula deltas, ``torch.linalg.svdvals`` (Eckart–Young), ``nodes/hypernet/lidb.py``.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from harness import lora_factory as lf
from harness.node_calls import call_node
from harness.tiny_models import (SDXL_SAMPLING_OVERRIDES, build_sd15_clip, build_sdxl_clip, build_unet,
                                 emulate_gpu_loads, patched_weights, weights_snapshot)
from harness.training import (CLASS_PROMPT, PROMPT, assert_untouched, config, core_lora, denoising_error, inputs,
                              predictions, save, synthetic_latents)

ALL_LAYERS = "all linear+conv (like core)"


@pytest.fixture(scope="module")
def eng(env):
    class Engines:
        train = env.engine("nodes.training.train")
        session = env.engine("nodes.training.session")
        loop = env.engine("nodes.training.loop")
        cond = env.engine("nodes.training.conditioning")
        targets = env.engine("nodes.training.targets")
        pz = env.engine("nodes.training.parameterisation")
        lidb = env.engine("nodes.hypernet.lidb")
    return Engines


@pytest.fixture(scope="module")
def sd15():
    with torch.inference_mode():
        model, clip = build_unet("sd15", seed=3), build_sd15_clip(seed=4)
    return model, clip


@pytest.fixture(autouse=True)
def _quiet_progress():
    import comfy.utils

    before = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False
    yield
    comfy.utils.PROGRESS_BAR_ENABLED = before


# ------------------------------------------------------------------------------------------ learning

def _train_node(model, clip, prefix):
    """The LoraTrain node as a graph calls it: standard LoRA on attention, rank 4, 2 steps of batch 2."""
    return call_node(
        "LoraTrain", model=model, clip=clip, instance_prompt=PROMPT, identifier="sks",
        parameterisation="standard LoRA", targets="attention", rank=4, alpha=0.0, steps=2, learning_rate=1e-2,
        batch_size=2, optimizer="AdamW", lambda_prior=0.0, seed=0, gradient_checkpointing=False,
        training_dtype="auto", resolution=0, checkpoint_every=0, checkpoint_prefix=prefix,
        latents={"samples": synthetic_latents()})


def test_node_trains_and_leaves_the_model_untouched(env, eng, sd15):
    model, clip = sd15
    before = weights_snapshot(model.model)
    flags = {n: p.requires_grad for n, p in model.model.named_parameters()}
    with torch.inference_mode():  # ComfyUI's executor runs every node in inference mode
        lora_set, curve, report = _train_node(model, clip, "training/t1")
    assert_untouched(model, before, flags)
    assert curve.ndim == 4 and curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.dtype == torch.float32
    assert float(curve.min()) < 0.5 < float(curve.max()), "the curve image is drawn"
    assert report.startswith("standard LoRA, targets attention") and "WARNING" not in report
    (entry,) = lora_set.entries
    assert entry.strength_model == 1.0 and entry.metadata()["ss_network_module"] == "networks.lora"
    assert '"steps_done": 2' in entry.metadata()["lora_composer_training"]


def test_trains_when_loading_moves_the_weights(env, eng, monkeypatch):
    """Regression (first seen on CUDA): loading onto a GPU moves the weights; done with autograd on, the move
    left weights made under inference mode without a version counter and every forward failed. The session
    loads under inference mode, as ComfyUI does; the model still works for plain sampling afterwards."""
    with torch.inference_mode():
        model, clip = build_unet("sd15", seed=5), build_sd15_clip(seed=6)
    before = weights_snapshot(model.model)
    emulate_gpu_loads(monkeypatch)
    with torch.inference_mode():
        lora_set, _curve, _report = _train_node(model, clip, "training/moved")
    assert_untouched(model, before)
    (entry,) = lora_set.entries
    assert entry.tensors(), "a LoRA was trained"
    with torch.inference_mode():  # the base model still samples (a broken weight fails every op)
        out = model.model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1.0]),
                                      c_crossattn=torch.zeros(1, 77, 64))
    assert torch.isfinite(out).all()


def test_runs_in_a_comfyui_graph_images_through_a_vae(env):
    """Tiny checkpoint (stub VAE) → EmptyImage → LoraTrain → LoraSetSave, through ComfyUI's own executor."""
    import asyncio

    import nodes

    from harness.comfy_env import REPO_ROOT
    from harness.executor import run_prompt

    if "LoraComposerTest_TinyCheckpoint" not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(REPO_ROOT / "tests" / "server" / "testing_pack"),
                                                  module_parent="custom_nodes"))
    train = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": ["2", 0], "instance_prompt": PROMPT,
             "identifier": "sks", "parameterisation": "standard LoRA", "targets": "attention", "rank": 2,
             "alpha": 0.0, "steps": 2, "learning_rate": 1e-3, "batch_size": 1, "optimizer": "AdamW",
             "lambda_prior": 0.0, "seed": 0, "gradient_checkpointing": False, "training_dtype": "auto",
             "resolution": 64, "checkpoint_every": 0, "checkpoint_prefix": "training/graph_ckpt"}
    prompt = {
        "1": {"class_type": "LoraComposerTest_TinyCheckpoint", "inputs": {"family": "sd15"}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 2, "color": 0x336699}},
        "3": {"class_type": "LoraTrain", "inputs": train},
        "4": {"class_type": "LoraSetSave", "inputs": {"lora_set": ["3", 0], "filename_prefix": "training/graph",
                                                       "dtype": "fp16"}},
    }
    run = run_prompt(prompt)
    assert run.success, (run.node_errors, run.error, run.messages[-3:])
    assert (env.models_dir / "loras" / "training" / "graph_00001.safetensors").exists()
    assert "instance: 2 latents of 8×8" in run.outputs["3"]["text"][0]


def test_loss_falls_and_core_loraloader_reproduces_training_images(env, eng, sd15):
    model, clip = sd15
    latents = synthetic_latents()
    result = eng.train.train_lora(inputs(eng, model, clip, latents),
                                  config(eng, targets=ALL_LAYERS, steps=40, batch_size=2))
    h = result.history.total  # per-step losses are noisy in σ: compare averages of 10 steps
    assert sum(h[-10:]) / 10 < 0.95 * sum(h[:10]) / 10, h

    # the saved file is an ordinary LoRA: core's key map knows every module, core LoraLoader applies it,
    # and the model denoises the training images better than the base on held-out timesteps and noise
    name = save(result.lora_set, "training/learned")
    import comfy.lora

    with safe_open(str(env.models_dir / "loras" / name), "pt") as f:
        keys = list(f.keys())
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_up.weight")}
    assert len(modules) == len(eng.targets.select_targets(model, clip, ALL_LAYERS)) and modules <= set(key_map)
    trained, _ = core_lora(model, clip, name)
    base_err = denoising_error(eng, model, clip, latents, PROMPT)
    trained_err = denoising_error(eng, trained, clip, latents, PROMPT)
    assert trained_err < 0.9 * base_err, (trained_err, base_err)


def test_prior_preservation_reduces_class_drift(env, eng, sd15):
    """Same seeds, λ = 0 vs λ = 1 with class latents generated by the base model (real sampler)."""
    model, clip = sd15
    latents = synthetic_latents(seed=1)
    common = dict(targets=ALL_LAYERS, steps=20, batch_size=1, class_prompt=CLASS_PROMPT, num_class_images=2,
                  class_sampling_steps=2, seed=7)
    free = eng.train.train_lora(inputs(eng, model, clip, latents), config(eng, lambda_prior=0.0, **common))
    kept = eng.train.train_lora(inputs(eng, model, clip, latents), config(eng, lambda_prior=1.0, **common))
    assert kept.class_latents is not None and kept.class_latents.shape == (2, 4, 8, 8)
    assert "generated with the base model" in kept.report and len(kept.history.prior) == 20
    probe = kept.class_latents
    base = predictions(eng, model, clip, probe, CLASS_PROMPT)
    drift = {}
    for label, res in (("free", free), ("kept", kept)):
        patched = env.engine("nodes.patching").apply_lora_set(model, None, res.lora_set)[0]
        drift[label] = float((predictions(eng, patched, clip, probe, CLASS_PROMPT) - base).square().mean())
    assert drift["kept"] < 0.8 * drift["free"], drift


# ------------------------------------------------------------------------------------------ rank-relaxed

@pytest.fixture(scope="module")
def initial_lora_file(env, sd15):
    model, _ = sd15
    sd = model.model.state_dict()
    attention = [k for k in sd if ".attn2.to_" in k and k.endswith(".weight")][:3]
    conv = [k for k in sd if sd[k].ndim == 4 and "in_layers" in k][:1]  # outside the 'attention' targets
    lora = lf.make_lora(sd, attention + conv, "kohya", rank=2, alpha=1.0, seed=31)
    lora.save(env.models_dir / "loras" / "initial_rr.safetensors")
    return lora


def test_rank_relaxed_starts_at_the_initial_lora_and_svd_refactorises_the_merge(env, eng, sd15, initial_lora_file):
    model, clip = sd15
    latents = synthetic_latents(seed=2)
    (initial,) = call_node("LoraSetLoad", lora_name="initial_rr.safetensors", strength_model=1.0, strength_clip=1.0)
    targets = eng.targets.select_targets(model, clip, "attention")

    # step 0: the training model's output is exactly core LoraLoader's with the initial LoRA
    residual = eng.pz.StandardLora(targets, 4, 4.0, seed=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.8, 3.0])
    with torch.no_grad():
        cond = eng.cond.encode_tokens(clip, clip.tokenize(PROMPT))
    with eng.session.TrainingSession(model, clip, targets, initial_set=initial) as s, torch.no_grad():
        s.set_factors(residual.factors())
        row = eng.cond.row_conds(s.base_model, cond, (4, 8, 8), s.device)
        ours = s.predict_x0(x, sigma, eng.cond.concat_rows([row, row])[0][1])
    core_model, _ = core_lora(model, clip, "initial_rr.safetensors")
    with eng.session.TrainingSession(core_model, None, []) as s, torch.no_grad():
        theirs = s.predict_x0(x, sigma, eng.cond.concat_rows([row, row])[0][1])
    assert torch.equal(ours, theirs)

    # after training: merged ΔW = ΔW0 + (α/r)·up@down, re-factorised exactly at rank r0 + r
    result = eng.train.train_lora(inputs(eng, model, clip, latents, initial_lora=initial),
                                  config(eng, parameterisation="rank-relaxed from initial LoRA", steps=4,
                                         targets="attention"))
    exported = result.parameterisation.export()
    assert any(float(up.abs().max()) > 0 for up, _, _ in exported.values()), "the residual trained"
    merged = {}
    for key in set(initial_lora_file.expected) | set(exported):
        delta = initial_lora_file.expected.get(key, torch.zeros(()))
        if key in exported:
            up, down, alpha = exported[key]
            delta = delta + (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1)).reshape(sd15[0].model.state_dict()[key].shape)
        merged[key] = delta
    assert set(result.relaxed) == set(merged)
    for key, layer in result.relaxed.items():
        got = layer.up.flatten(1) @ layer.down.flatten(1)
        want = merged[key].flatten(1)
        assert (got - want).norm() <= 1e-5 * want.norm() + 1e-8, key
        assert layer.down.shape[0] == (2 if key in initial_lora_file.expected else 0) + (4 if key in exported else 0)

    # the saved file applies the merged delta (core LoraLoader, fp32 file)
    name = save(result.lora_set, "training/relaxed")
    applied, base = patched_weights(core_lora(model, clip, name)[0]), model.model.state_dict()
    for key, delta in merged.items():
        assert torch.allclose(applied[key] - base[key], delta, rtol=1e-4, atol=1e-6), key

    # a stated lower rank: the error is the Eckart–Young optimum and is reported
    low = eng.train.train_lora(inputs(eng, model, clip, latents, initial_lora=initial),
                               config(eng, parameterisation="rank-relaxed from initial LoRA", steps=4,
                                      targets="attention", relaxed_output_rank=1))
    for key, layer in low.relaxed.items():
        s = torch.linalg.svdvals(merged[key].flatten(1).double())
        optimum = float(s[1:].square().sum().sqrt() / s.square().sum().sqrt())
        assert layer.rel_error == pytest.approx(optimum, rel=1e-3, abs=1e-6), key
    assert "worst relative error" in low.report


def test_rank_relaxed_with_a_text_encoder_part_leaves_the_clip_untouched(env, eng, sd15):
    """The initial LoRA's CLIP part is applied to a patched CLIP clone for encoding, then unloaded."""
    import comfy.model_management as mm

    model, clip = sd15
    te = lf.make_te_lora(clip.cond_stage_model.state_dict(), "kohya", rank=2, seed=41)
    te.save(env.models_dir / "loras" / "initial_te.safetensors")
    (initial,) = call_node("LoraSetLoad", lora_name="initial_te.safetensors", strength_model=1.0, strength_clip=1.0)
    before = weights_snapshot(clip.cond_stage_model)
    result = eng.train.train_lora(inputs(eng, model, clip, synthetic_latents(seed=12), initial_lora=initial),
                                  config(eng, parameterisation="rank-relaxed from initial LoRA", steps=2))
    assert_untouched(clip.patcher, before)
    assert not any(m.model is not None and m.model.model is clip.cond_stage_model for m in mm.current_loaded_models)
    for key, delta in te.expected.items():  # the CLIP part comes back exactly (SVD at its own rank)
        layer = result.relaxed[key]
        assert torch.allclose(layer.up @ layer.down, delta, rtol=1e-4, atol=1e-6), key


# ------------------------------------------------------------------------------------------ B-LoRA

def test_blora_trains_only_the_two_named_blocks(env, eng):
    with torch.inference_mode():  # a class-conditional SDXL UNet whose context width is the tiny CLIP-L+G's
        model = build_unet("sdxl", seed=11, config_overrides=SDXL_SAMPLING_OVERRIDES)
        clip = build_sdxl_clip(seed=12)
    before = weights_snapshot(model.model)
    result = eng.train.train_lora(inputs(eng, model, clip, synthetic_latents(n=2, seed=3)),
                                  config(eng, targets="B-LoRA (SDXL content+style)", steps=2,
                                         gradient_checkpointing=True))
    assert_untouched(model, before)
    name = save(result.lora_set, "training/blora")
    with safe_open(str(env.models_dir / "loras" / name), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "lora_composer_blora" in meta
    blocks = ("lora_unet_output_blocks_0_1_", "lora_unet_output_blocks_1_1_")
    assert keys and all(k.startswith(blocks) for k in keys), sorted(k for k in keys if not k.startswith(blocks))
    sd = model.model.state_dict()
    expected = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_") for k in sd
                if k.endswith(".weight") and any(f".{b}." in k for b in ("output_blocks.0.1", "output_blocks.1.1"))
                and any(p in k for p in (".to_q.", ".to_k.", ".to_v.", ".to_out.0."))}
    assert {k.rsplit(".", 2)[0] for k in keys} == expected
    # separable later: the content preset of LoraSetBlocks changes output_blocks.0.1 only
    (s,) = call_node("LoraSetLoad", lora_name=name, strength_model=1.0, strength_clip=1.0)
    (s,) = call_node("LoraSetBlocks", lora_set=s, preset="B-LoRA content (SDXL output_blocks.0.1)",
                     block_weights="", apply_to="last entry")
    patched = patched_weights(call_node("LoraSetApply", model=model, lora_set=s)[0])
    changed = {k for k in sd if not torch.equal(sd[k], patched[k])}
    assert changed and all(".output_blocks.0.1." in k for k in changed)


# ------------------------------------------------------------------------------------------ LiDB, text encoder

def test_lidb_trains_in_the_hypernet_weight_space(env, eng, sd15):
    model, clip = sd15
    result = eng.train.train_lora(inputs(eng, model, clip, synthetic_latents(seed=4)),
                                  config(eng, parameterisation="LiDB", rank=1, lidb_down_dim=8, lidb_up_dim=4,
                                         steps=3, seed=9, targets="attention", alpha=16.0))
    param = result.parameterisation
    spec = eng.lidb.lidb_spec_for_model(model, rank=1, down_dim=8, up_dim=4, base_seed=9)
    assert param.spec.layers == spec.layers, "same layers and aux seeds as the hypernetwork's spec"
    assert param.trainable_count() == len(spec.layers) * (8 + 4)
    factors = eng.lidb.materialize(spec, {k: p.detach() for k, p in param.down_w.items()},
                                   {k: p.detach() for k, p in param.up_w.items()})
    tensors = result.lora_set.entries[0].tensors()
    names = env.engine("nodes.lora_keys").kohya_names(model)
    for key, (up, down) in factors.items():
        assert torch.equal(tensors[f"{names[key]}.lora_up.weight"], up.float())
        assert torch.equal(tensors[f"{names[key]}.lora_down.weight"], down.float())
        assert float(tensors[f"{names[key]}.alpha"]) == 1.0
    assert any(float(up.abs().max()) > 0 for up, _ in factors.values())
    # alpha does not apply to LiDB: the report says so and the metadata records what the file carries
    assert "alpha 16 is not used by LiDB" in result.report
    assert json.loads(result.lora_set.entries[0].metadata()["lora_composer_training"])["alpha"] == 1.0


def test_text_encoder_targets_train_the_clip(env, eng, sd15):
    model, clip = sd15
    clip_before = weights_snapshot(clip.cond_stage_model)
    result = eng.train.train_lora(inputs(eng, model, clip, synthetic_latents(seed=5)),
                                  config(eng, targets="attention+text encoder", steps=3, learning_rate=5e-2))
    assert_untouched(clip.patcher, clip_before)
    tensors = result.lora_set.entries[0].tensors()
    te_up = [k for k in tensors if k.startswith("lora_te") and k.endswith("lora_up.weight")]
    assert te_up and any(float(tensors[k].abs().max()) > 0 for k in te_up), "text-encoder LoRA received gradients"
    name = save(result.lora_set, "training/te")
    _, clip_lora = core_lora(model, clip, name)
    import comfy.model_management as mm

    mm.load_models_gpu([clip_lora.patcher], force_full_load=True)
    patched = weights_snapshot(clip_lora.cond_stage_model)
    mm.unload_all_models()
    changed = {k for k in clip_before if not torch.equal(clip_before[k], patched[k])}
    assert changed and all(".self_attn." in k for k in changed)


def test_gradient_checkpointing_gives_the_same_training(env, eng, sd15):
    model, clip = sd15
    latents = synthetic_latents(seed=6)
    runs = [eng.train.train_lora(inputs(eng, model, clip, latents), config(eng, steps=2, gradient_checkpointing=gc))
            for gc in (False, True)]
    assert runs[0].history.total == pytest.approx(runs[1].history.total, rel=1e-5)
    a, b = (r.lora_set.entries[0].tensors() for r in runs)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7) for k in a)


# ------------------------------------------------------------------------------------------ images, core

def test_images_through_a_vae_with_mixed_sizes(env, eng, sd15):
    if not env.complete:
        pytest.skip("needs a VAE: the 0.9.2 engine ships only an import placeholder for comfy/ldm/models/"
                    "autoencoder.py (run with COMFYUI_PATH=<complete 0.3.64 checkout>)")
    from PIL import Image

    from harness.tiny_vae import build_vae

    model, clip = sd15
    vae = build_vae()
    import folder_paths

    folder = "lc_train_mixed"
    path = (env.models_dir.parent / "input" / folder)
    path.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(8)
    for i, (w, h) in enumerate([(64, 64), (96, 72), (40, 80)]):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(path / f"img{i}.png")
    assert folder_paths.get_input_directory() == str(env.models_dir.parent / "input")
    batch = torch.rand(1, 64, 64, 3, generator=g)
    result = eng.train.train_lora(
        eng.train.TrainingInputs(model=model, clip=clip, vae=vae, images=batch, image_folder=folder),
        config(eng, steps=1, resolution=64))
    assert result.instance_latents.shape == (4, 4, 8, 8)
    assert "2 of 4 images resized to 64×64" in result.report


def _call_core_train(model, latents, positive):
    import nodes as comfy_nodes

    cls = comfy_nodes.NODE_CLASS_MAPPINGS["TrainLoraNode"]
    args = dict(model=model, latents={"samples": latents}, positive=positive, batch_size=1, steps=2,
                grad_accumulation_steps=1, learning_rate=1e-3, rank=2, optimizer="AdamW", loss_function="MSE",
                seed=0, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA", gradient_checkpointing=False,
                existing_lora="[None]")
    if hasattr(cls, "define_schema"):  # V3 node (0.9.2): every input arrives as a list
        args["bucket_mode"] = False
        return tuple(cls.execute(**{k: [v] for k, v in args.items()}).result)
    return cls().train(**args)


def test_core_trainloranode_still_works_after_ours(env, eng, sd15):
    model, clip = sd15
    latents = synthetic_latents(seed=10)
    eng.train.train_lora(inputs(eng, model, clip, latents), config(eng, steps=2, gradient_checkpointing=True))
    with torch.inference_mode():
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT))
    with torch.inference_mode():  # as ComfyUI's executor runs it
        out = _call_core_train(model, latents, positive)
    _, lora_sd, loss_map, steps = out[:4]
    assert steps == 2 and len(loss_map["loss"]) == 2 and all(torch.isfinite(torch.tensor(loss_map["loss"])))
    assert lora_sd and all(torch.isfinite(t).all() for t in lora_sd.values())
