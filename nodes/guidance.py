"""AutoLoRA guidance with separate CFG per branch, as a GUIDER for SamplerCustomAdvanced.

    ε̂_base = CFG(ε_base(c), ε_base(∅); cfg_base)        ε̂_LoRA = CFG(ε_LoRA(c), ε_LoRA(∅); cfg_lora)
    ε       = ε̂_base + γ_t · (ε̂_LoRA − ε̂_base)            ("cfg-then-blend", the default)

"blend-then-cfg" instead blends the cond and the uncond predictions with γ_t and applies one CFG
with cfg_lora (identical to the shared-CFG MODEL form when the two scales are equal). Each branch
follows ComfyUI's own ``sampling_function`` step by step, so the cfg=1 shortcut and other packs'
pre-/post-CFG functions run exactly as in core guiders (post-CFG once per branch in cfg-then-blend);
only the network evaluation of both branches may be one batched call (see ``AutoLoraCFGGuider``).
The paper's exact equation could not be verified (algorithms.md §2); both readings are offered.
"""
from __future__ import annotations

import math

import comfy.samplers

from .composition import autolora_mixture, check_gamma
from .lora_set import LoraSet, require_nonempty
from .patching import model_patch_lists, resolve_set
from .runtime.binding import AdapterRuntime, cfg_reads_network_state

GAMMA_SCHEDULES = ("constant", "linear", "cosine")
MIX_MODES = ("cfg-then-blend", "blend-then-cfg")


def gamma_at(step: int, total_steps: int, gamma: float, gamma_end: float, schedule: str) -> float:
    """γ at a step: constant γ, or from γ (first step) to γ_end (last step), linearly or by a cosine."""
    if schedule == "constant":
        return gamma
    p = min(1.0, max(0.0, step / max(1, total_steps - 1)))  # (an adaptive sampler can take more steps)
    if schedule == "linear":
        f = p
    elif schedule == "cosine":
        f = (1.0 - math.cos(math.pi * p)) / 2.0
    else:
        raise ValueError(f"gamma_schedule must be one of {GAMMA_SCHEDULES}, got {schedule!r}.")
    return gamma + (gamma_end - gamma) * f


