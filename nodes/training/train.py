"""``train_lora``: the one engine function behind the ``LoraTrain`` node.

Order of work: validate every input (before anything runs) → instance latents (images through the
VAE, or latents) → class latents for the prior loss (given, or generated with the base model) →
attach the trainable residual (``TrainingSession``) → ``run_loop`` → export one kohya LoRA entry,
the loss curve and a report. Checkpoints go to the loras folder every ``checkpoint_every`` steps;
on interrupt the state of the last completed step is saved as well, then the interrupt propagates.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

import comfy.model_management as mm
import torch

from ..lora_keys import kohya_names
from ..lora_set import LoraSet
from ..merging import exact_delta, layer_contributions, scaled_factors
from ..patching import model_family
from ..saving import _safe_prefix
from . import conditioning, data, loop, parameterisation as pz, prior, result
from .session import PRECISIONS, TrainingSession
from .targets import BLORA_BLOCKS, BLORA_PRESET, TARGET_PRESETS, layer_ranks, select_targets, trains_text_encoder

log = logging.getLogger("LoRA Composer")

STEP_LIMIT = 1_000_000


@dataclass
class TrainingConfig:
    instance_prompt: str
    identifier: str = "sks"
    class_prompt: str = ""
    lambda_prior: float = 0.0
    num_class_images: int = 0
    class_sampling_steps: int = 20
    parameterisation: str = pz.STANDARD
    targets: str = "attention"
    rank: int = 8
    alpha: float = 0.0  # 0 = rank (scale 1)
    lidb_down_dim: int = 100
    lidb_up_dim: int = 50
    relaxed_output_rank: int = 0  # 0 = rank(initial) + rank (exact)
    steps: int = 400
    learning_rate: float = 1e-4
    batch_size: int = 1
    optimizer: str = "AdamW"
    gradient_checkpointing: bool = False
    training_dtype: str = "auto"
    seed: int = 0
    checkpoint_every: int = 0
    checkpoint_prefix: str = "lora_composer/training/lora"
    resolution: int = 512
    name: str = ""


@dataclass
class TrainingInputs:
    model: object
    clip: object
    vae: object = None
    images: object = None
    image_folder: str = ""
    latents: object = None
    class_images: object = None
    class_latents: object = None
    initial_lora: LoraSet | None = None
    loras_folder: str | None = None  # where checkpoints go (default: ComfyUI's first loras folder)
    input_folder: str | None = None  # where image_folder is looked up (default: ComfyUI's input dir)


@dataclass
class TrainingResult:
    lora_set: LoraSet
    loss_image: torch.Tensor
    report: str
    history: loop.LossHistory
    checkpoints: list[str] = field(default_factory=list)
    parameterisation: object = None
    relaxed: dict | None = None  # rank-relaxed: key → RelaxedLayer (merged delta re-factorised)
    instance_latents: torch.Tensor | None = None  # raw latent space, as trained on
    class_latents: torch.Tensor | None = None


# ---------------------------------------------------------------------------------------- checks

def _check_config(c: TrainingConfig) -> None:
    def bad(name: str, valid: str, value) -> ValueError:
        return ValueError(f"{name} must be {valid}, got {value!r}.")

    if c.parameterisation not in pz.PARAMETERISATIONS:
        raise bad("parameterisation", "one of " + ", ".join(pz.PARAMETERISATIONS), c.parameterisation)
    if c.targets not in TARGET_PRESETS:
        raise bad("targets", "one of " + ", ".join(TARGET_PRESETS), c.targets)
    if c.optimizer not in loop.OPTIMIZERS:
        raise bad("optimizer", "one of " + ", ".join(loop.OPTIMIZERS), c.optimizer)
    if c.training_dtype not in PRECISIONS:
        raise bad("training_dtype", "one of " + ", ".join(PRECISIONS), c.training_dtype)
    if not 1 <= c.steps <= STEP_LIMIT:
        raise bad("steps", f"in 1…{STEP_LIMIT}", c.steps)
    if not (math.isfinite(c.learning_rate) and 0 < c.learning_rate <= 1):
        raise bad("learning_rate", "a number in (0, 1]", c.learning_rate)
    if c.batch_size < 1:
        raise bad("batch_size", "≥ 1", c.batch_size)
    if not (math.isfinite(c.lambda_prior) and c.lambda_prior >= 0):
        raise bad("lambda_prior", "a finite number ≥ 0", c.lambda_prior)
    if c.rank < 1:
        raise bad("rank", "≥ 1", c.rank)
    if not (math.isfinite(c.alpha) and c.alpha >= 0):
        raise bad("alpha", "≥ 0 (0 = same as rank)", c.alpha)
    for name in ("num_class_images", "checkpoint_every", "relaxed_output_rank", "resolution"):
        if getattr(c, name) < 0:
            raise bad(name, "≥ 0", getattr(c, name))
    try:
        _safe_prefix(c.checkpoint_prefix)
    except ValueError:
        raise ValueError(f"checkpoint_prefix {c.checkpoint_prefix!r} must be a relative name inside the loras "
                         "folder, e.g. 'training/my_lora'.") from None
    if not c.instance_prompt.strip():
        raise ValueError("instance_prompt is empty; describe the subject with a rare identifier, "
                         "e.g. 'a photo of sks dog'.")


def _identifier_warnings(c: TrainingConfig) -> list[str]:
    ident = c.identifier.strip()
    if not ident:
        return []
    pattern = re.compile(r"(?<![\w])" + re.escape(ident) + r"(?![\w])", re.IGNORECASE)
    warnings = []
    if not pattern.search(c.instance_prompt):
        warnings.append(f"WARNING: instance_prompt {c.instance_prompt!r} does not contain the identifier {ident!r}; "
                        "without it the subject is bound to ordinary words (language drift). "
                        f"Write e.g. 'a photo of {ident} dog'.")
    if c.class_prompt.strip() and pattern.search(c.class_prompt):
        warnings.append(f"WARNING: class_prompt {c.class_prompt!r} contains the identifier {ident!r}; the class "
                        "prompt should name only the class (e.g. 'a photo of a dog').")
    for w in warnings:
        log.warning("[LoRA Composer] LoraTrain: %s", w)
    return warnings


# ---------------------------------------------------------------------------------------- pieces

@dataclass
class InitialLora:
    """The frozen initial LoRA of rank-relaxed training, as exact per-layer deltas."""

    matrices: dict[str, torch.Tensor]
    dense: dict[str, torch.Tensor]
    ranks: dict[str, int]


def initial_lora_deltas(model, clip, initial: LoraSet) -> InitialLora:
    """ΔW0 per layer with ComfyUI's own math (any format), and an upper bound of its rank."""
    matrices, dense, ranks = {}, {}, {}
    for key, (patcher, contributions) in layer_contributions(model, clip, initial).items():
        delta = sum(exact_delta(patcher, key, c) for c in contributions).cpu()
        if key.endswith(".weight") and delta.ndim in (2, 4):
            full = min(delta.shape[0], delta[0].numel())
            bound = 0
            for c in contributions:
                factors = scaled_factors(c)
                bound += factors[1].shape[0] if factors is not None else full
            matrices[key], ranks[key] = delta, min(bound, full)
        else:
            dense[key] = delta
    return InitialLora(matrices, dense, ranks)


