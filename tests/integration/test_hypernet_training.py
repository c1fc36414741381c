"""Training hypernets on synthetic worlds where the right answer is known (tiny, CPU, one thread).

* HyperDreamBooth: 16 drawn subjects along a curve of (colour, position); each has a known rank-1
  LoRA linear in its parameters. 12 train, 4 are held out.
* LoRA of Change: 8 subjects × 3 edits, one known LoRA per edit; 2 subjects are held out; the
  reversed pair must give the negated LoRA.
Plus resume, interrupt, NaN, the diffusion loss (against ComfyUI's own patching) and bad input.
Everything is measured in the LiDB space: targets are the projections of the known LoRAs.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import comfy.model_management as mm
import comfy.utils
import folder_paths
import pytest
import torch
from safetensors.torch import save_file

from harness import hypernet_synthetic as hs
from harness.node_calls import call_node
from harness.tiny_models import build_sd15_clip, build_unet, emulate_gpu_loads, patched_weights, weights_snapshot

CURVE = [(t, 0.8 * math.sin(2.5 * t)) for t in torch.linspace(-1, 1, 16).tolist()]
HELD_OUT = (2, 6, 9, 13)
TINY_ARCH = dict(rank=1, down_dim=16, up_dim=8, model_dim=32, decoder_blocks=1, iterations=4,
                 feature_source="last_hidden_state", aux_init="xavier_normal", include_text_encoder=False)


@pytest.fixture(scope="module")
def hn(env):
    folder_paths.add_model_folder_path("lora_hypernets", str(env.models_dir / "lora_hypernets"), is_default=True)
    return SimpleNamespace(folder=env.models_dir / "lora_hypernets", lidb=env.engine("nodes.hypernet.lidb"),
                           ex=env.engine("nodes.hypernet.examples"), tr=env.engine("nodes.hypernet.training"),
                           diff=env.engine("nodes.hypernet.diffusion"), gen=env.engine("nodes.hypernet.generate"),
                           ff=env.engine("nodes.hypernet.file_format"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hypertrain")
    model = build_unet("sd15", seed=1)
    keys = hs.attention_keys(model)
    return SimpleNamespace(tmp=tmp, model=model, keys=keys, clip_vision=hs.build_clip_vision(tmp, seed=0),
                           directions=hs.lora_directions(model, keys, 2, seed=2))


def _subject_folder(world, name="subjects", indices=None, latents=False):
    folder = world.tmp / name
    folder.mkdir(exist_ok=True)
    for n, theta in enumerate(CURVE):
        if indices is not None and n not in indices:
            continue
        hs.save_png(hs.draw_subject(theta), folder / f"s{n:02d}.png")
        hs.save_kohya(hs.subject_factors(world.directions, theta), folder / f"s{n:02d}.safetensors")
        if latents:
            g = torch.Generator().manual_seed(n)
            save_file({"latent_tensor": torch.randn(1, 4, 8, 8, generator=g),
                       "latent_format_version_0": torch.tensor([])}, str(folder / f"s{n:02d}.latent"))
    return folder


def _train(world, folder, **overrides):
    inputs = dict(clip_vision=world.clip_vision, model=world.model, examples_folder=str(folder), variant="image",
                  steps=250, learning_rate=3e-3, batch_size=4, seed=0, checkpoint_name="test/hn", checkpoint_every=0,
                  weight_loss=1.0, diffusion_loss=0.0, reverse_loss=1.0, resume="(start new)", **TINY_ARCH)
    inputs.update(overrides)
    return call_node("LoraHypernetTrain", **inputs)


def _projector(hn, spec):
    basis = hn.ex.lidb_basis(spec)
    q = {l.key: (basis.q_up[i], basis.q_down[i]) for i, l in enumerate(spec.layers)}
    return lambda deltas: {k: q[k][0] @ q[k][0].t() @ d @ q[k][1] @ q[k][1].t() for k, d in deltas.items()}


def _generated_deltas(hn, lora_set, keys):
    t = lora_set.entries[0].tensors()
    return {k: t[hn.lidb.kohya_prefix(k) + ".lora_up.weight"] @ t[hn.lidb.kohya_prefix(k) + ".lora_down.weight"]
            for k in keys}


def _sq(a, b=None):
    return sum(((a[k] - b[k]) if b is not None else a[k]).square().sum() for k in a).item()


def _encode(world, image):
    return call_node("CLIPVisionEncode", clip_vision=world.clip_vision, image=image, crop="center")[0]


@pytest.fixture(scope="module")
def trained(hn, world):
    folder = _subject_folder(world, indices=[n for n in range(16) if n not in HELD_OUT])
    hypernet, curve, report = _train(world, folder)
    return SimpleNamespace(hypernet=hypernet, curve=curve, report=report, folder=folder)


def test_training_learns_and_generalises_to_held_out_subjects(hn, world, trained):
    hypernet, project = trained.hypernet, _projector(hn, trained.hypernet.spec)
    weight = hypernet.training["losses"]["weight"]
    assert len(weight) == 250 and sum(weight[-10:]) / 10 <= weight[0] / 10, "weight-space loss must fall ≥ 10×"

    def errors(n):
        target = project(hs.deltas(hs.subject_factors(world.directions, CURVE[n])))
        (lora_set,) = call_node("LoraHypernetGenerate", hypernet=hypernet,
                                clip_vision_output=_encode(world, hs.draw_subject(CURVE[n])),
                                strength_model=1.0, strength_clip=1.0, model=world.model)
        return _sq(_generated_deltas(hn, lora_set, world.keys), target), _sq(target), target

    train_ids = [n for n in range(16) if n not in HELD_OUT]
    fits = [errors(n) for n in train_ids]
    assert sum(e for e, _, _ in fits) / sum(s for _, s, _ in fits) < 0.1, "the generated LoRAs fit the training set"
    mean = {k: sum(t[k] for _, _, t in fits) / len(fits) for k in world.keys}
    for n in HELD_OUT:
        generated_error, _, target = errors(n)
        assert generated_error < 0.5 * _sq(mean, target), f"held-out subject {n}: no better than the mean LoRA"
    assert "projection relative error" in trained.report and "weight loss (this run)" in trained.report
    assert trained.curve.shape == (1, 320, 512, 3) and trained.curve.std() > 0.01


def test_checkpoint_reloads_to_the_trained_outputs(hn, world, trained):
    path = trained.hypernet.path
    name = folder_paths.get_filename_list("lora_hypernets")
    relative = next(n for n in name if path.endswith(n))
    loaded, info = call_node("LoraHypernetLoad", hypernet_name=relative)
    assert "trained 250 steps" in info
    out = _encode(world, hs.draw_subject(CURVE[4]))
    a = call_node("LoraHypernetGenerate", hypernet=loaded, clip_vision_output=out, strength_model=1.0,
                  strength_clip=1.0)[0].entries[0].tensors()
    b = call_node("LoraHypernetGenerate", hypernet=trained.hypernet, clip_vision_output=out, strength_model=1.0,
                  strength_clip=1.0)[0].entries[0].tensors()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loc_variant_learns_an_edit_and_its_negation(hn, world):
    edits = [hs.subject_factors(hs.lora_directions(world.model, world.keys, 0, seed=10 + k, scale=1.0), ())
             for k in range(len(hs.EDITS))]
    subjects = [(t, 0.8 * math.sin(2.5 * t)) for t in torch.linspace(-1, 1, 8).tolist()]
    held = (2, 5)
    folder = world.tmp / "edits"
    folder.mkdir()
    for n, theta in enumerate(subjects):
        if n in held:
            continue
        image = hs.draw_subject(theta)
        for k in range(len(edits)):
            hs.save_png(image, folder / f"s{n}e{k}_before.png")
            hs.save_png(hs.edit_image(image, k), folder / f"s{n}e{k}_after.png")
            hs.save_kohya(edits[k], folder / f"s{n}e{k}.safetensors")
    hypernet, _, report = _train(world, folder, variant="pair", steps=160, checkpoint_name="test/loc")
    assert "reverse loss (this run)" in report
    project = _projector(hn, hypernet.spec)
    targets = [project(hs.deltas(e)) for e in edits]

    def generate(a, b):
        (s,) = call_node("LoraHypernetGeneratePair", hypernet=hypernet, before=_encode(world, a),
                         after=_encode(world, b), strength_model=1.0, strength_clip=1.0)
        return _generated_deltas(hn, s, world.keys)

    for n in held:
        image = hs.draw_subject(subjects[n])
        for k, target in enumerate(targets):
            edited = hs.edit_image(image, k)
            forward, backward = generate(image, edited), generate(edited, image)
            assert _sq(forward, target) < 0.1 * _sq(target), f"subject {n}, edit {hs.EDITS[k]}"
            assert _sq(backward, {key: -v for key, v in target.items()}) < 0.1 * _sq(target), "negation"
            other = targets[(k + 1) % len(targets)]
            assert _sq(forward, other) > _sq(target), "the edits are told apart"


def test_resume_continues_exactly_and_progress_reports_the_loss(hn, world, trained):
    small = dict(steps=6, model_dim=16, iterations=2, batch_size=3, seed=5)
    calls = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: calls.append((value, total, preview)))
    try:
        straight, _, _ = _train(world, trained.folder, checkpoint_name="test/straight", **small)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert [c[0] for c in calls][-1] == 6 and all(c[1] == 6 for c in calls)
    assert any(c[2] is not None and c[2][0] == "PNG" for c in calls), "the loss curve is previewed"
    half, _, _ = _train(world, trained.folder, checkpoint_name="test/half", **dict(small, steps=3))
    resume_name = half.path.split("lora_hypernets/")[-1]
    resumed, _, report = _train(world, trained.folder, checkpoint_name="test/resumed", resume=resume_name,
                                **dict(small, steps=3))
    assert "resumed from" in report and resumed.training["step"] == 6
    assert resumed.training["losses"]["total"] == pytest.approx(straight.training["losses"]["total"], rel=1e-6)
    for k, v in straight.network.state_dict().items():
        assert torch.allclose(resumed.network.state_dict()[k], v, rtol=1e-6, atol=1e-7), k


def test_interrupt_keeps_a_checkpoint(hn, world, trained):
    def interrupt_at_two(value, total, preview, **kw):
        if value == 2:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(interrupt_at_two)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(world, trained.folder, checkpoint_name="test/interrupted", steps=10, model_dim=16, iterations=1)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    path = max(hn.folder.glob("test/interrupted_*.safetensors"))
    hypernet = hn.ff.load_hypernet(str(path))
    assert hypernet.training["step"] == 2 and len(hypernet.training["losses"]["total"]) == 2


@pytest.mark.parametrize("gpu_moves", [False, True], ids=["cpu-load", "emulated-gpu-load"])
def test_diffusion_path_equals_comfy_patching_and_carries_gradients(hn, world, gpu_moves, monkeypatch):
    with torch.inference_mode():  # how ComfyUI's executor creates models: parameters are inference tensors
        model = build_unet("sd15", seed=7)
    if gpu_moves:  # loads move the weights, as on a GPU (regression: a move with autograd on broke them)
        emulate_gpu_loads(monkeypatch)
    spec = hn.lidb.lidb_spec_for_model(model, down_dim=8, up_dim=4)
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.enable_grad():
        ctx = hn.diff.prepare(model, None, spec, "")
        down_w = torch.randn(len(spec.layers), 1, 8, generator=g).requires_grad_()
        up_w = torch.randn(len(spec.layers), 4, 1, generator=g).requires_grad_()
        x, sigma = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([3.0])
        ours = hn.diff.denoise_with_lora(ctx, hn.diff.unet_factors(ctx, down_w, up_w), -1.0, x, sigma,
                                         hn.diff.model_conds(ctx, x, None))
        ours.square().mean().backward()
    assert down_w.grad.abs().sum() > 0 and up_w.grad.abs().sum() > 0
    factors = hn.lidb.materialize(spec, dict(zip(spec.keys, down_w.detach())), dict(zip(spec.keys, up_w.detach())))
    entry = hn.lidb.lora_entry_from_factors("ref", factors, strength_model=-1.0)
    patched, _, _ = call_node("LoraSetApply", model=model,
                              lora_set=hn.gen.LoraSet((entry,)))
    with torch.inference_mode():  # core's patching and forward, as ComfyUI's executor runs them
        mm.load_models_gpu([patched], force_full_load=True)
        reference = patched.model.apply_model(x, sigma, c_crossattn=torch.zeros(1, 77, 64))
    assert torch.allclose(ours.detach(), reference, rtol=1e-5, atol=1e-5)


def test_training_with_diffusion_loss_from_latents_and_clip(hn, world):
    folder = _subject_folder(world, "with_latents", indices=[0, 5, 10], latents=True)
    clip = build_sd15_clip(seed=3)
    with torch.inference_mode():  # as under ComfyUI's executor
        hypernet, _, report = _train(world, folder, steps=2, diffusion_loss=1.0, clip=clip, prompt="a photo of sks",
                                     model_dim=16, iterations=2, checkpoint_name="test/diffusion")
    losses = hypernet.training["losses"]
    assert len(losses["diffusion"]) == 2 and all(math.isfinite(v) and v > 0 for v in losses["diffusion"])
    assert "diffusion loss (this run)" in report


def test_diffusion_loss_leaves_no_gradient_in_the_base_model(hn, world):
    """A MODEL whose weights autograd tracks (built outside ComfyUI's executor, as here): the loss reaches the
    hypernet only — before, every UNet parameter got a .grad (a UNet's worth of memory) and a weight backward."""
    folder = _subject_folder(world, "grad_free", indices=[0, 5], latents=True)
    tracked = [p for p in world.model.model.parameters() if p.requires_grad]
    assert tracked, "the fixture's model must have autograd-tracked weights for this test to mean anything"
    before = weights_snapshot(world.model.model)
    _train(world, folder, steps=2, diffusion_loss=1.0, model_dim=16, iterations=1, checkpoint_name="test/grad_free")
    assert all(p.grad is None for p in world.model.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(world.model.model).items())


def test_pair_training_with_reverse_diffusion_term(hn, world):
    folder = world.tmp / "pair_latents"
    folder.mkdir()
    image = hs.draw_subject(CURVE[3])
    for n in range(2):
        hs.save_png(image, folder / f"p{n}_before.png")
        hs.save_png(hs.edit_image(image, n), folder / f"p{n}_after.png")
        hs.save_kohya(hs.subject_factors(world.directions, CURVE[n]), folder / f"p{n}.safetensors")
        for part, seed in (("before", 2 * n), ("after", 2 * n + 1)):
            save_file({"latent_tensor": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed)),
                       "latent_format_version_0": torch.tensor([])}, str(folder / f"p{n}_{part}.latent"))
    hypernet, _, _ = _train(world, folder, variant="pair", steps=1, diffusion_loss=0.5, batch_size=2, model_dim=16,
                            iterations=1, checkpoint_name="test/pairdiff")
    assert set(hypernet.training["losses"]) == {"total", "weight", "reverse", "diffusion", "diffusion_reverse"}


