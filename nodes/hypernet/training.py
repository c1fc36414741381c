"""Training a hypernet from a folder of examples (HyperDreamBooth / LoRA of Change).

Loss per step, for a batch of examples with projected targets ``T_i`` (``examples.py``)::

    L_w(i)   = Σ_l ‖ΔW_l(H(x_i)) − ΔW_l(T_i)‖²_F / E          weight space, E = mean_i Σ_l ‖ΔW_l(T_i)‖²
               (1 = predicting the zero LoRA; computed in the LiDB bases, exactly, without forming ΔW)
    image:   L = λ_w · L_w  +  λ_d · L_diff(+H(x_i), latent_i)
    pair:    L = λ_w · (L_w(H(A,A′), T) + λ_rev · L_w(H(A′,A), −T))
               + λ_d · (L_diff(+H(A,A′) → A′) + λ_rev · L_diff(−H(A,A′) → A))

The two ``λ_rev`` terms are LoC's LoRA-reverse objective: the LoRA of the undo edit is the negated
LoRA (weight space), and the generated LoRA applied at −1 must turn the after image back into the
before image (diffusion space, ``diffusion.py``).

Adam (constant learning rate, gradient norm clipped to 1). Batches and diffusion noise come from a
generator seeded with (seed, step), and checkpoints carry the Adam moments, so a resumed run
continues exactly as an uninterrupted one. A NaN/Inf loss or gradient stops training before the
bad update and saves the last good state; an interrupt saves a checkpoint, then stops.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field

import comfy.model_management as mm
import comfy.utils
import torch

from ..patching import model_family
from . import diffusion
from .examples import ExampleFiles, LidbBasis, ProjectedTarget, find_examples, lidb_basis, project_lora, read_image, \
    read_latent
from .file_format import LoraHypernet, build_network, network_from_file, read_hypernet_file, save_hypernet
from .generate import check_model_fits
from .lidb import DEFAULT_INIT_LAW, LidbSpec, aux_fingerprint, lidb_spec_for_model, split_flat
from .loss_curve import as_comfy_image, draw_loss_curve
from .network import HypernetConfig, LidbHypernet, heads_for

log = logging.getLogger("LoRA Composer")

GRAD_CLIP = 1.0
LOSS_HISTORY_LIMIT = 20000  # per series, in the checkpoint metadata
PREVIEWS = 20  # loss-curve previews sent to the progress bar per run


@dataclass(frozen=True)
class ArchSettings:
    """Network and LiDB dimensions of a new hypernet (a resumed one keeps its own)."""

    rank: int = 1
    down_dim: int = 100
    up_dim: int = 50
    init_law: str = DEFAULT_INIT_LAW
    model_dim: int = 256
    num_blocks: int = 4
    iterations: int = 4
    include_text_encoder: bool = False
    feature_source: str = "last_hidden_state"
    aux_seed: int = 0


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    learning_rate: float = 1e-3
    batch_size: int = 4
    seed: int = 0
    weight_loss: float = 1.0
    diffusion_loss: float = 0.0
    reverse_loss: float = 1.0
    checkpoint_every: int = 0  # 0: only at the end (and on interrupt / NaN)
    prompt: str = ""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}.")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise ValueError(f"learning_rate must be in (0, 1], got {self.learning_rate}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {self.batch_size}.")
        for name in ("weight_loss", "diffusion_loss", "reverse_loss"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}.")
        if self.weight_loss == 0 and self.diffusion_loss == 0:
            raise ValueError("weight_loss and diffusion_loss are both 0: nothing to train.")


@dataclass
class TrainingData:
    names: list[str]
    first: torch.Tensor  # [N, T, F]: the image, or the before image
    second: torch.Tensor | None  # [N, T, F]: the after image (pairs)
    a: torch.Tensor  # [N, L, U, r]
    b: torch.Tensor  # [N, L, r, D]
    energy_scale: float  # mean_i Σ_l ‖ΔW_l(T_i)‖² of the projected targets
    latents: list[tuple[torch.Tensor, ...] | None]
    targets: list[ProjectedTarget]

    def tokens(self, index: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        if self.second is None:
            return self.first[index]
        first, second = (self.second, self.first) if reverse else (self.first, self.second)
        return torch.cat([first[index], second[index]], dim=-1)


@dataclass
class TrainResult:
    hypernet: LoraHypernet
    curve: torch.Tensor  # IMAGE [1, H, W, 3]
    report: str
    checkpoint: str
    history: dict[str, list[float]] = field(default_factory=dict)


class TrainingStopped(ValueError):
    """Training hit a NaN/Inf; the message says where the last good state was saved."""


def encode_image_tokens(clip_vision, path: str, source: str) -> torch.Tensor:
    output = clip_vision.encode_image(read_image(path), crop=True)
    tokens = output[source] if source in ("last_hidden_state", "penultimate_hidden_states") else None
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        raise ValueError(f"the CLIP-vision model gives no {source!r} tokens; choose another feature_source.")
    return tokens[0].detach().to("cpu", torch.float32).clone()


def raw_latents(example: ExampleFiles, vae, channels: int) -> tuple[torch.Tensor, ...]:
    """Raw latents of the example's images: from its ``.latent`` files, else from the VAE; ``channels``: what the
    model's latents have (a latent of another model family is refused here, not deep inside the UNet)."""
    if example.latents is not None:
        latents = tuple(read_latent(p) for p in example.latents)
        sources = [os.path.basename(p) for p in example.latents]
    elif vae is None:
        raise ValueError(f"the diffusion loss needs latents: connect a VAE, or put {example.name}.latent "
                         "('Save Latent' files) next to each example.")
    else:
        latents = tuple(vae.encode(read_image(p)[:, :, :, :3]).detach().float().cpu().clone() for p in example.images)
        sources = [f"{os.path.basename(p)} (VAE output)" for p in example.images]
    for latent, source in zip(latents, sources):
        if latent.shape[1] != channels:
            raise ValueError(f"{source}: a {latent.shape[1]}-channel latent; the connected model uses "
                             f"{channels}-channel latents (encode with this model's VAE).")
    return latents


