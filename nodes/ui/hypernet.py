"""Hypernetwork → LoRA nodes: load, generate from an image or a before/after pair, train.

Importing this module registers the ``lora_hypernets`` models folder with ComfyUI (see
``register_hypernet_folder``).
"""
from __future__ import annotations

import os
import re

import folder_paths

from ..hypernet.examples import folder_signature
from ..hypernet.file_format import FOLDER_NAME, LORA_HYPERNET_TYPE, load_hypernet
from ..hypernet.generate import generate_from_image, generate_from_pair
from ..hypernet.lidb import INIT_LAWS
from ..hypernet.network import FEATURE_SOURCES, VARIANTS
from ..hypernet.training import ArchSettings, TrainSettings, load_checkpoint, train_hypernet
from ..lora_set import LORA_SET_TYPE
from ..registry import register_node
from ..saving import next_free_path
from .common import file_signature, lora_set_input, strength_input

HYPERNET_EXTENSIONS = {".safetensors"}
NO_RESUME = "(start new)"


def register_hypernet_folder() -> None:
    """Add ``models/lora_hypernets`` to ``folder_paths``; keep any folder a user already registered.

    An existing registration (extra_model_paths.yaml, another pack) keeps its paths and first place;
    ours is appended. Its extension filter gains ``.safetensors`` unless it already accepts everything.
    """
    default = os.path.join(folder_paths.models_dir, FOLDER_NAME)
    existing = folder_paths.folder_names_and_paths.get(FOLDER_NAME)
    if existing is None:
        folder_paths.folder_names_and_paths[FOLDER_NAME] = ([default], set(HYPERNET_EXTENSIONS))
        return
    paths, extensions = existing
    if default not in paths:
        paths.append(default)
    if extensions:
        extensions.update(HYPERNET_EXTENSIONS)


register_hypernet_folder()


def hypernet_names() -> list[str]:
    return folder_paths.get_filename_list(FOLDER_NAME)


def hypernet_input(tooltip: str = "A hypernetwork from 'Load LoRA hypernet' or 'Train LoRA hypernet'.") -> tuple:
    return (LORA_HYPERNET_TYPE, {"tooltip": tooltip})


def clip_vision_output_input(tooltip: str) -> tuple:
    return ("CLIP_VISION_OUTPUT", {"tooltip": tooltip})


def checkpoint_path(name: str) -> str:
    name = (name or "").strip().replace("\\", "/")
    if not name or name.startswith("/") or ".." in name.split("/") or re.search(r"[<>:\"|?*\x00]", name):
        raise ValueError(f"checkpoint_name {name!r} must be a relative name inside the {FOLDER_NAME} folder, "
                         "e.g. 'faces/my_hypernet'.")
    return next_free_path(folder_paths.get_folder_paths(FOLDER_NAME)[0], name)


@register_node("LoraHypernetLoad", "Load LoRA hypernet", "hypernet")
class LoraHypernetLoad:
    DESCRIPTION = ("Loads a hypernetwork that turns an image (HyperDreamBooth) or a before/after pair (LoRA of "
                   "Change) into a LoRA, from the 'lora_hypernets' models folder. Only LoRA Composer hypernet "
                   ".safetensors files are accepted; the file's metadata describes its layers, LiDB space and "
                   "image features. Train one with 'Train LoRA hypernet'.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hypernet_name": (hypernet_names(), {
            "tooltip": "A hypernet file in models/lora_hypernets (.safetensors)."})}}

    RETURN_TYPES = (LORA_HYPERNET_TYPE, "STRING")
    RETURN_NAMES = ("hypernet", "info")
    OUTPUT_TOOLTIPS = ("The hypernetwork, for the Generate nodes.", "What the file holds.")
    FUNCTION = "load"

    @classmethod
    def IS_CHANGED(cls, hypernet_name="", **_inputs):
        """Re-run when the file changes on disk (a training run writing the same name again)."""
        return file_signature(FOLDER_NAME, hypernet_name)

    def load(self, hypernet_name):
        hypernet = load_hypernet(folder_paths.get_full_path_or_raise(FOLDER_NAME, hypernet_name), hypernet_name)
        return (hypernet, hypernet.describe())


def _generate_inputs(images: dict) -> dict:
    return {"required": {"hypernet": hypernet_input(), **images,
                         "strength_model": strength_input(1.0, "diffusion model"),
                         "strength_clip": strength_input(1.0, "text encoder (CLIP)")},
            "optional": {"lora_set": lora_set_input("A set to append the generated LoRA to (optional)."),
                         "model": ("MODEL", {"tooltip": "Optional: check that the hypernet fits this model and "
                                                        "name any missing layers before generating."}),
                         "clip": ("CLIP", {"tooltip": "Optional, with model: also check text-encoder layers."})}}


