"""AutoLoRA guidance with separate CFG per branch, as a GUIDER for SamplerCustomAdvanced.

    ε̂_base = CFG(ε_base(c), ε_base(∅); cfg_base)        ε̂_LoRA = CFG(ε_LoRA(c), ε_LoRA(∅); cfg_lora)
    ε       = ε̂_base + γ_t · (ε̂_LoRA − ε̂_base)            ("cfg-then-blend", the default)

"blend-then-cfg" instead blends the cond and the uncond predictions with γ_t and applies one CFG
with cfg_lora (identical to the shared-CFG MODEL form when the two scales are equal). Each branch is
evaluated with ComfyUI's own ``sampling_function``, so the cfg=1 shortcut and other packs'
pre-/post-CFG functions run exactly as in core guiders (post-CFG once per branch in cfg-then-blend).
The paper's exact equation could not be verified (algorithms.md §2); both readings are offered.
"""
from __future__ import annotations

import math

import comfy.samplers

from .composition import autolora_mixture, check_gamma
from .lora_set import LoraSet, require_nonempty
from .patching import model_patch_lists, resolve_set
from .runtime.binding import AdapterRuntime

GAMMA_SCHEDULES = ("constant", "linear", "cosine")
MIX_MODES = ("cfg-then-blend", "blend-then-cfg")


def gamma_at(step: int, total_steps: int, gamma: float, gamma_end: float, schedule: str) -> float:
    """γ at a step: constant γ, or from γ (first step) to γ_end (last step), linearly or by a cosine."""
    if schedule == "constant":
        return gamma
    p = step / max(1, total_steps - 1)
    if schedule == "linear":
        f = p
    elif schedule == "cosine":
        f = (1.0 - math.cos(math.pi * p)) / 2.0
    else:
        raise ValueError(f"gamma_schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}.")
    return gamma + (gamma_end - gamma) * f


class AutoLoraCFGGuider(comfy.samplers.CFGGuider):
    """Base and LoRA branches of one model; the runtime swaps the LoRA weights in between."""

    def __init__(self, model_patcher, runtime: AdapterRuntime, count: int, cfg_base: float, cfg_lora: float,
                 gamma: float, gamma_end: float, gamma_schedule: str, mix: str):
        super().__init__(model_patcher)
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {MIX_MODES}, got {mix!r}.")
        gamma_at(0, 2, gamma, gamma_end, gamma_schedule)  # validates the schedule name
        self.runtime, self.count = runtime, count
        self.cfg_base, self.cfg_lora = float(cfg_base), float(cfg_lora)
        self.gamma, self.gamma_end, self.gamma_schedule, self.mix = gamma, gamma_end, gamma_schedule, mix
        self.cfg = self.cfg_lora  # what other code reads as "the" cfg of this guider

    def set_conds(self, positive, negative):
        self.inner_set_conds({"positive": positive, "negative": negative})

    def current_gamma(self, model_options) -> float:
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        total = len(sigmas) - 1 if sigmas is not None else 1
        run = self.runtime.run
        return gamma_at(run.step if run is not None else 0, total, self.gamma, self.gamma_end, self.gamma_schedule)

    def _branch(self, option, x, timestep, model_options, seed, cfg):
        self.runtime.activate(option)
        return comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                self.conds.get("positive"), cfg, model_options=model_options,
                                                seed=seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        gamma = self.current_gamma(model_options)
        lora = tuple([1.0] * self.count)
        if self.mix == "blend-then-cfg":
            return self._blend_then_cfg(gamma, lora, x, timestep, model_options, seed)
        acc = None
        for coefficient, option in autolora_mixture(gamma, self.count):
            cfg = self.cfg_base if option is None else self.cfg_lora
            out = self._branch(option, x, timestep, model_options, seed, cfg)
            term = out if coefficient == 1.0 else out * coefficient
            acc = term if acc is None else acc + term
        return acc

    def _blend_then_cfg(self, gamma, lora, x, timestep, model_options, seed):
        pos, neg = self.conds.get("positive"), self.conds.get("negative")
        outs = {}
        for coefficient, option in autolora_mixture(gamma, self.count):
            self.runtime.activate(option)
            outs[option] = (coefficient, comfy.samplers.calc_cond_batch(self.inner_model, [pos, neg], x, timestep,
                                                                        model_options))
        cond = sum(c * o[0] for c, o in outs.values())
        uncond = sum(c * o[1] for c, o in outs.values())
        conds_out = [cond, uncond]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            conds_out = fn({"conds": [pos, neg], "conds_out": conds_out, "cond_scale": self.cfg_lora,
                            "timestep": timestep, "input": x, "sigma": timestep, "model": self.inner_model,
                            "model_options": model_options})
        return comfy.samplers.cfg_function(self.inner_model, conds_out[0], conds_out[1], self.cfg_lora, x, timestep,
                                           model_options=model_options, cond=pos, uncond=neg)


def autolora_guider(model_patcher, lora_set: LoraSet, positive, negative, cfg_base: float, cfg_lora: float,
                    gamma: float, gamma_schedule: str = "constant", gamma_end: float | None = None,
                    mix: str = "cfg-then-blend") -> AutoLoraCFGGuider:
    lora_set = require_nonempty(lora_set)
    gamma = check_gamma(gamma)
    gamma_end = check_gamma(gamma if gamma_end is None else gamma_end, "gamma_end")
    for name, value in (("cfg_base", cfg_base), ("cfg_lora", cfg_lora)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}.")
    options = [model_patch_lists(e, p) for e, p in resolve_set(model_patcher, None, lora_set)]
    runtime = AdapterRuntime(options, strategy="merged", label="autolora_guider", cached_sets=1)
    guider = AutoLoraCFGGuider(runtime.attach(model_patcher), runtime, len(lora_set), cfg_base, cfg_lora, gamma,
                               gamma_end, gamma_schedule, mix)
    guider.set_conds(positive, negative)
    return guider
