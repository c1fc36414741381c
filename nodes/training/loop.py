"""The optimisation loop: DreamBooth loss with prior preservation, optimiser, progress, checkpoints.

Loss (DreamBooth, Ruiz et al. 2023), per step with a batch of instance latents x and class
latents x_pr::

    L = E‖ε − ε_θ(x_t, c)‖² + λ · E‖ε′ − ε_θ(x′_t, c_pr)‖²

``x_t = x + σ·ε`` (the model's own ``noise_scaling``) with σ drawn uniformly in timestep
(``percent_to_sigma(u)``, u ~ U(0, 1)), and ε_θ recovered from ComfyUI's denoised prediction:
for ε-prediction models ``x̂0 = x_t − σ·ε_θ``, hence ``ε − ε_θ = (x̂0 − x)/σ`` exactly. The same
expression is the velocity error of flow models (x_t = (1−σ)x + σε, v = ε − x), so one formula
serves both. Instance and class rows run in one forward pass when their conds concatenate.

Noise, timesteps and batch order come from one CPU ``torch.Generator`` seeded with ``seed``:
runs are reproducible and do not depend on the device. AdamW (or Adam/SGD), gradient norm
clipped to 1. Every step first checks ComfyUI's interrupt flag; out-of-memory errors are turned
into a message saying what to reduce (``TrainingOOM`` carries the step).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import comfy.model_management as mm
import comfy.utils
import torch

from .conditioning import RowConds, concat_rows
from .session import TrainingSession

log = logging.getLogger("LoRA Composer")

OPTIMIZERS = ("AdamW", "Adam", "SGD")
MAX_GRAD_NORM = 1.0
_PERCENT_EDGE = 1e-4  # keep u away from 0/1 (percent_to_sigma maps them to σ = ∞ / 0)


@dataclass
class LoopConfig:
    steps: int
    learning_rate: float
    batch_size: int
    optimizer: str = "AdamW"
    seed: int = 0
    lambda_prior: float = 0.0
    checkpoint_every: int = 0


@dataclass
class LossHistory:
    total: list[float] = field(default_factory=list)
    instance: list[float] = field(default_factory=list)
    prior: list[float] = field(default_factory=list)

    @property
    def steps_done(self) -> int:
        return len(self.total)


class TrainingOOM(Exception):
    """Out of memory inside a step (wraps ComfyUI's/torch's OOM error)."""

    def __init__(self, step: int, error: BaseException):
        super().__init__(str(error))
        self.step = step
        self.error = error


@dataclass
class Batch:
    x0: torch.Tensor  # [B, C, h, w] model-space latents
    noise: torch.Tensor
    sigma: torch.Tensor  # [B]
    rows: list[RowConds]


def make_optimizer(name: str, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(parameters, lr=lr, foreach=True)
    if name == "Adam":
        return torch.optim.Adam(parameters, lr=lr, foreach=True)
    if name == "SGD":
        return torch.optim.SGD(parameters, lr=lr, foreach=True)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}.")


def draw_sigmas(model_sampling, count: int, generator: torch.Generator) -> torch.Tensor:
    percents = torch.rand(count, generator=generator).clamp(_PERCENT_EDGE, 1.0 - _PERCENT_EDGE)
    return torch.tensor([float(model_sampling.percent_to_sigma(float(p))) for p in percents], dtype=torch.float32)


def sigmas_at(model_sampling, percents: list[float]) -> torch.Tensor:
    """σ for fixed timestep fractions (used for held-out evaluation)."""
    return torch.tensor([float(model_sampling.percent_to_sigma(p)) for p in percents], dtype=torch.float32)


def noised(model_sampling, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return model_sampling.noise_scaling(sigma, noise, x0, False)


def epsilon_errors(x0_pred: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-row mean of (ε − ε_θ)² = ((x̂0 − x0)/σ)² (see module docstring)."""
    err = (x0_pred.float() - x0.float()) / sigma.float().view(-1, *([1] * (x0.ndim - 1)))
    return err.square().flatten(1).mean(1)


def predict_rows(session: TrainingSession, x_t: torch.Tensor, sigma: torch.Tensor, rows: list[RowConds]) -> torch.Tensor:
    """x̂0 for every row, one forward pass per group of concatenable conds."""
    out: list[torch.Tensor | None] = [None] * x_t.shape[0]
    for indices, kwargs in concat_rows(rows):
        index = torch.tensor(indices, device=x_t.device)
        pred = session.predict_x0(x_t.index_select(0, index), sigma.index_select(0, index), kwargs)
        for j, i in enumerate(indices):
            out[i] = pred[j]
    return torch.stack(out)  # type: ignore[arg-type]


