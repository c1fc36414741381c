"""Attaching the adapter runtime to a ComfyUI MODEL through keyed wrappers (nothing single-slot).

* ``SAMPLER_SAMPLE`` wrapper: spans one sampling run. Probes the sampler's step structure, installs
  the execution strategy (merged swap or unmerged hooks) and, in a ``finally``, restores the model
  exactly — also when sampling is interrupted.
* ``PREDICT_NOISE`` wrapper: runs before every model call of the sampler; asks the policy which
  option(s) act for this call's step and activates them.

Both are registered on a *clone* under a key unique to this runtime, so other packs' keyed wrappers
compose with ours and the input MODEL is never modified.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from typing import Callable

import comfy.patcher_extension as pe
import torch

from .layers import build_layer_plans
from .merged_swap import MergedSwapper
from .step_tracker import StepTracker, probe_steps
from .unmerged import Routing, UnmergedAdapters

log = logging.getLogger("LoRA Composer")

STRATEGIES = ("auto", "merged", "unmerged")
_ids = itertools.count()


@dataclass
class RunState:
    tracker: StepTracker
    swapper: MergedSwapper | None = None
    hooks: UnmergedAdapters | None = None
    routing: Routing = field(default_factory=Routing)
    steps_seen: list[int] = field(default_factory=list)


class AdapterRuntime:
    """Options (LoRAs as ComfyUI patch lists) plus a per-call policy ``step → option index or None``."""

    def __init__(self, options: list[dict[str, list[tuple]]], policy: Callable[[int], int | None],
                 strategy: str = "auto", label: str = "runtime"):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        self.options = options
        self.policy = policy
        self.strategy = strategy
        self.key = f"lora_composer.{label}.{next(_ids)}"
        self.run: RunState | None = None
        self.history: list[list[int]] = []  # steps seen per finished run (diagnostics and tests)

    def attach(self, model_patcher):
        """A clone of ``model_patcher`` that runs this runtime whenever it samples."""
        clone = model_patcher.clone()
        clone.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, self.key, self.sampler_sample)
        clone.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.key, self.predict_noise)
        return clone

    def chosen_strategy(self) -> str:
        return "merged" if self.strategy == "auto" else self.strategy

    # -- wrappers ------------------------------------------------------------------------------
    def sampler_sample(self, executor, *args, **kwargs):
        guider, sigmas, extra_args, _callback, noise = args[:5]
        latent_image = args[5] if len(args) > 5 else kwargs.get("latent_image")
        base_model = guider.inner_model
        run = RunState(tracker=StepTracker(sigmas, probe_steps(executor.class_obj, guider, sigmas, extra_args,
                                                                   noise, latent_image)))
        if self.chosen_strategy() == "merged":
            run.swapper = MergedSwapper(base_model, self.options)
        else:
            run.hooks = UnmergedAdapters(build_layer_plans(base_model, self.options), run.routing)
            run.hooks.install(base_model, noise.device)
        self.run = run
        try:
            return executor(*args, **kwargs)
        finally:
            if run.swapper is not None:
                run.swapper.restore()
            if run.hooks is not None:
                run.hooks.remove()
            self.history.append(run.steps_seen)
            self.run = None

    def predict_noise(self, executor, x, timestep, model_options=None, seed=None, *args, **kwargs):
        run = self.run
        if run is not None:
            step = run.tracker.step_for_call(timestep)
            run.steps_seen.append(step)
            option = self.policy(step)
            if run.swapper is not None:
                run.swapper.activate(option)
            else:
                weights = torch.zeros(1, len(self.options))
                if option is not None:
                    weights[0, option] = 1.0
                run.routing.set(weights)
        return executor(x, timestep, model_options, seed, *args, **kwargs)