@register_node("LoraHypernetGenerate", "Generate LoRA from image (hypernet)", "hypernet")
class LoraHypernetGenerate:
    DESCRIPTION = ("HyperDreamBooth: predicts a LoRA for the subject of an image in one forward pass. Encode the "
                   "image with 'CLIP Vision Encode' (the CLIP-vision model the hypernet was trained with); several "
                   "images in the batch are read together as views of one subject. The result is an ordinary LoRA "
                   "in a LORA_SET: apply it, compose it, or save it with 'Save LoRA set'.")

    @classmethod
    def INPUT_TYPES(cls):
        return _generate_inputs({"clip_vision_output": clip_vision_output_input(
            "From 'CLIP Vision Encode' of the subject image(s).")})

    RETURN_TYPES = (LORA_SET_TYPE,)
    RETURN_NAMES = ("lora_set",)
    OUTPUT_TOOLTIPS = ("The incoming set with the generated LoRA appended (named after the hypernet and image).",)
    FUNCTION = "generate"

    def generate(self, hypernet, clip_vision_output, strength_model, strength_clip, lora_set=None, model=None,
                 clip=None):
        return (generate_from_image(hypernet, clip_vision_output, strength_model, strength_clip, lora_set, model,
                                    clip),)


@register_node("LoraHypernetGeneratePair", "Generate LoRA from image pair (hypernet)", "hypernet")
class LoraHypernetGeneratePair:
    DESCRIPTION = ("LoRA of Change: predicts the LoRA of the edit that turns the 'before' image into the 'after' "
                   "image (a visual instruction). Apply it at strength 1 for the edit, at −1 for the reverse edit. "
                   "Needs a hypernet trained with variant 'pair'.")

    @classmethod
    def INPUT_TYPES(cls):
        return _generate_inputs({
            "before": clip_vision_output_input("'CLIP Vision Encode' of the image before the edit."),
            "after": clip_vision_output_input("'CLIP Vision Encode' of the image after the edit (same CLIP vision).")})

    RETURN_TYPES = (LORA_SET_TYPE,)
    RETURN_NAMES = ("lora_set",)
    OUTPUT_TOOLTIPS = ("The incoming set with the edit's LoRA appended.",)
    FUNCTION = "generate"

    def generate(self, hypernet, before, after, strength_model, strength_clip, lora_set=None, model=None, clip=None):
        return (generate_from_pair(hypernet, before, after, strength_model, strength_clip, lora_set, model, clip),)


def _int(default, low, high, tooltip):
    return ("INT", {"default": default, "min": low, "max": high, "tooltip": tooltip})


def _float(default, low, high, step, tooltip):
    return ("FLOAT", {"default": default, "min": low, "max": high, "step": step, "tooltip": tooltip})


