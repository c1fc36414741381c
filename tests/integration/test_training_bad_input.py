"""LoraTrain bad input: clear errors naming the input, nothing lost (checkpoints kept, base intact).

Out-of-memory and interrupts are simulated inside the real training step (the step function is
wrapped, the rest of the engine and ComfyUI run for real).
"""
from __future__ import annotations

import logging
import os

import pytest
import torch

from harness.tiny_models import build_sd15_clip, build_unet, weights_snapshot
from harness.training import assert_untouched, config, core_lora, inputs, synthetic_latents


@pytest.fixture(scope="module")
def eng(env):
    class Engines:
        train = env.engine("nodes.training.train")
        loop = env.engine("nodes.training.loop")
        data = env.engine("nodes.training.data")
    return Engines


@pytest.fixture(scope="module")
def sd15():
    with torch.inference_mode():
        return build_unet("sd15", seed=13), build_sd15_clip(seed=14)


@pytest.fixture(autouse=True)
def _quiet_progress():
    import comfy.utils

    before = comfy.utils.PROGRESS_BAR_ENABLED
    comfy.utils.PROGRESS_BAR_ENABLED = False
    yield
    comfy.utils.PROGRESS_BAR_ENABLED = before


def run(eng, model, clip, latents=None, **kw):
    extra = {k: kw.pop(k) for k in list(kw) if k in ("images", "vae", "image_folder", "class_latents", "class_images",
                                                       "initial_lora")}
    latents = synthetic_latents(n=2) if latents is None else latents
    return eng.train.train_lora(inputs(eng, model, clip, latents, **extra) if latents is not False else
                                eng.train.TrainingInputs(model=model, clip=clip, **extra), config(eng, **kw))


# ------------------------------------------------------------------------------------------ images

def test_no_images(eng, sd15):
    with pytest.raises(ValueError, match=r"no instance images: connect 'images'.*'image_folder'.*'latents'"):
        run(eng, *sd15, latents=False)


def test_images_without_a_vae(eng, sd15):
    with pytest.raises(ValueError, match="images need a VAE to be encoded; connect 'vae', or give latents"):
        run(eng, *sd15, latents=False, images=torch.rand(2, 64, 64, 3))


def test_images_and_latents_together_are_ambiguous(eng, sd15):
    with pytest.raises(ValueError, match="give instance images or instance latents, not both"):
        run(eng, *sd15, images=torch.rand(1, 64, 64, 3))