def prepare_data(examples: list[ExampleFiles], spec: LidbSpec, basis: LidbBasis, variant: str, source: str,
                 clip_vision, model, clip, vae, need_latents: bool) -> TrainingData:
    targets = [project_lora(model, clip, e.lora, spec, basis) for e in examples]
    with torch.no_grad():
        images = [[encode_image_tokens(clip_vision, p, source) for p in e.images] for e in examples]
    shapes = {tuple(t.shape) for tokens in images for t in tokens}
    if len(shapes) != 1:
        raise ValueError(f"the CLIP-vision model gave token sets of different shapes {sorted(shapes)}.")
    first = torch.stack([tokens[0] for tokens in images])
    second = torch.stack([tokens[1] for tokens in images]) if variant == "pair" else None
    a = torch.stack([t.a for t in targets])
    b = torch.stack([t.b for t in targets])
    projected = (a @ b).square().sum(dim=(1, 2, 3))
    energy_scale = float(projected.mean())
    if energy_scale <= 0:
        raise ValueError("every target LoRA projects to zero on the LiDB layers (all-zero LoRAs?); nothing to learn.")
    channels = model.model.latent_format.latent_channels
    latents = [raw_latents(e, vae, channels) for e in examples] if need_latents else [None] * len(examples)
    return TrainingData([e.name for e in examples], first, second, a, b, energy_scale, latents, targets)


def weight_errors(spec: LidbSpec, basis: LidbBasis, flat: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  sign: float = 1.0) -> torch.Tensor:
    """Per example ``Σ_l ‖ΔW_l(pred) − sign·ΔW_l(target)‖²`` in the orthonormal LiDB bases (exact)."""
    down_w, up_w = split_flat(spec, flat)
    predicted = (basis.m_up @ up_w) @ (down_w @ basis.m_down)  # [B, L, U, D] = Q_uᵀ ΔW Q_d
    return (predicted - sign * (a @ b)).square().sum(dim=(1, 2, 3))