class AutoLoraCFGGuider(comfy.samplers.CFGGuider):
    """Base and LoRA branches of one model, CFG per branch.

    Unmerged runs (``auto`` on a CPU) evaluate every branch's [cond, uncond] in ONE ``calc_cond_batch`` whose
    rows the runtime routes by cond (base rows without the LoRA, LoRA rows with it); merged runs evaluate the
    branches one after the other and swap the LoRA weights in between. Both then replay what core's
    ``sampling_function`` does after its ``calc_cond_batch`` (pre-CFG functions, ``cfg_function`` with the
    post-CFG functions) once per branch, so the result is the same either way.
    """

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

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        components = autolora_mixture(self.current_gamma(model_options), self.count)
        options = [option for _, option in components]
        pos, neg = self.conds.get("positive"), self.conds.get("negative")
        together = self._batches(model_options)
        if self.mix == "blend-then-cfg":  # both branches' cond and uncond are blended, then one CFG with cfg_lora
            pairs = [[pos, neg]] * len(options)
            outs = (self._evaluate_together(options, pairs, x, timestep, model_options) if together else
                    [self._evaluate_one(option, pair, x, timestep, model_options)
                     for option, pair in zip(options, pairs)])
            cond = sum(c * out[0] for (c, _), out in zip(components, outs))
            uncond = sum(c * out[1] for (c, _), out in zip(components, outs))
            self.runtime.activate(options[-1])  # CFG functions that call the model (SAG, PAG) see the LoRA branch
            return self._guide([pos, neg], [cond, uncond], self.cfg_lora, x, timestep, model_options)
        scales = [self.cfg_base if option is None else self.cfg_lora for option in options]
        # core's cfg = 1 shortcut, per branch: that branch's uncond is not evaluated
        pairs = [[pos, None if _skips_uncond(scale, model_options) else neg] for scale in scales]
        outs = self._evaluate_together(options, pairs, x, timestep, model_options) if together else None
        acc = None
        for i, ((coefficient, option), pair, scale) in enumerate(zip(components, pairs, scales)):
            if outs is not None:
                out = outs[i]
                self.runtime.activate(option)  # for CFG functions that call the model (SAG, PAG)
            else:
                out = self._evaluate_one(option, pair, x, timestep, model_options)
            guided = self._guide(pair, out, scale, x, timestep, model_options)
            term = guided if coefficient == 1.0 else guided * coefficient
            acc = term if acc is None else acc + term
        return acc

    def _batches(self, model_options) -> bool:
        """Unmerged runs evaluate all branches in one call, except:

        * a pack's ``sampler_calc_cond_batch_function`` is set: it is written for core's [cond, uncond] pairs (core's
          SkipLayerGuidance unpacks exactly two);
        * CFG functions run next to attention patches: they may pass state from the network call to the CFG step
          (core's SAG records the uncond attention map in its attention patch and reads it in its post-CFG
          function), which one call over both branches would share between them.
        """
        run = self.runtime.run
        if run is None or run.hooks is None or "sampler_calc_cond_batch_function" in model_options:
            return False
        return not cfg_reads_network_state(model_options)

    def _evaluate_together(self, options, pairs, x, timestep, model_options) -> list[list]:
        """[cond, uncond] predictions per branch from one batched call, rows routed by cond (unmerged runs)."""
        conds = [c for pair in pairs for c in pair]
        self.runtime.route_by_cond([(option, j) for option in options for j in (0, 1)])
        try:
            out = self._calc(conds, x, timestep, model_options)
        finally:
            self.runtime.route_by_cond(None)
        return [out[2 * i:2 * i + 2] for i in range(len(pairs))]

    def _evaluate_one(self, option, pair, x, timestep, model_options) -> list:
        """One branch's [cond, uncond] predictions with its weights active (they stay active for its CFG step)."""
        self.runtime.activate(option)
        return self._calc(pair, x, timestep, model_options)

    def _calc(self, conds, x, timestep, model_options) -> list:
        """Core's ``sampling_function`` evaluation step: a pack's ``sampler_calc_cond_batch_function`` if set."""
        if "sampler_calc_cond_batch_function" in model_options:
            args = {"conds": conds, "input": x, "sigma": timestep, "model": self.inner_model,
                    "model_options": model_options}
            return model_options["sampler_calc_cond_batch_function"](args)
        return comfy.samplers.calc_cond_batch(self.inner_model, conds, x, timestep, model_options)

    def _guide(self, pair, out, scale, x, timestep, model_options):
        """The rest of core's ``sampling_function`` for one branch: pre-CFG functions, then ``cfg_function``."""
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": pair, "conds_out": out, "cond_scale": scale, "timestep": timestep, "input": x,
                      "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], scale, x, timestep,
                                           model_options=model_options, cond=pair[0], uncond=pair[1])


def _skips_uncond(scale: float, model_options) -> bool:
    return math.isclose(scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)


def branch_count(gamma: float, gamma_end: float) -> int:
    """Branches evaluated per step: 1 when every step's γ is 0 or 1 (one model only), else 2."""
    return 1 if gamma == gamma_end and gamma in (0.0, 1.0) else 2


def autolora_guider(model_patcher, lora_set: LoraSet, positive, negative, cfg_base: float, cfg_lora: float,
                    gamma: float, gamma_schedule: str = "constant", gamma_end: float | None = None,
                    mix: str = "cfg-then-blend", strategy: str = "auto") -> AutoLoraCFGGuider:
    lora_set = require_nonempty(lora_set)
    gamma = check_gamma(gamma)
    gamma_end = check_gamma(gamma if gamma_end is None else gamma_end, "gamma_end")
    if gamma_schedule == "constant":
        gamma_end = gamma
    for name, value in (("cfg_base", cfg_base), ("cfg_lora", cfg_lora)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}.")
    options = [model_patch_lists(e, p) for e, p in resolve_set(model_patcher, None, lora_set)]
    # merged runs cache the LoRA weight set (swapping base <-> LoRA is then pointer moves, memory as one static
    # LoRA); unmerged runs (auto on a CPU) hold no weight copy at all
    runtime = AdapterRuntime(options, branches=branch_count(gamma, gamma_end), strategy=strategy,
                             label="autolora_guider", cached_sets=1, combined_rows=True)
    guider = AutoLoraCFGGuider(runtime.attach(model_patcher), runtime, len(lora_set), cfg_base, cfg_lora, gamma,
                               gamma_end, gamma_schedule, mix)
    guider.set_conds(positive, negative)
    return guider