@register_node("LoraHypernetTrain", "Train LoRA hypernet", "hypernet")
class LoraHypernetTrain:
    DESCRIPTION = (
        "Trains a hypernetwork from a folder of examples: <name>.png with <name>.safetensors, the LoRA that image "
        "should produce (variant 'pair': <name>_before.png, <name>_after.png and the edit's LoRA). Target LoRAs in "
        "any format 'Load LoRA (set)' reads are projected onto the LiDB space (the report gives the projection "
        "error). Losses: weight space (always), LoRA-reverse (pairs), and optionally the diffusion loss through "
        "the MODEL (latents from the VAE or <name>.latent files). Checkpoints go to models/lora_hypernets and "
        "survive interrupts; 'resume' continues a run exactly. Returns the hypernet and the loss curve.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "clip_vision": ("CLIP_VISION", {"tooltip": "Image encoder; generate later with the same one."}),
            "model": ("MODEL", {"tooltip": "The base model the target LoRAs belong to (defines the LiDB layers)."}),
            "examples_folder": ("STRING", {"default": "hypernet_examples", "tooltip":
                                "Folder of examples: absolute, or relative to ComfyUI's input folder."}),
            "variant": (list(VARIANTS), {"default": "image", "tooltip":
                        "image: HyperDreamBooth (one image → LoRA); "
                        "pair: LoRA of Change (before/after → edit LoRA)."}),
            "steps": _int(1000, 1, 1_000_000, "Optimiser steps in this run."),
            "learning_rate": _float(1e-3, 1e-6, 1.0, 1e-5, "Adam learning rate (constant)."),
            "batch_size": _int(4, 1, 256, "Examples per step."),
            "seed": _int(0, 0, 0xFFFFFFFF, "Seeds the network init, batches and diffusion noise."),
            "checkpoint_name": ("STRING", {"default": "hypernet", "tooltip":
                                "File name inside models/lora_hypernets; a counter is added."}),
            "checkpoint_every": _int(0, 0, 1_000_000, "Also save every N steps (0: at the end only)."),
            "weight_loss": _float(1.0, 0.0, 1000.0, 0.01, "Weight of the weight-space loss to the projected targets."),
            "diffusion_loss": _float(0.0, 0.0, 1000.0, 0.01, "Weight of the diffusion (denoising) loss; 0 = off."),
            "reverse_loss": _float(1.0, 0.0, 1000.0, 0.01, "pair: weight of the LoRA-reverse terms."),
            "rank": _int(1, 1, 64, "LiDB rank r (new hypernets)."),
            "down_dim": _int(100, 1, 4096, "LiDB down aux dimension (new hypernets)."),
            "up_dim": _int(50, 1, 4096, "LiDB up aux dimension (new hypernets)."),
            "model_dim": _int(256, 8, 4096, "Decoder width (new hypernets)."),
            "decoder_blocks": _int(4, 1, 64, "Decoder transformer blocks (new hypernets)."),
            "iterations": _int(4, 1, 64, "Refinement steps s from zero (new hypernets)."),
            "feature_source": (list(FEATURE_SOURCES), {"default": "last_hidden_state", "tooltip":
                               "Which CLIP_VISION_OUTPUT tokens feed the decoder (new hypernets)."}),
            "aux_init": (list(INIT_LAWS), {"default": INIT_LAWS[0], "tooltip": "Law of the frozen LiDB aux matrices."}),
            "include_text_encoder": ("BOOLEAN", {"default": False, "tooltip":
                                     "Also target the text encoder's attention (needs CLIP; target LoRAs must "
                                     "cover it)."}),
            "resume": ([NO_RESUME] + hypernet_names(), {"default": NO_RESUME, "tooltip":
                       "Continue training this checkpoint (its architecture is kept)."}),
        }, "optional": {
            "clip": ("CLIP", {"tooltip": "Text encoder: maps text-encoder LoRA keys and encodes the prompt."}),
            "vae": ("VAE", {"tooltip": "Encodes example images for the diffusion loss (else <name>.latent files)."}),
            "prompt": ("STRING", {"default": "a photo of sks", "multiline": False, "tooltip":
                       "Prompt of the diffusion loss (needs clip)."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    RETURN_TYPES = (LORA_HYPERNET_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("hypernet", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("The trained hypernetwork (also saved in models/lora_hypernets).",
                       "Loss per step (log scale).", "Projection errors, losses and the checkpoint path.")
    OUTPUT_NODE = True
    FUNCTION = "train"

    @classmethod
    def IS_CHANGED(cls, examples_folder="", **_inputs):
        return folder_signature(examples_folder)

    def train(self, clip_vision, model, examples_folder, variant, steps, learning_rate, batch_size, seed,
              checkpoint_name, checkpoint_every, weight_loss, diffusion_loss, reverse_loss, rank, down_dim, up_dim,
              model_dim, decoder_blocks, iterations, feature_source, aux_init, include_text_encoder, resume,
              clip=None, vae=None, prompt="", unique_id=None):
        settings = TrainSettings(steps=steps, learning_rate=learning_rate, batch_size=batch_size, seed=seed,
                                 weight_loss=weight_loss, diffusion_loss=diffusion_loss, reverse_loss=reverse_loss,
                                 checkpoint_every=checkpoint_every, prompt=prompt or "")
        arch = ArchSettings(rank=rank, down_dim=down_dim, up_dim=up_dim, init_law=aux_init, model_dim=model_dim,
                            num_blocks=decoder_blocks, iterations=iterations,
                            include_text_encoder=bool(include_text_encoder), feature_source=feature_source,
                            aux_seed=seed)
        resumed, optim = (None, None)
        if resume and resume != NO_RESUME:
            resumed, optim = load_checkpoint(folder_paths.get_full_path_or_raise(FOLDER_NAME, resume))
        result = train_hypernet(clip_vision=clip_vision, model=model, folder=examples_folder, variant=variant,
                                settings=settings, arch=arch, checkpoint_path=checkpoint_path(checkpoint_name),
                                clip=clip, vae=vae, resume=resumed, resume_optimizer=optim, unique_id=unique_id)
        return {"ui": {"text": [result.report]}, "result": (result.hypernet, result.curve, result.report)}