def test_diffusion_loss_with_a_vae(env, hn, world):
    if not env.complete:
        pytest.skip("the 0.9.2 engine has no working VAE (autoencoder import placeholder); .latent files cover it")
    import comfy.sd

    from harness.tiny_models import init_weights_

    vae = comfy.sd.VAE(sd={}, dtype=torch.float32, config={"params": {"embed_dim": 4, "ddconfig": {
        "double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}})
    init_weights_(vae.first_stage_model, 5, scale=0.05)
    folder = _subject_folder(world, "vae_only", indices=[1, 7])
    hypernet, _, _ = _train(world, folder, steps=1, diffusion_loss=1.0, vae=vae, model_dim=16, iterations=1,
                            checkpoint_name="test/vae")
    assert math.isfinite(hypernet.training["losses"]["diffusion"][0])


def test_nan_loss_stops_and_keeps_the_last_good_state(hn, world):
    folder = _subject_folder(world, "exploding", indices=[3, 8])
    for n in (3, 8):
        save_file({"latent_tensor": torch.full((1, 4, 8, 8), 3e38), "latent_format_version_0": torch.tensor([])},
                  str(folder / f"s{n:02d}.latent"))
    with pytest.raises(ValueError, match=r"stopped at step 1: the loss became NaN or Inf.*saved in hn_nan_\d+"):
        _train(world, folder, steps=3, diffusion_loss=1.0, model_dim=16, iterations=1, checkpoint_name="test/hn_nan")
    path = max(hn.folder.glob("test/hn_nan_*.safetensors"))
    kept = hn.ff.load_hypernet(str(path))
    assert kept.training["step"] == 0 and all(torch.isfinite(p).all() for p in kept.network.parameters())


def test_text_encoder_layers_train_and_apply(hn, world):
    clip = build_sd15_clip(seed=4)
    folder = world.tmp / "with_te"
    folder.mkdir()
    te_keys = [k for k in clip.cond_stage_model.state_dict() if hn.lidb.TEXT_ATTENTION.match(k)]
    sd = clip.cond_stage_model.state_dict()
    for n in (0, 15):
        factors = hs.subject_factors(world.directions, CURVE[n])
        g = torch.Generator().manual_seed(n)
        te = {k: (torch.randn(sd[k].shape[0], 1, generator=g) * 0.1, torch.randn(1, sd[k].shape[1], generator=g))
              for k in te_keys}
        tensors = {}
        for key, (up, down) in {**factors, **te}.items():
            prefix = hn.lidb.kohya_prefix(key)
            tensors.update({f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
                            f"{prefix}.alpha": torch.tensor(1.0)})
        save_file(tensors, str(folder / f"t{n}.safetensors"))
        hs.save_png(hs.draw_subject(CURVE[n]), folder / f"t{n}.png")
    hypernet, _, _ = _train(world, folder, steps=2, clip=clip, include_text_encoder=True, model_dim=16, iterations=1,
                            checkpoint_name="test/te")
    assert sum(l.is_text_encoder for l in hypernet.spec.layers) == len(te_keys) == 8
    (lora_set,) = call_node("LoraHypernetGenerate", hypernet=hypernet, strength_model=1.0, strength_clip=1.0,
                            clip_vision_output=_encode(world, hs.draw_subject(CURVE[0])), model=world.model, clip=clip)
    _, patched_clip, report = call_node("LoraSetApply", model=world.model, clip=clip, lora_set=lora_set)
    assert "56 model + 8 CLIP weights patched" in report and "0 unmatched" in report
    weights = patched_weights(patched_clip.patcher)
    assert not torch.equal(weights[te_keys[0]], sd[te_keys[0]])
    unet_only = _subject_folder(world, "no_te", indices=[0])
    with pytest.raises(ValueError, match="does not cover 8 of the 64 LiDB target layers"):
        _train(world, unet_only, steps=1, clip=clip, include_text_encoder=True, model_dim=16, iterations=1)
    with pytest.raises(ValueError, match="resume: te_\\d+ trains 8 text-encoder layers; connect the CLIP"):
        _train(world, folder, steps=1, model_dim=16, iterations=1, resume=hypernet.path.split("lora_hypernets/")[-1])


@pytest.mark.parametrize("case, match", [
    ("empty", "holds no training examples; expected files like <name>.safetensors \\+ <name>.png"),
    ("missing", "is not a folder"),
    ("no_image", r"1 target LoRA\(s\) lack their image\(s\): s00.safetensors \(needs s00.png\)"),
    ("pickle", "holds pickle files"),
    ("partial_lora", "does not cover 42 of the 56 LiDB target layers"),
    ("unreadable_lora", "training LoRA broken.safetensors"),
    ("no_latents", "the diffusion loss needs latents: connect a VAE, or put s00.latent"),
    ("latent_channels", "s00.latent: a 16-channel latent; the connected model uses 4-channel latents"),
    ("resume_variant", "is a 'image' hypernet, not 'pair'"),
    ("nothing_to_train", "nothing to train"),
    ("te_without_clip", "include_text_encoder needs a CLIP"),
])
def test_bad_training_input(hn, world, trained, case, match):
    folder = world.tmp / f"bad_{case}"
    folder.mkdir()
    overrides = dict(steps=1, model_dim=16, iterations=1)
    if case == "missing":
        folder = folder / "nowhere"
    elif case == "no_image":
        hs.save_kohya(hs.subject_factors(world.directions, CURVE[0]), folder / "s00.safetensors")
    elif case == "pickle":
        (folder / "target.pt").write_bytes(b"\x80\x04K\x01.")
    elif case in ("partial_lora", "unreadable_lora"):
        factors = hs.subject_factors(world.directions, CURVE[0])
        name = "s00" if case == "partial_lora" else "broken"
        hs.save_png(hs.draw_subject(CURVE[0]), folder / f"{name}.png")
        if case == "partial_lora":
            hs.save_kohya({k: v for k, v in factors.items() if k.endswith("to_q.weight")}, folder / "s00.safetensors")
        else:
            (folder / "broken.safetensors").write_bytes(b"not safetensors")
    elif case in ("no_latents", "latent_channels", "resume_variant", "nothing_to_train", "te_without_clip"):
        folder = _subject_folder(world, f"bad_{case}", indices=[0], latents=case == "latent_channels")
        if case in ("no_latents", "latent_channels"):
            overrides["diffusion_loss"] = 1.0
            if case == "latent_channels":  # an SD3 / Flux latent beside an SD1.5 model: refused before the UNet
                save_file({"latent_tensor": torch.randn(1, 16, 8, 8), "latent_format_version_0": torch.tensor([])},
                          str(folder / "s00.latent"))
        elif case == "resume_variant":
            overrides.update(variant="pair", resume=trained.hypernet.path.split("lora_hypernets/")[-1])
            (folder / "s00.png").rename(folder / "s00_before.png")
            hs.save_png(hs.draw_subject(CURVE[1]), folder / "s00_after.png")
        elif case == "nothing_to_train":
            overrides["weight_loss"] = 0.0
        else:
            overrides["include_text_encoder"] = True
    with pytest.raises(ValueError, match=match):
        _train(world, folder, **overrides)


def test_train_node_reruns_when_the_examples_change(world, trained):
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["LoraHypernetTrain"]
    before = cls.IS_CHANGED(examples_folder=str(trained.folder))
    assert before == cls.IS_CHANGED(examples_folder=str(trained.folder))
    extra = trained.folder / "zz_new.txt"
    extra.write_text("x")
    try:
        assert cls.IS_CHANGED(examples_folder=str(trained.folder)) != before
    finally:
        extra.unlink()
    assert cls.IS_CHANGED(examples_folder=str(world.tmp / "nowhere")).startswith("unreadable")
    load = nodes.NODE_CLASS_MAPPINGS["LoraHypernetLoad"]  # a hypernet file written again under its name: re-read
    name = trained.hypernet.path.split("lora_hypernets/")[-1]
    signature = load.IS_CHANGED(hypernet_name=name)
    stat = os.stat(trained.hypernet.path)
    os.utime(trained.hypernet.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert signature and load.IS_CHANGED(hypernet_name=name) != signature


def _tiny_ip2p():
    """A tiny InstructPix2Pix UNet (8 input channels: noisy latent + the conditioning image's latent)."""
    import comfy.model_patcher
    import comfy.supported_models

    from harness.tiny_models import SD15_TINY, init_weights_

    config = comfy.supported_models.SD15_instructpix2pix(dict(SD15_TINY, in_channels=8, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({}, device=torch.device("cpu"))
    init_weights_(base.diffusion_model, 9)
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def test_loc_diffusion_on_instructpix2pix_conditions_on_the_other_image(hn, world):
    model = _tiny_ip2p()
    spec = hn.lidb.lidb_spec_for_model(model, down_dim=8, up_dim=4)
    g = torch.Generator().manual_seed(1)
    before, after = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    with torch.inference_mode(False):
        ctx = hn.diff.prepare(model, None, spec, "")
        x = torch.randn(1, 4, 8, 8, generator=g)
        conds = hn.diff.model_conds(ctx, x, before)
        assert torch.equal(conds["c_concat"], before), "the before image is IP2P's concat condition"
        down_w = torch.randn(len(spec.layers), 1, 8, generator=g)
        up_w = torch.randn(len(spec.layers), 4, 1, generator=g)
        factors = hn.diff.unet_factors(ctx, down_w, up_w)
        sigma = torch.tensor([1.0])
        with_before = hn.diff.denoise_with_lora(ctx, factors, 1.0, x, sigma, conds)
        with_after = hn.diff.denoise_with_lora(ctx, factors, 1.0, x, sigma, hn.diff.model_conds(ctx, x, after))
    assert not torch.allclose(with_before, with_after)
    folder = world.tmp / "ip2p"
    folder.mkdir()
    image = hs.draw_subject(CURVE[5])
    hs.save_png(image, folder / "e_before.png")
    hs.save_png(hs.edit_image(image, 0), folder / "e_after.png")
    hs.save_kohya(hs.subject_factors(world.directions, CURVE[5]), folder / "e.safetensors")
    for part, latent in (("before", before), ("after", after)):
        save_file({"latent_tensor": latent, "latent_format_version_0": torch.tensor([])},
                  str(folder / f"e_{part}.latent"))
    hypernet, _, _ = _train(world, folder, model=model, variant="pair", steps=2, diffusion_loss=1.0, batch_size=1,
                            model_dim=16, iterations=1, checkpoint_name="test/ip2p")
    assert hypernet.config.base_model == "SD15_instructpix2pix"
    assert all(math.isfinite(v) for v in hypernet.training["losses"]["diffusion_reverse"])