def _class_latents(inputs: TrainingInputs, c: TrainingConfig, instance: torch.Tensor, latent_channels: int,
                   notes: list[str]) -> torch.Tensor | None:
    given_anything = inputs.class_images is not None or inputs.class_latents is not None
    if c.lambda_prior == 0:
        if given_anything or c.num_class_images:
            notes.append("lambda_prior is 0: class images and num_class_images are not used.")
        return None
    if not c.class_prompt.strip():
        raise ValueError("class_prompt is empty but lambda_prior > 0: prior preservation needs the class prompt "
                         "(e.g. 'a photo of a dog'); or set lambda_prior to 0.")
    size = (instance.shape[-1] * 8, instance.shape[-2] * 8)
    given = data.prepare_latents(vae=inputs.vae, images=inputs.class_images, folder_images=[],
                                 latents=inputs.class_latents, resolution=c.resolution,
                                 latent_channels=latent_channels, what="class", size=size)
    if given is not None:
        if given.latents.shape[-2:] != instance.shape[-2:]:
            raise ValueError(f"class_latents are {given.latents.shape[-1]}×{given.latents.shape[-2]} latents but the "
                             f"instance latents are {instance.shape[-1]}×{instance.shape[-2]}; they must match.")
        notes.extend(given.notes)
        notes.append(f"prior: {given.latents.shape[0]} class images given, lambda_prior {c.lambda_prior:g}.")
        return given.latents
    if c.num_class_images < 1:
        raise ValueError("lambda_prior > 0 needs class images: connect class_images or class_latents, or set "
                         "num_class_images > 0 to generate them with the base model.")
    generated = prior.generate_class_latents(inputs.model, inputs.clip, c.class_prompt, c.num_class_images,
                                             tuple(instance.shape[1:]), c.class_sampling_steps, c.seed,
                                             batch_size=max(1, c.batch_size))
    notes.append(f"prior: {c.num_class_images} class latents generated with the base model "
                 f"({c.class_sampling_steps} {prior.CLASS_SAMPLER} steps, CFG {prior.CLASS_CFG:g}), "
                 f"lambda_prior {c.lambda_prior:g}.")
    return generated


