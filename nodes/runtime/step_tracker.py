"""Which sampler step a model call belongs to.

The step is the sampler's step ``i`` — the index its per-step callback reports — not the number of
model calls and not the nearest sigma. Multi-evaluation samplers make this subtle: heun evaluates its
second stage *exactly* at σ_{i+1} (the same σ as step i+1's first call), dpm_2 and dpmpp_2s at a σ
between σ_{i+1} and σ_i. Every k-diffusion sampler calls back right after the first evaluation of a
step, so in the event sequence "call, callback(i), call, call, callback(i+1)…" the last call before
callback(i) opens step i and every later call up to the next opening belongs to step i.

We learn that sequence by a *probe*: before the real run, the sampler runs once on the real sigmas
with a stand-in model that returns zeros (cheap: no network), while we record its calls and
callbacks. Global RNG state is saved and restored around the probe, so the real run draws the same
noise. Call ``n`` of the real run then has step ``steps[n]``. Should the real run make more calls
than the probe, the fallback is the sigma rule "last schedule entry ≥ σ".

One sampler calls back *after* all evaluations of its step instead: dpm_adaptive ("call, call, call,
callback(0), …"; its steps are adaptive, so the real run's count differs from the probe's). The probe shows
it by more than one call before the first callback; then a call belongs to the step whose callback comes
next, i.e. the number of callbacks the real run has made so far (``StepTracker.note_callback``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger("LoRA Composer")


def steps_from_events(events: list[object]) -> list[int]:
    """Map each call ("call" events) to its step from the callback indices (ints) between them."""
    call_positions = [n for n, e in enumerate(events) if e == "call"]
    openings: dict[int, int] = {}  # call number → step it opens
    calls_seen = 0
    last_call_number = None
    for event in events:
        if event == "call":
            last_call_number = calls_seen
            calls_seen += 1
        elif last_call_number is not None and last_call_number not in openings:
            openings[last_call_number] = int(event)
    if not openings:
        return []
    first_step = openings[min(openings)]
    steps, current = [], first_step
    for call_number in range(len(call_positions)):
        current = openings.get(call_number, current)
        steps.append(current)
    return steps


def step_from_sigma(sample_sigmas: torch.Tensor, sigma: torch.Tensor) -> int:
    """Fallback: index of the last schedule entry ≥ σ (never the nearest entry)."""
    s = float(sigma.reshape(-1)[0])
    idx = (sample_sigmas >= s - 1e-6 * max(abs(s), 1e-12)).nonzero()
    return int(idx.max()) if idx.numel() else 0


def callback_after_step(events: list[object]) -> bool:
    """Whether the sampler calls back after the last evaluation of a step rather than after its first: more than
    one model call before the first callback (dpm_adaptive). Every other ComfyUI sampler makes exactly one."""
    calls = 0
    for event in events:
        if event != "call":
            return calls > 1
        calls += 1
    return False


class _ProbeModel:
    """Stands in for the guider during the probe: records calls, predicts x0 = 0. Anything else a sampler reads
    from the guider (``model_patcher`` for the SDE samplers' noise and sa_solver's schedule, …) is the guider's: a
    probe that failed on it put those samplers on the sigma rule, which gives heun-shaped samplers' second
    evaluation (at σ_{i+1}) the next step."""

    def __init__(self, guider, events: list):
        self._guider = guider
        self.inner_model = guider.inner_model  # KSAMPLER reads model_sampling through it
        self.events = events

    def __getattr__(self, name):
        return getattr(self.__dict__["_guider"], name)

    def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
        self.events.append("call")
        return torch.zeros_like(x)


def _rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def probe_events(sampler, guider, sigmas, extra_args, noise, latent_image) -> list[object] | None:
    """Run ``sampler`` once with a zero model: its model calls ("call") and callback indices, in order (None on
    failure)."""
    events: list = []

    def callback(i, *_):
        events.append(i)

    rng = _rng_state()
    try:
        probe_args = {k: v for k, v in extra_args.items() if k != "denoise_mask"}
        sampler.sample(_ProbeModel(guider, events), sigmas, probe_args, callback, noise.clone(),
                       latent_image.clone() if latent_image is not None else None, None, True)
    except Exception as e:  # a sampler we cannot probe: fall back to the sigma rule
        log.warning("[LoRA Composer] could not probe %s's steps (%s: %s); a model call's step is then the last "
                    "schedule entry at or above its sigma", type(sampler).__name__, type(e).__name__, e)
        return None
    finally:
        _restore_rng(rng)
    return events


@dataclass
class StepTracker:
    """Counts the model calls of one sampling run and reports each call's step."""

    sample_sigmas: torch.Tensor
    probed: list[int] = field(default_factory=list)
    calls: int = 0
    after_step: bool = False  # the sampler calls back after a step's last evaluation (``callback_after_step``)
    callbacks: int = 0  # callbacks of the real run so far

    @classmethod
    def probed_from(cls, sample_sigmas: torch.Tensor, events: list[object] | None) -> "StepTracker":
        events = events or []
        return cls(sample_sigmas, steps_from_events(events), after_step=callback_after_step(events))

    def note_callback(self, step: int) -> None:
        """The real run called back for ``step`` (the sampler's own index)."""
        self.callbacks = int(step) + 1

    def step_for_call(self, sigma: torch.Tensor) -> int:
        n = self.calls
        self.calls += 1
        if self.after_step:
            return self.callbacks
        if n < len(self.probed):
            return self.probed[n]
        return step_from_sigma(self.sample_sigmas, sigma)