def test_latents_of_another_model_family(eng, sd15):
    with pytest.raises(ValueError, match="instance_latents has 16 channels; the connected model uses 4-channel"):
        run(eng, *sd15, latents=torch.zeros(1, 16, 8, 8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_latents_are_refused_before_training(eng, sd15, bad):
    """A NaN in the data used to surface as "the training loss became nan … lower learning_rate" at step 1."""
    latents = synthetic_latents(n=3)
    latents[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"instance_latents contains NaN or infinite values \(latent 1 of 3\)"):
        run(eng, *sd15, latents=latents)


def test_class_images_from_the_largest_seed(env, sd15):
    """The seed input allows 2^64 - 1; the class images' seeds (seed + offset + index) wrap instead of overflowing
    torch's generator ("Overflow when unpacking long long")."""
    prior = env.engine("nodes.training.prior")
    model, clip = sd15
    top = prior.generate_class_latents(model, clip, "a dog", 2, (4, 8, 8), 1, seed=2**64 - 1, batch_size=1)
    assert top.shape == (2, 4, 8, 8) and top.isfinite().all() and not torch.equal(top[0], top[1])


def test_folder_outside_the_input_directory(eng, sd15):
    with pytest.raises(ValueError, match="must be a folder inside ComfyUI's input directory"):
        run(eng, *sd15, latents=False, image_folder="../models")
    with pytest.raises(ValueError, match="does not exist in ComfyUI's input directory"):
        run(eng, *sd15, latents=False, image_folder="no_such_folder")


def test_image_folder_changes_rerun_the_node(env, eng):
    """IS_CHANGED follows the folder's image files, so ComfyUI's cache does not hide new images."""
    from PIL import Image

    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS["LoraTrain"]
    folder = env.models_dir.parent / "input" / "lc_changes"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(folder / "a.png")
    first = cls.IS_CHANGED(image_folder="lc_changes", steps=2)
    assert first and first == cls.IS_CHANGED(image_folder="lc_changes", steps=3)
    Image.new("RGB", (16, 16), "blue").save(folder / "b.png")
    assert cls.IS_CHANGED(image_folder="lc_changes") != first
    assert cls.IS_CHANGED(image_folder="") == "" and cls.IS_CHANGED(image_folder="../outside") == ""


def test_mixed_sizes_follow_the_documented_resize_crop_rule(eng):
    """Centre crop to the target aspect, then Lanczos; images already at the size are untouched."""
    half = torch.zeros(72, 96, 3)
    half[:, :48, 0] = 1.0  # left half red, right half blue: a centre crop keeps the split in the middle
    half[:, 48:, 2] = 1.0
    first = torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0))
    tall = torch.rand(80, 40, 3)
    batch, notes = eng.data.conform_images([first, half, tall], resolution=0)
    assert batch.shape == (3, 64, 64, 3)
    assert torch.equal(batch[0], first), "an image at the target size is not resampled"
    assert notes == ["2 of 3 images resized to 64×64 (centre crop to the aspect ratio, then Lanczos); the images "
                     "had 3 different sizes."]
    cropped = batch[1]
    assert float(cropped[:, :30, 0].min()) > 0.9 and float(cropped[:, 34:, 2].min()) > 0.9
    square, _ = eng.data.conform_images([half], resolution=36)
    assert square.shape == (1, 32, 32, 3), "resolution rounds down to a multiple of 8"
    with pytest.raises(ValueError, match="resolution must be ≥ 0"):
        eng.data.conform_images([half], resolution=-1)


# ------------------------------------------------------------------------------------------ prompts, ranks, targets

def test_prompt_without_the_identifier_warns(eng, sd15, caplog):
    with caplog.at_level(logging.WARNING):
        result = run(eng, *sd15, instance_prompt="a photo of a dog", steps=1)
    assert "does not contain the identifier 'sks'" in result.report
    assert any("does not contain the identifier" in r.getMessage() for r in caplog.records)
    assert result.history.steps_done == 1, "a warning, not an error"


def test_rank_larger_than_a_layer_allows(eng, sd15):
    with pytest.raises(ValueError, match=r"rank 64 is larger than \d+ target layer\(s\) allow: e\.g\. diffusion_model\..*"
                                         r"allows at most 32\. With these targets rank can be at most 32"):
        run(eng, *sd15, rank=64)


def test_all_layers_preset_caps_the_rank_of_narrow_layers(eng, sd15):
    """The 4-channel output conv allows rank 4 at most: capped there (and said so), not an error."""
    result = run(eng, *sd15, targets="all linear+conv (like core)", rank=8, steps=1)
    assert "rank 8 capped to each layer's limit on" in result.report
    tensors = result.lora_set.entries[0].tensors()
    assert tensors["lora_unet_out_2.lora_down.weight"].shape[0] == 4
    assert float(tensors["lora_unet_out_2.alpha"]) == 4.0, "alpha scaled with the rank: same scale alpha/rank"
    assert tensors["lora_unet_input_blocks_1_1_proj_in.lora_down.weight"].shape[0] == 8


def test_blora_needs_sdxl(eng, sd15):
    with pytest.raises(ValueError, match=r"needs an SDXL UNet with transformer blocks output_blocks\.0\.1 and "
                                         r"output_blocks\.1\.1.*the connected model is SD15"):
        run(eng, *sd15, targets="B-LoRA (SDXL content+style)")


def test_lidb_refuses_conv_targets(eng, sd15):
    with pytest.raises(ValueError, match="'LiDB' adapts Linear layers only"):
        run(eng, *sd15, parameterisation="LiDB", rank=1, targets="all linear+conv (like core)")


def test_rank_relaxed_needs_an_initial_lora(eng, sd15):
    with pytest.raises(ValueError, match="needs initial_lora"):
        run(eng, *sd15, parameterisation="rank-relaxed from initial LoRA")