def _make_parameterisation(c: TrainingConfig, targets, alpha: float, ranks: dict[str, int]):
    if c.parameterisation == pz.LIDB:
        return pz.LidbLora.for_targets(targets, c.rank, c.lidb_down_dim, c.lidb_up_dim, c.seed)
    return pz.StandardLora(targets, c.rank, alpha, c.seed, ranks)


def _oom_message(c: TrainingConfig, step: int, instance: torch.Tensor, n_targets: int, saved: str | None) -> str:
    h, w = instance.shape[-2:]
    rows = c.batch_size * (2 if c.lambda_prior > 0 else 1)
    advice = ["batch_size" + (f" (now {c.batch_size})" if c.batch_size > 1 else ""),
              f"resolution (latents {w}×{h} ≈ {w * 8}×{h * 8} px)", f"rank (now {c.rank})"]
    if not c.gradient_checkpointing:
        advice.append("turn gradient_checkpointing on")
    if c.targets != "attention":
        advice.append(f"targets 'attention' instead of {c.targets!r}")
    if c.training_dtype != "bf16":
        advice.append("training_dtype bf16")
    where = f" The last checkpoint is {saved}." if saved else " No checkpoint was written yet."
    return (f"LoraTrain ran out of memory at step {step + 1} of {c.steps} ({rows} latents of {w}×{h} per step, "
            f"{n_targets} target layers, rank {c.rank}). Reduce: " + "; ".join(advice) + "." + where)


# ---------------------------------------------------------------------------------------- main