class IndexStream:
    """Indices 0…n−1 in a fresh random order each epoch (every image equally often)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator, self.queue = n, generator, []

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if not self.queue:
                self.queue = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self.queue.pop())
        return out


def training_step(session: TrainingSession, instance: Batch, prior: Batch | None,
                  lambda_prior: float) -> tuple[float, float, float]:
    """One forward/backward pass; returns (total, instance, prior) loss values. Grads are left in place."""
    ms = session.base_model.model_sampling
    x0 = instance.x0 if prior is None else torch.cat([instance.x0, prior.x0])
    noise = instance.noise if prior is None else torch.cat([instance.noise, prior.noise])
    sigma = instance.sigma if prior is None else torch.cat([instance.sigma, prior.sigma])
    rows = instance.rows if prior is None else instance.rows + prior.rows
    x_t = noised(ms, x0, noise, sigma)
    errors = epsilon_errors(predict_rows(session, x_t, sigma, rows), x0, sigma)
    b = instance.x0.shape[0]
    instance_loss = errors[:b].mean()
    prior_loss = errors[b:].mean() if prior is not None else torch.zeros((), device=errors.device)
    total = instance_loss + lambda_prior * prior_loss
    total.backward()
    return float(total.detach()), float(instance_loss.detach()), float(prior_loss.detach())


def _is_oom(error: BaseException) -> bool:
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)) or (
            mm.OOM_EXCEPTION is not Exception and isinstance(error, mm.OOM_EXCEPTION)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def run_loop(session: TrainingSession, parameterisation, config: LoopConfig, instance_latents: torch.Tensor,
             class_latents: torch.Tensor | None, conds: Callable[[], tuple[RowConds, RowConds | None]],
             on_checkpoint: Callable[[int], None], history: LossHistory) -> LossHistory:
    """Run ``config.steps`` steps (appending to ``history``); raises InterruptProcessingException,
    TrainingOOM or ValueError (non-finite loss) with ``history`` holding the completed steps.

    ``conds()`` returns the instance and class row conds for this step (recomputed each step
    when the text encoder trains, so gradients reach it).
    """
    device = session.device
    ms = session.base_model.model_sampling
    parameters = parameterisation.parameters()
    optimizer = make_optimizer(config.optimizer, parameters, config.learning_rate)
    generator = torch.Generator(device="cpu").manual_seed(int(config.seed))
    instance_stream = IndexStream(instance_latents.shape[0], generator)
    class_stream = IndexStream(class_latents.shape[0], generator) if class_latents is not None else None
    use_prior = class_latents is not None and config.lambda_prior > 0
    ui_bar = comfy.utils.ProgressBar(config.steps)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, desc="LoRA Composer training", disable=not comfy.utils.PROGRESS_BAR_ENABLED)
    try:
        for step in range(config.steps):
            mm.throw_exception_if_processing_interrupted()
            b = config.batch_size
            idx = instance_stream.take(b)
            instance_noise = torch.randn((b, *instance_latents.shape[1:]), generator=generator)
            instance_sigma = draw_sigmas(ms, b, generator)
            prior_draw = None
            if use_prior:
                cidx = class_stream.take(b)
                prior_draw = (cidx, torch.randn((b, *class_latents.shape[1:]), generator=generator),
                              draw_sigmas(ms, b, generator))
            try:
                session.set_factors(parameterisation.factors())
                instance_row, class_row = conds()
                instance = Batch(instance_latents[idx].to(device), instance_noise.to(device),
                                 instance_sigma.to(device), [instance_row] * b)
                prior = None
                if prior_draw is not None:
                    cidx, noise, sigma = prior_draw
                    prior = Batch(class_latents[cidx].to(device), noise.to(device), sigma.to(device), [class_row] * b)
                total, inst, pr = training_step(session, instance, prior, config.lambda_prior)
            except Exception as error:  # noqa: BLE001 - re-raised below unless it is an OOM
                optimizer.zero_grad(set_to_none=True)
                session.set_factors({})
                if _is_oom(error):
                    raise TrainingOOM(step, error) from error
                raise
            if not math.isfinite(total):
                optimizer.zero_grad(set_to_none=True)
                raise ValueError(f"the training loss became {total} at step {step + 1}; lower learning_rate "
                                 f"(now {config.learning_rate:g}) or use training_dtype fp32.")
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            session.set_factors({})
            history.total.append(total)
            history.instance.append(inst)
            if use_prior:
                history.prior.append(pr)
            bar.set_postfix({"loss": f"{total:.4f}"})
            bar.update(1)
            ui_bar.update_absolute(step + 1, config.steps)
            if config.checkpoint_every > 0 and (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps:
                on_checkpoint(step + 1)
    finally:
        bar.close()
        del optimizer
    return history


@torch.no_grad()
def denoising_error(session_or_model, latents: torch.Tensor, rows: list[RowConds], percents: list[float],
                    seed: int) -> float:
    """Mean ε-error of a model on ``latents`` (model space) at fixed timestep fractions and seeded noise.

    ``session_or_model`` is a TrainingSession or any object with ``base_model`` and ``predict_x0``;
    used for held-out evaluation (tests, reports).
    """
    ms = session_or_model.base_model.model_sampling
    device = session_or_model.device
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    total, count = 0.0, 0
    for p in percents:
        sigma = sigmas_at(ms, [p] * latents.shape[0]).to(device)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        x0 = latents.to(device)
        x_t = noised(ms, x0, noise, sigma)
        pred = predict_rows(session_or_model, x_t, sigma, rows)
        total += float(epsilon_errors(pred, x0, sigma).sum())
        count += latents.shape[0]
    return total / count