def test_prior_preservation_inputs(eng, sd15):
    with pytest.raises(ValueError, match="class_prompt is empty but lambda_prior > 0"):
        run(eng, *sd15, lambda_prior=1.0)
    with pytest.raises(ValueError, match="lambda_prior > 0 needs class images: .*num_class_images > 0"):
        run(eng, *sd15, lambda_prior=1.0, class_prompt="a photo of dog")
    with pytest.raises(ValueError, match="class_latents are 4×4 latents but the instance latents are 8×8"):
        run(eng, *sd15, lambda_prior=1.0, class_prompt="a photo of dog", class_latents={"samples": torch.zeros(1, 4, 4, 4)})


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps must be in 1…"), ("learning_rate", float("nan"), "learning_rate must be a number in"),
    ("lambda_prior", -1.0, "lambda_prior must be a finite number ≥ 0"), ("optimizer", "Lion", "optimizer must be one of"),
    ("targets", "everything", "targets must be one of"), ("checkpoint_prefix", "../escape", "checkpoint_prefix '../escape'"),
    ("instance_prompt", "  ", "instance_prompt is empty"),
])
def test_bad_settings_name_the_input(eng, sd15, field, value, match):
    with pytest.raises(ValueError, match=match):
        run(eng, *sd15, **{field: value})


# ------------------------------------------------------------------------------------------ OOM, interrupt, NaN

def _wrap_step(monkeypatch, eng, before=lambda n: None, after=lambda n: None):
    original = eng.loop.training_step
    calls = {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        before(calls["n"])
        out = original(*args, **kwargs)
        after(calls["n"])
        return out

    monkeypatch.setattr(eng.loop, "training_step", step)
    return calls


def test_out_of_memory_says_what_to_reduce_and_keeps_the_checkpoint(env, eng, sd15, monkeypatch):
    import comfy.model_management as mm

    model, clip = sd15
    before = weights_snapshot(model.model)

    def oom(n):
        if n == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    _wrap_step(monkeypatch, eng, before=oom)
    with pytest.raises(mm.OOM_EXCEPTION) as info:
        run(eng, model, clip, steps=6, checkpoint_every=2, checkpoint_prefix="training/oom", batch_size=2)
    message = str(info.value)
    assert message.startswith("LoraTrain ran out of memory at step 3 of 6 (2 latents of 8×8 per step")
    assert "Reduce: batch_size (now 2); resolution" in message and "turn gradient_checkpointing on" in message
    checkpoint = message.split("The last checkpoint is ")[1].rstrip(".")
    assert os.path.basename(checkpoint) == "oom_step000002_00001.safetensors" and os.path.exists(checkpoint)
    assert_untouched(model, before)


def test_interrupt_keeps_the_last_checkpoint_and_the_base_weights(env, eng, sd15, monkeypatch):
    import comfy.model_management as mm

    model, clip = sd15
    before = weights_snapshot(model.model)

    def interrupt(n):
        if n == 3:  # the user presses Cancel during step 3; the loop stops before step 4
            mm.interrupt_current_processing(True)

    _wrap_step(monkeypatch, eng, after=interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(eng, model, clip, steps=8, checkpoint_every=2, checkpoint_prefix="training/cancel")
    finally:
        mm.interrupt_current_processing(False)
    folder = env.models_dir / "loras" / "training"
    assert (folder / "cancel_step000002_00001.safetensors").exists(), "the periodic checkpoint is kept"
    last = folder / "cancel_step000003_00001.safetensors"
    assert last.exists(), "the last completed step is saved on interrupt"
    assert not (folder / "cancel_step000002_00002.safetensors").exists(), "no duplicate of a saved step"
    assert_untouched(model, before)
    patched, _ = core_lora(model, clip, "training/cancel_step000003_00001.safetensors")
    assert len(patched.patches) > 0, "the checkpoint is an ordinary LoRA core loads"


def test_non_finite_loss_stops_with_advice(eng, sd15, monkeypatch):
    monkeypatch.setattr(eng.loop, "training_step", lambda *a, **k: (float("nan"), float("nan"), 0.0))
    with pytest.raises(ValueError, match=r"the training loss became nan at step 1; lower learning_rate"):
        run(eng, *sd15)
