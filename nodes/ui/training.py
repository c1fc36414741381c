"""LoRA training node (DreamBooth-LoRA / LiDB / rank-relaxed fast finetune / B-LoRA)."""
from __future__ import annotations

from ..lora_set import LORA_SET_TYPE
from ..registry import register_node
from ..training.loop import OPTIMIZERS
from ..training.parameterisation import PARAMETERISATIONS
from ..training.session import PRECISIONS
from ..training.targets import TARGET_PRESETS
from ..training.data import folder_signature
from ..training.train import STEP_LIMIT, TrainingConfig, TrainingInputs, train_lora
from .common import lora_set_input


@register_node("LoraTrain", "Train LoRA", "training")
class LoraTrain:
    DESCRIPTION = (
        "Trains a LoRA on your images inside ComfyUI (DreamBooth-LoRA): instance images with a prompt holding a rare "
        "identifier ('a photo of sks dog'), optional prior preservation (class prompt + class images, generated "
        "with the base model when none are given; loss = instance loss + lambda_prior × class loss). "
        "Parameterisations: standard LoRA, LiDB (HyperDreamBooth's tiny weight space) or rank-relaxed finetuning of "
        "an initial LoRA (merged and re-factorised by SVD at the end). Targets: attention, attention+FF, with the "
        "text encoder, B-LoRA (SDXL content/style blocks, separable later with 'LoRA set block weights') or every "
        "linear/conv layer. Outputs a LORA_SET ('Save LoRA set' writes an ordinary LoRA file), a loss curve and a "
        "report. The input model is never modified; checkpoints are written to the loras folder every "
        "checkpoint_every steps and when the run is interrupted.")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The base model to train on (left unchanged)."}),
                "clip": ("CLIP", {"tooltip": "Encodes the prompts; trained too with a '+text encoder' target."}),
                "instance_prompt": ("STRING", {"default": "a photo of sks dog", "multiline": False,
                                               "tooltip": "Prompt for your images, with the rare identifier."}),
                "identifier": ("STRING", {"default": "sks", "tooltip": "The rare token naming your subject; a "
                                          "warning is given when instance_prompt lacks it (empty: no check)."}),
                "parameterisation": (list(PARAMETERISATIONS), {
                    "default": PARAMETERISATIONS[0],
                    "tooltip": "standard LoRA; LiDB (rank-r LoRA in a random low-dimensional subspace, "
                               "HyperDreamBooth); rank-relaxed: initial_lora frozen + trainable rank-r residual, "
                               "merged and SVD re-factorised at the end."}),
                "targets": (list(TARGET_PRESETS), {"default": TARGET_PRESETS[0],
                                                   "tooltip": "Which layers train. B-LoRA needs an SDXL model."}),
                "rank": ("INT", {"default": 8, "min": 1, "max": 1024,
                                 "tooltip": "LoRA rank (residual rank for rank-relaxed; LiDB rank)."}),
                "alpha": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                                    "tooltip": "LoRA alpha (scale alpha/rank); 0 = same as rank (scale 1)."}),
                "steps": ("INT", {"default": 400, "min": 1, "max": STEP_LIMIT, "tooltip": "Optimisation steps."}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-6,
                                            "tooltip": "Optimiser learning rate (LiDB and rank-relaxed like "
                                                       "higher rates, e.g. 1e-3)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256,
                                       "tooltip": "Instance images per step (as many class images are added "
                                                  "when prior preservation is on)."}),
                "optimizer": (list(OPTIMIZERS), {"default": "AdamW", "tooltip": "Optimiser (gradient norm clipped "
                                                                                 "to 1)."}),
                "lambda_prior": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.05,
                                           "tooltip": "Weight of the prior-preservation loss (DreamBooth uses 1); "
                                                      "0 turns it off."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                 "tooltip": "Seeds LoRA init, noise, timesteps, batch order and class images."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Recompute activations in the "
                                                       "backward pass: much less memory, about 30% slower."}),
                "training_dtype": (list(PRECISIONS), {"default": "auto", "tooltip": "auto: bf16 autocast on GPUs "
                                                      "that support it, fp32 otherwise (CPU)."}),
                "resolution": ("INT", {"default": 512, "min": 0, "max": 8192, "step": 8,
                                       "tooltip": "Training size for images: resize (shorter side) + centre crop to "
                                                  "resolution×resolution; 0 = size of the first image."}),
                "checkpoint_every": ("INT", {"default": 0, "min": 0, "max": STEP_LIMIT,
                                             "tooltip": "Save a checkpoint LoRA every N steps (0 = only when "
                                                        "interrupted)."}),
                "checkpoint_prefix": ("STRING", {"default": "lora_composer/training/lora",
                                                 "tooltip": "Checkpoint name inside the loras folder; "
                                                            "'_step000100_00001.safetensors' is appended."}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Encodes images (not needed with latents)."}),
                "images": ("IMAGE", {"tooltip": "Instance images (a batch)."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "Or/and a folder of instance images inside "
                                            "ComfyUI's input directory."}),
                "latents": ("LATENT", {"tooltip": "Instance latents instead of images (no VAE needed)."}),
                "class_prompt": ("STRING", {"default": "", "tooltip": "Class prompt for prior preservation, "
                                            "without the identifier (e.g. 'a photo of a dog')."}),
                "class_images": ("IMAGE", {"tooltip": "Class images (else generated with the base model)."}),
                "class_latents": ("LATENT", {"tooltip": "Class latents instead of class images."}),
                "num_class_images": ("INT", {"default": 0, "min": 0, "max": 10000,
                                             "tooltip": "How many class images to generate with the base model "
                                                        "when none are given (DreamBooth uses 100–200)."}),
                "class_sampling_steps": ("INT", {"default": 20, "min": 1, "max": 200,
                                                 "tooltip": "Sampler steps for generated class images."}),
                "initial_lora": lora_set_input("rank-relaxed: the LoRA to start from (frozen), e.g. from a "
                                               "hypernetwork or 'Load LoRA (set)'."),
                "relaxed_output_rank": ("INT", {"default": 0, "min": 0, "max": 1024,
                                                "tooltip": "rank-relaxed: rank of the re-factorised result; 0 = "
                                                           "rank(initial) + rank (exact)."}),
                "lidb_down_dim": ("INT", {"default": 100, "min": 1, "max": 4096,
                                          "tooltip": "LiDB: dimension of the frozen down basis."}),
                "lidb_up_dim": ("INT", {"default": 50, "min": 1, "max": 4096,
                                        "tooltip": "LiDB: dimension of the frozen up basis."}),
                "name": ("STRING", {"default": "", "tooltip": "Name of the trained LoRA in the set (default "
                                    "'LoraTrain-<identifier>-<steps>steps')."}),
            },
        }

    RETURN_TYPES = (LORA_SET_TYPE, "IMAGE", "STRING")
    RETURN_NAMES = ("lora_set", "loss_curve", "report")
    OUTPUT_TOOLTIPS = ("A set holding the trained LoRA (strength 1); save it with 'Save LoRA set'.",
                       "Loss per step (raw and smoothed; instance and prior parts when prior preservation is on).",
                       "What was trained, the loss, checkpoints and any warnings.")
    FUNCTION = "train"

    @classmethod
    def IS_CHANGED(cls, image_folder="", **_inputs):
        """Re-run when the files of image_folder change (other inputs are tracked by ComfyUI itself)."""
        return folder_signature(image_folder)

    def train(self, model, clip, instance_prompt, identifier, parameterisation, targets, rank, alpha, steps,
              learning_rate, batch_size, optimizer, lambda_prior, seed, gradient_checkpointing, training_dtype,
              resolution, checkpoint_every, checkpoint_prefix, vae=None, images=None, image_folder="", latents=None,
              class_prompt="", class_images=None, class_latents=None, num_class_images=0, class_sampling_steps=20,
              initial_lora=None, relaxed_output_rank=0, lidb_down_dim=100, lidb_up_dim=50, name=""):
        config = TrainingConfig(
            instance_prompt=instance_prompt, identifier=identifier, class_prompt=class_prompt,
            lambda_prior=lambda_prior, num_class_images=num_class_images, class_sampling_steps=class_sampling_steps,
            parameterisation=parameterisation, targets=targets, rank=rank, alpha=alpha, lidb_down_dim=lidb_down_dim,
            lidb_up_dim=lidb_up_dim, relaxed_output_rank=relaxed_output_rank, steps=steps,
            learning_rate=learning_rate, batch_size=batch_size, optimizer=optimizer,
            gradient_checkpointing=gradient_checkpointing, training_dtype=training_dtype, seed=seed,
            checkpoint_every=checkpoint_every, checkpoint_prefix=checkpoint_prefix, resolution=resolution, name=name)
        inputs = TrainingInputs(model=model, clip=clip, vae=vae, images=images, image_folder=image_folder,
                                latents=latents, class_images=class_images, class_latents=class_latents,
                                initial_lora=initial_lora)
        out = train_lora(inputs, config)
        return {"ui": {"text": [out.report]}, "result": (out.lora_set, out.loss_image, out.report)}