def train_lora(inputs: TrainingInputs, c: TrainingConfig) -> TrainingResult:
    """Train one LoRA (DreamBooth loss, optional prior preservation) and return it as a LORA_SET.

    ComfyUI runs every node under ``torch.inference_mode()``; training needs autograd, so the whole
    run happens with inference mode off and gradients on (as in core's ``TrainLoraNode``).
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _train(inputs, c)


def _train(inputs: TrainingInputs, c: TrainingConfig) -> TrainingResult:
    import folder_paths

    _check_config(c)
    model, clip = inputs.model, inputs.clip
    if model is None:
        raise ValueError("model is required.")
    if clip is None:
        raise ValueError("clip is required to encode instance_prompt (and class_prompt).")
    notes = _identifier_warnings(c)
    targets = select_targets(model, clip, c.targets)
    ranks, rank_notes = layer_ranks(targets, c.rank, c.targets)
    notes.extend(rank_notes)
    alpha = c.alpha if c.alpha > 0 else float(c.rank)
    if c.parameterisation == pz.LIDB:  # its factors are saved with alpha = rank (scale 1): say so, record that
        if alpha != c.rank:
            notes.append(f"alpha {c.alpha:g} is not used by LiDB (its saved factors carry alpha = rank {c.rank}, "
                         "scale 1).")
        alpha = float(c.rank)
    relaxed = c.parameterisation == pz.RANK_RELAXED
    if relaxed and (inputs.initial_lora is None or len(inputs.initial_lora) == 0):
        raise ValueError("parameterisation 'rank-relaxed from initial LoRA' needs initial_lora (a LORA_SET, e.g. "
                         "from 'Load LoRA (set)' or a hypernetwork).")
    if not relaxed and inputs.initial_lora is not None:
        notes.append("initial_lora is used only by 'rank-relaxed from initial LoRA'; ignored.")
    param = _make_parameterisation(c, targets, alpha, ranks)

    folder = inputs.image_folder.strip() if inputs.image_folder else ""
    input_dir = inputs.input_folder or folder_paths.get_input_directory()
    folder_images = data.load_folder_images(data.resolve_folder(folder, input_dir)) if folder else []
    latent_channels = model.model.latent_format.latent_channels
    instance = data.prepare_latents(vae=inputs.vae, images=inputs.images, folder_images=folder_images,
                                    latents=inputs.latents, resolution=c.resolution,
                                    latent_channels=latent_channels, what="instance")
    if instance is None:
        raise ValueError("no instance images: connect 'images' (an IMAGE batch), set 'image_folder' (a folder in "
                         "ComfyUI's input directory) or connect 'latents'.")
    notes.extend(instance.notes)
    class_raw = _class_latents(inputs, c, instance.latents, latent_channels, notes)
    initial = initial_lora_deltas(model, clip, inputs.initial_lora) if relaxed else None

    names = kohya_names(model, clip)
    family = model_family(model)
    loras_folder = inputs.loras_folder or folder_paths.get_folder_paths("loras")[0]
    history = loop.LossHistory()
    checkpoints: list[str] = []
    saved_steps: set[int] = set()
    exported: dict = {}
    name = c.name.strip() or f"LoraTrain-{c.identifier.strip() or 'lora'}-{c.steps}steps"

    def build_entry(steps_done: int):
        if relaxed:
            layers = pz.rank_relaxed_export(initial.matrices, param, c.relaxed_output_rank, initial.ranks)
            exported["relaxed"] = layers
            factors = {k: (l.up, l.down, float(l.down.shape[0])) for k, l in layers.items()}
            tensors = result.lora_tensors(names, factors, initial.dense)
        else:
            tensors = result.lora_tensors(names, param.export())
        meta = {
            "lora_composer_base_model": family,
            "lora_composer_training": {
                "parameterisation": c.parameterisation, "targets": c.targets, "rank": c.rank, "alpha": alpha,
                "steps": c.steps, "steps_done": steps_done, "learning_rate": c.learning_rate,
                "batch_size": c.batch_size, "optimizer": c.optimizer, "seed": c.seed,
                "lambda_prior": c.lambda_prior, "instance_prompt": c.instance_prompt,
                "class_prompt": c.class_prompt, "identifier": c.identifier,
                "instance_images": int(instance.latents.shape[0]),
                "class_images": int(class_raw.shape[0]) if class_raw is not None else 0,
                "final_loss": history.total[-1] if history.total else None},
            "lora_composer_sources": [{"name": name}],
        }
        if c.targets == BLORA_PRESET:
            meta["lora_composer_blora"] = {"content": BLORA_BLOCKS[0], "style": BLORA_BLOCKS[1]}
        if c.parameterisation == pz.LIDB:
            meta["lora_composer_lidb"] = {"rank": c.rank, "down_dim": c.lidb_down_dim, "up_dim": c.lidb_up_dim,
                                          "init_law": param.spec.init_law, "base_seed": c.seed}
        if relaxed:
            worst = max((l.rel_error for l in exported["relaxed"].values()), default=0.0)
            meta["lora_composer_rank_relaxed"] = {
                "initial": [e.name for e in inputs.initial_lora], "residual_rank": c.rank,
                "output_rank": c.relaxed_output_rank or "rank(initial)+rank", "worst_relative_error": worst}
        return result.entry_from_tensors(name, tensors, meta)

    with TrainingSession(model, clip, targets, gradient_checkpointing=c.gradient_checkpointing,
                         precision=c.training_dtype, initial_set=inputs.initial_lora if relaxed else None) as session:
        param.to(session.device)
        base = session.base_model
        instance_latents = base.process_latent_in(instance.latents.clone())
        class_latents = base.process_latent_in(class_raw.clone()) if class_raw is not None else None
        shape = tuple(instance_latents.shape[1:])
        instance_tokens = conditioning.tokenize(session.clip, c.instance_prompt, "instance_prompt")
        class_tokens = conditioning.tokenize(session.clip, c.class_prompt, "class_prompt") if class_latents is not None else None

        def encode_rows():
            rows = [conditioning.row_conds(base, conditioning.encode_tokens(session.clip, t), shape, session.device)
                    if t is not None else None for t in (instance_tokens, class_tokens)]
            return rows[0], rows[1]

        if trains_text_encoder(c.targets):
            conds = encode_rows  # re-encoded every step: the text-encoder LoRA needs the gradient
        else:
            with torch.no_grad():
                fixed = encode_rows()
            conds = lambda: fixed  # noqa: E731

        def on_checkpoint(step: int) -> None:
            path = result.save_checkpoint(build_entry(step), loras_folder, c.checkpoint_prefix, step)
            checkpoints.append(path)
            saved_steps.add(step)
            log.info("[LoRA Composer] LoraTrain checkpoint at step %d: %s", step, path)

        loop_config = loop.LoopConfig(c.steps, c.learning_rate, c.batch_size, c.optimizer, c.seed,
                                      c.lambda_prior if class_latents is not None else 0.0, c.checkpoint_every)
        try:
            loop.run_loop(session, param, loop_config, instance_latents, class_latents, conds, on_checkpoint, history)
        except mm.InterruptProcessingException:
            if history.steps_done and history.steps_done not in saved_steps:
                on_checkpoint(history.steps_done)  # the last completed step, unless it was just saved
            log.warning("[LoRA Composer] LoraTrain interrupted after %d of %d steps; checkpoints kept: %s",
                        history.steps_done, c.steps, ", ".join(checkpoints) or "none")
            raise
        except loop.TrainingOOM as oom:
            saved = checkpoints[-1] if checkpoints else None
            raise torch.OutOfMemoryError(_oom_message(c, oom.step, instance.latents, len(targets), saved)) from oom.error
        except ValueError as error:
            if "training loss became" not in str(error):
                raise
            where = f" The last checkpoint is {checkpoints[-1]}." if checkpoints else ""
            raise ValueError(str(error) + where) from error

    lora_set = LoraSet((build_entry(history.steps_done),))
    series = {"loss": history.total}
    if history.prior:
        series["instance"] = history.instance
        series["prior"] = history.prior
    title = f"{c.parameterisation}, {c.targets}, rank {c.rank}: loss over {history.steps_done} steps"
    loss_image = result.loss_curve_image(series, title)
    report = _report(c, targets, param, instance.latents, class_raw, history, checkpoints, notes,
                     exported.get("relaxed"))
    return TrainingResult(lora_set, loss_image, report, history, checkpoints, param, exported.get("relaxed"),
                          instance.latents, class_raw)


def _report(c: TrainingConfig, targets, param, instance: torch.Tensor, class_raw, history: loop.LossHistory,
            checkpoints: list[str], notes: list[str], relaxed) -> str:
    n_unet = sum(t.owner == "unet" for t in targets)
    lines = [f"{c.parameterisation}, targets {c.targets}: {n_unet} UNet + {len(targets) - n_unet} text-encoder "
             f"layers, rank {c.rank}, {param.trainable_count():,} trainable numbers.",
             f"instance: {instance.shape[0]} latents of {instance.shape[-1]}×{instance.shape[-2]}; "
             f"{history.steps_done} steps, batch {c.batch_size}, lr {c.learning_rate:g} ({c.optimizer}), seed {c.seed}."]
    if history.total:
        k = max(1, len(history.total) // 10)
        first, last = sum(history.total[:k]) / k, sum(history.total[-k:]) / k
        lines.append(f"loss: {first:.4g} (first {k} steps) → {last:.4g} (last {k} steps).")
    if relaxed:
        worst = max(relaxed.values(), key=lambda l: l.rel_error)
        lines.append(f"rank-relaxed: ΔW0 + residual re-factorised by SVD to "
                     f"{'rank(initial) + ' + str(c.rank) if c.relaxed_output_rank == 0 else 'rank ' + str(c.relaxed_output_rank)}; "
                     f"worst relative error {worst.rel_error:.3e} ({worst.key}).")
    if checkpoints:
        lines.append(f"checkpoints: {', '.join(checkpoints)}")
    lines.extend(notes)
    return "\n".join(lines)