def output_scales(basis: LidbBasis, data: TrainingData, spec: LidbSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS per layer of the targets' LiDB down/up weights (``down_w = b·m_down⁺``, ``up_w = m_up⁺·a``)."""
    up_w = torch.linalg.pinv(basis.m_up) @ data.a
    down_w = data.b @ torch.linalg.pinv(basis.m_down)
    return down_w.square().mean(dim=(0, 2, 3)).sqrt(), up_w.square().mean(dim=(0, 2, 3)).sqrt()


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2 ** 63))


def optimizer_tensors(optimizer: torch.optim.Optimizer, network: LidbHypernet) -> dict[str, torch.Tensor]:
    out = {}
    for name, param in network.named_parameters():
        state = optimizer.state.get(param)
        if state:
            out[f"{name}.exp_avg"] = state["exp_avg"]
            out[f"{name}.exp_avg_sq"] = state["exp_avg_sq"]
            out[f"{name}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, network: LidbHypernet, tensors: dict[str, torch.Tensor]):
    for name, param in network.named_parameters():
        if f"{name}.exp_avg" in tensors:
            optimizer.state[param] = {
                "step": tensors[f"{name}.step"].reshape(()).clone().float(),
                "exp_avg": tensors[f"{name}.exp_avg"].to(param).clone(),
                "exp_avg_sq": tensors[f"{name}.exp_avg_sq"].to(param).clone()}


def _new_network(spec: LidbSpec, arch: ArchSettings, model, feature_dim: int, variant: str,
                 seed: int) -> LidbHypernet:
    config = HypernetConfig(variant=variant, feature_dim=feature_dim, feature_source=arch.feature_source,
                            model_dim=arch.model_dim, num_blocks=arch.num_blocks, num_heads=heads_for(arch.model_dim),
                            iterations=arch.iterations, base_model=model_family(model))
    return build_network(config, spec, seed=seed)


def load_checkpoint(path: str) -> tuple[LoraHypernet, dict[str, torch.Tensor]]:
    """A hypernet file as a ``LORA_HYPERNET`` plus its Adam moments (empty for a file without them)."""
    name = os.path.basename(path)
    data = read_hypernet_file(path)
    network = network_from_file(data, name)
    hypernet = LoraHypernet(name=os.path.splitext(name)[0], config=data.config, spec=data.spec, network=network,
                            training=data.training, path=path)
    return hypernet, data.optim_tensors


def _progress_text(unique_id, text: str) -> None:
    if unique_id is None:
        return
    try:
        from server import PromptServer
        PromptServer.instance.send_progress_text(text, unique_id)
    except Exception:  # engine-only ComfyUI or no running server: the progress bar still shows
        pass


class _Trainer:
    """One training run; holds the state a checkpoint needs."""

    def __init__(self, network: LidbHypernet, data: TrainingData, basis: LidbBasis, settings: TrainSettings,
                 checkpoint: str, history: dict[str, list[float]], start_step: int, run_info: dict,
                 ctx: diffusion.DiffusionContext | None, device: torch.device):
        self.network, self.data, self.settings = network, data, settings
        self.spec = network.spec
        self.basis = LidbBasis(basis.q_up, basis.q_down, basis.m_up.to(device), basis.m_down.to(device))
        self.checkpoint, self.history, self.step = checkpoint, history, start_step
        self.run_info, self.ctx, self.device = run_info, ctx, device
        self.fingerprint = aux_fingerprint(self.spec)
        self.optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
        self.a, self.b = data.a.to(device), data.b.to(device)

    def save(self) -> str:
        training = dict(self.run_info, step=self.step,
                        losses={k: v[-LOSS_HISTORY_LIMIT:] for k, v in self.history.items()})
        return save_hypernet(self.checkpoint, self.network, training=training, fingerprint=self.fingerprint,
                             optim_tensors=optimizer_tensors(self.optimizer, self.network))

    def losses(self, index: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        s, data, pair = self.settings, self.data, self.data.second is not None
        terms: dict[str, torch.Tensor] = {}
        flat = self.network(data.tokens(index).to(self.device))
        a, b = self.a[index.to(self.device)], self.b[index.to(self.device)]
        if s.weight_loss > 0:
            terms["weight"] = weight_errors(self.spec, self.basis, flat, a, b).mean() / data.energy_scale
            if pair and s.reverse_loss > 0:
                flat_rev = self.network(data.tokens(index, reverse=True).to(self.device))
                terms["reverse"] = weight_errors(self.spec, self.basis, flat_rev, a, b, -1.0).mean() / data.energy_scale
        if s.diffusion_loss > 0 and self.ctx is not None:
            down_w, up_w = split_flat(self.spec, flat)
            forward, backward = [], []
            for j, i in enumerate(index.tolist()):
                latents = data.latents[i]
                if pair:
                    before, after = latents
                    forward.append(diffusion.diffusion_loss(self.ctx, down_w[j], up_w[j], after, 1.0, generator,
                                                            before))
                    if s.reverse_loss > 0:
                        backward.append(diffusion.diffusion_loss(self.ctx, down_w[j], up_w[j], before, -1.0,
                                                                 generator, after))
                else:
                    forward.append(diffusion.diffusion_loss(self.ctx, down_w[j], up_w[j], latents[0], 1.0, generator))
            terms["diffusion"] = torch.stack(forward).mean()
            if backward:
                terms["diffusion_reverse"] = torch.stack(backward).mean()
        return terms

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        s = self.settings
        weights = {"weight": s.weight_loss, "reverse": s.weight_loss * s.reverse_loss,
                   "diffusion": s.diffusion_loss, "diffusion_reverse": s.diffusion_loss * s.reverse_loss}
        return sum(weights[k] * v for k, v in terms.items())

    def stop_on_nan(self, what: str) -> None:
        path = self.save()  # parameters are still those of the last good step: no bad update was applied
        raise TrainingStopped(f"training stopped at step {self.step + 1}: the {what} became NaN or Inf (learning rate "
                              f"too high, or broken examples). The last good state (after step {self.step}) is saved "
                              f"in {os.path.basename(path)}; resume from it with a lower learning_rate.")

    def run(self, steps: int, unique_id=None) -> None:
        n = len(self.data.names)
        batch = min(self.settings.batch_size, n)
        pbar = comfy.utils.ProgressBar(steps)
        preview_every = max(1, steps // PREVIEWS)
        self.network.train()
        for k in range(steps):
            try:
                mm.throw_exception_if_processing_interrupted()
            except mm.InterruptProcessingException:
                path = self.save()
                log.warning("[LoRA Composer] hypernet training interrupted at step %d; checkpoint kept in %s",
                            self.step, path)
                raise
            generator = step_generator(self.settings.seed, self.step)
            index = torch.randperm(n, generator=generator)[:batch]
            terms = self.losses(index, generator)
            loss = self.total(terms)
            if not torch.isfinite(loss):
                self.stop_on_nan("loss")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP)
            if not torch.isfinite(grad_norm):
                self.stop_on_nan("gradient")
            self.optimizer.step()
            self.step += 1
            value = float(loss.detach())
            self.history.setdefault("total", []).append(value)
            for name, term in terms.items():
                self.history.setdefault(name, []).append(float(term.detach()))
            every = self.settings.checkpoint_every
            if every and self.step % every == 0 and k + 1 < steps:
                self.save()
            text = f"step {self.step} (run {k + 1}/{steps}): loss {value:.4g}"
            preview = None
            if (k + 1) % preview_every == 0 or k + 1 == steps:
                preview = ("PNG", draw_loss_curve(self.history, 384, 240, first_step=0), 384)
                _progress_text(unique_id, text)
                log.info("[LoRA Composer] hypernet %s", text)
            pbar.update_absolute(k + 1, steps, preview)
        self.network.eval()


def _report(data: TrainingData, trainer: _Trainer, steps: int, path: str, resumed: str | None) -> str:
    errors = [t.relative_error for t in data.targets]
    worst = max(range(len(errors)), key=lambda i: errors[i])
    ignored = sum(t.ignored_modules for t in data.targets)
    lines = [f"{len(data.names)} examples; LiDB projection relative error ‖ΔW − proj‖/‖ΔW‖: mean "
             f"{sum(errors) / len(errors):.3e}, worst {errors[worst]:.3e} ({data.names[worst]})"]
    if ignored:
        lines.append(f"{ignored} weights changed by the target LoRAs lie outside the LiDB layers and were ignored")
    for name, values in trainer.history.items():
        run = values[-steps:]
        if run:
            lines.append(f"{name} loss (this run): {run[0]:.4g} → {run[-1]:.4g}")
    lines.append(f"{'resumed from ' + resumed + ', ' if resumed else ''}trained to step {trainer.step}; "
                 f"checkpoint {path}")
    return "\n".join(lines)


def train_hypernet(*, clip_vision, model, folder: str, variant: str, settings: TrainSettings, arch: ArchSettings,
                   checkpoint_path: str, clip=None, vae=None, resume: LoraHypernet | None = None,
                   resume_optimizer: dict[str, torch.Tensor] | None = None, unique_id=None) -> TrainResult:
    """Train (or continue training) a hypernet; writes ``checkpoint_path`` and returns the trained net."""
    if clip_vision is None or model is None:
        raise ValueError("training needs a CLIP_VISION model and the MODEL the LoRAs are for.")
    with torch.inference_mode(False), torch.enable_grad():
        examples = find_examples(folder, variant)
        if resume is not None:
            if resume.config.variant != variant:
                raise ValueError(f"resume: {resume.name} is a {resume.config.variant!r} hypernet, not {variant!r}.")
            check_model_fits(resume, model, clip)
            text_layers = sum(layer.is_text_encoder for layer in resume.spec.layers)
            if text_layers and clip is None:  # (its training LoRAs would look incomplete without the CLIP's layers)
                raise ValueError(f"resume: {resume.name} trains {text_layers} text-encoder layers; connect the CLIP "
                                 "it was trained with.")
            network = build_network(resume.config, resume.spec)
            network.load_state_dict(resume.network.state_dict())
            source = resume.config.feature_source
        else:
            network, source = None, arch.feature_source
        need_latents = settings.diffusion_loss > 0
        spec = network.spec if network is not None else lidb_spec_for_model(
            model, clip, rank=arch.rank, down_dim=arch.down_dim, up_dim=arch.up_dim, base_seed=arch.aux_seed,
            include_text_encoder=arch.include_text_encoder, init_law=arch.init_law)
        basis = lidb_basis(spec)
        data = prepare_data(examples, spec, basis, variant, source, clip_vision, model, clip, vae, need_latents)
        feature_dim = int(data.first.shape[-1])
        if network is None:
            network = _new_network(spec, arch, model, feature_dim, variant, settings.seed)
            network.set_output_scale(*output_scales(basis, data, spec))
        elif network.config.feature_dim != feature_dim:
            raise ValueError(f"resume: {resume.name} reads features of dimension {network.config.feature_dim}; the "
                             f"connected CLIP-vision model gives {feature_dim}. Use the model it was trained with.")
        device = mm.get_torch_device()
        network.to(device)
        history = {k: list(v) for k, v in (resume.training.get("losses", {}) if resume else {}).items()}
        start = int(resume.training.get("step", 0)) if resume else 0
        ctx = diffusion.prepare(model, clip, spec, settings.prompt) if need_latents else None
        run_info = {"variant": variant, "seed": settings.seed, "settings": asdict(settings),
                    "examples": data.names, "base_model": network.config.base_model,
                    "projection_error_mean": sum(t.relative_error for t in data.targets) / len(data.targets)}
        trainer = _Trainer(network, data, basis, settings, checkpoint_path, history, start, run_info, ctx, device)
        if resume_optimizer:
            restore_optimizer(trainer.optimizer, network, resume_optimizer)
        trainer.run(settings.steps, unique_id)
        path = trainer.save()
        network.to("cpu").eval().requires_grad_(False)
        hypernet = LoraHypernet(name=os.path.splitext(os.path.basename(path))[0], config=network.config, spec=spec,
                                network=network, training={"step": trainer.step, "losses": trainer.history},
                                path=path)
        curve = as_comfy_image(draw_loss_curve(trainer.history, first_step=0))
        report = _report(data, trainer, settings.steps, path, resume.name if resume else None)
    return TrainResult(hypernet, curve, report, path, trainer.history)
