"""Attaching the adapter runtime to a ComfyUI MODEL through keyed wrappers (nothing single-slot).

* ``SAMPLER_SAMPLE`` wrapper: spans one sampling run. Probes the sampler's step structure, installs
  the execution strategy (merged swap or unmerged hooks) and, in a ``finally``, restores the model
  exactly — also when sampling is interrupted.
* ``PREDICT_NOISE`` wrapper: runs before every model call of the sampler; records the call's step
  and, for a *selection* policy (Switch), activates the option for that step.
* ``APPLY_MODEL`` wrapper (mixture policies: Composite, AutoLoRA): evaluates the network once per
  mixture component — sequentially with merged weights, or in one batch with per-row routing — and
  returns Σ coefficient · output. The outputs are denoised (x0) predictions; for a fixed x and σ
  they are affine in ε, so a mixture whose coefficients sum to 1 is the same mixture of ε's.
  For a guider that batches several branches' conds in one ``calc_cond_batch`` (AutoLoraGuider,
  ``branches`` > 0), the same wrapper routes each row by the cond it belongs to (``route_by_cond``).

Wrappers are registered on a *clone* under a key unique to this runtime, so other packs' keyed
wrappers compose with ours and the input MODEL is never modified.
"""
from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import comfy.model_management as mm
import comfy.patcher_extension as pe
import torch

from . import batching
from .inplace_swap import InPlaceSwapper, backup_bytes, in_place_obstacle
from .layers import build_layer_plans, unmerged_obstacle
from .lowrank_terms import LowRankTerms
from .merged_swap import MergedSwapper, held_bytes, merge_obstacle
from .step_tracker import StepTracker, probe_events
from .staging import PackedUpload
from .unmerged import Routing, UnmergedAdapters, lowrank_upload


STRATEGIES = ("auto", "merged", "unmerged", "merged-lowvram")
RUNS_KEPT = 32  # per-run diagnostics an AdapterRuntime keeps (history, strategies, forwards)
MERGED = ("merged", "merged-lowvram")  # the strategies that rewrite the model's weights during a run
_ids = itertools.count()
log = logging.getLogger("LoRA Composer")

# Base models (by id) whose weights a merged run of one of our runtimes is swapping right now → that runtime's key.
# A second runtime stacked on the same model (e.g. LoraSetComposite → AutoLoraGuider) must not swap as well: each
# swapper computes its weights from the Parameters it found and rewrites its own copies in place, so two would
# overwrite each other's LoRAs. The second runs unmerged instead: its hooks add to the outputs of whatever weights
# are in place, so the two compose exactly.
_SWAPPING: dict[int, str] = {}

Option = "int | tuple[float, ...] | None"  # an entry index, per-entry weights, or no LoRA
Mixture = Sequence[tuple[float, object]]  # (coefficient, option) pairs


def cfg_reads_network_state(model_options: dict) -> bool:
    """CFG functions next to attention patches: they may pass state from the network call to the CFG step (core's
    SAG records the uncond attention map in its attention patch and reads it in its post-CFG function). Then each
    option must get a network call of its own, in a fixed order, so that every strategy hands the CFG step the same
    state."""
    transformer = model_options.get("transformer_options", {})
    cfg_functions = model_options.get("sampler_pre_cfg_function") or model_options.get("sampler_post_cfg_function")
    return bool(cfg_functions and (transformer.get("patches") or transformer.get("patches_replace")))


def _counting_callback(tracker: StepTracker, callback):
    """The sampler's per-step callback, telling ``tracker`` each step it completes first (a sampler given no
    callback calls none, so one is always passed)."""
    def counting(step, *rest):
        tracker.note_callback(step)
        return callback(step, *rest) if callback is not None else None
    return counting


@dataclass
class RunState:
    tracker: StepTracker
    swapper: MergedSwapper | InPlaceSwapper | None = None
    hooks: UnmergedAdapters | None = None
    routing: Routing = field(default_factory=Routing)
    step: int = 0
    reverse: bool = False  # merged mixtures alternate their component order between calls (one swap fewer)
    stateful_cfg: bool = False  # this model call's CFG step reads state from the network call (see above)
    cond_routes: "list[tuple[object, int]] | None" = None  # per cond index: (option, index the model sees)
    steps_seen: list[int] = field(default_factory=list)
    forwards: int = 0  # network evaluations (APPLY_MODEL executions), for diagnostics
    active_option: object = None  # what the last ``activate`` made act (its rows' uuids: batching.option_uuids)
    model_patches: dict | None = None  # the model's own transformer_options["patches"] this model call


class AdapterRuntime:
    """Options (LoRAs as ComfyUI patch lists) plus a policy saying which act at each model call.

    ``select(step) → option`` (Switch) or ``mixture(step) → [(coefficient, option), …]``.
    ``branches``: for a guider that drives the runtime itself (``activate`` / ``route_by_cond``), how many
    options it evaluates per step (1: `auto` swaps merged weights; more: batched rows routed per option).
    ``cached_sets``: weight sets the merged strategy keeps, each a patched copy of the LoRA'd layers (see
    ``MergedSwapper``); AutoLoRA keeps its one LoRA set, Composite none (k copies of the weights is what the
    runtime exists to avoid). ``combined_rows``: rows that apply several options at once (AutoLoRA's LoRA branch,
    the whole set), which the hooks reproduce only where core's in-order patching adds up (``unmerged_obstacle``).
    """

    def __init__(self, options: list[dict[str, list[tuple]]], *, select: Callable[[int], object] | None = None,
                 mixture: Callable[[int], Mixture] | None = None, branches: int = 0, strategy: str = "auto",
                 label: str = "runtime", cached_sets: int = 0, combined_rows: bool = False,
                 free_memory: Callable[[torch.device], float] | None = None):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
        self.options = options
        self.select = select
        self.mixture = mixture
        self.branches = branches
        self.strategy = strategy
        self.cached_sets = cached_sets
        self.combined_rows = combined_rows  # rows apply several options at once (see layers.unmerged_obstacle)
        self.free_memory = free_memory or mm.get_free_memory
        self.key = f"lora_composer.{label}.{next(_ids)}"
        self.run: RunState | None = None
        # per finished run, oldest first, the last RUNS_KEPT runs (diagnostics and tests)
        self.history: list[list[int]] = []  # steps seen
        self.strategies: list[str] = []  # the strategy used
        self.forwards: list[int] = []  # network evaluations
        self._terms: LowRankTerms | None = None  # see low_rank_terms
        # unmerged runs: the factors in the hooks' form, and their page-locked packed copy, made at the first run
        self._lowrank_memo: dict = {}
        self._hook_upload: PackedUpload | None = None
        # per base model: what keeps its weights from being merged / written in place (see _obstacle)
        self._obstacles: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, str | None]]" = (
            weakref.WeakKeyDictionary())

    def attach(self, model_patcher):
        """A clone of ``model_patcher`` that runs this runtime whenever it samples."""
        clone = model_patcher.clone()
        clone.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, self.key, self.sampler_sample)
        clone.add_wrapper_with_key(pe.WrappersMP.PREDICT_NOISE, self.key, self.predict_noise)
        if self.mixture is not None or self.branches:
            clone.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, self.key, self.apply_model)
        return clone

    def chosen_strategy(self) -> str:
        """The strategy the benchmarks measured faster (README "Benchmarks"), before ``strategy_for_run``'s limits."""
        if self.strategy != "auto":
            return self.strategy
        # One network evaluation per model call (Switch; Composite of one LoRA; AutoLoRA at γ = 0 or 1) is cheapest
        # baked in, and exact. Mixtures run as one batch with per-row adapters on CPUs and GPUs alike: it costs the
        # low-rank FLOPs on top of k rows and holds no weight copy, where k merged passes per call pay a weight
        # recomputation per swap. CPU (81.5 M UNet, fresh runs): batched 0.87-1.01x k static runs vs merged
        # 0.98-1.07x. H100 (859 M SD1.5-sized UNet, 512 px, fp32, steady runs, 2026-11-27): Composite batched
        # 1.26 / 1.05 / 0.98x k static runs at k = 2 / 3 / 5 vs merged 1.45 / 1.92 / 1.96x; AutoLoRA 1.97x a
        # static LoRA vs 2.24x (model form) and 1.98x vs 2.22x (guider).
        if self.evaluations_per_step() == 1:
            return "merged"
        return "unmerged"

    def evaluations_per_step(self) -> int:
        """Options evaluated per model call: 1 for a selection (Switch), the components of a mixture, or the
        branches a guider evaluates."""
        if self.mixture is not None:
            return len(self.mixture(0))
        return max(1, self.branches)

    def strategy_for_run(self, guider, base_model, device: torch.device, noise_shape: Sequence[int] = ()) -> str:
        """``chosen_strategy``, except that a merged swap is not possible next to something else that rewrites
        the same weights during the run; then the hooks (which add to the layers' outputs) run instead:

        * another of our runtimes already swapping this model's weights (stacked nodes, see ``_SWAPPING``);
        * ComfyUI's hook LoRAs on the conditioning (``CreateHookLora`` → ``Set CLIP Hooks`` / cond hooks): core
          copies hook-patched weights *into* whatever Parameters are in the model and later copies its backups
          back into whatever Parameters are there then — with a swap in between, into the model's own weights
          (a leak of the LoRA into the base model, measured before this rule);
        * weights stored in a form only another pack's loader can patch (``merge_obstacle``: GGUF's packed
          blocks, integer weights without core's ``set_weight``).

        And ``auto`` does not keep a patched copy on an accelerator whose free memory cannot hold it next to the
        sampling run's own needs (``merged_copy_fits``): then it swaps in place, the originals in host memory
        (``merged-lowvram``, ``in_place_fits``), and where that cannot be either, runs the hooks: better their few
        extra FLOPs than out of memory.

        The other way round, layers no hook can run (``unmerged_obstacle``: a 3-D or grouped conv, a parameter that
        is no layer's weight or bias) make an unmerged choice merge instead; where neither can run, a clear error.
        """
        strategy = self.chosen_strategy()
        if strategy not in MERGED:
            obstacle = self._obstacle("unmerged", base_model)
            if obstacle is None:
                return strategy
            (log.warning if self.strategy == "unmerged" else log.info)(
                "[LoRA Composer] %s: the hooks cannot run these LoRAs on %s; merging them into the weights instead.",
                self.key, obstacle)
            strategy = "merged"
        reason = None
        if id(base_model) in _SWAPPING:
            reason = f"stacked on another LoRA Composer node that swaps merged weights ({_SWAPPING[id(base_model)]})"
        elif any(getattr(p, "hook_patches", None) for p in (getattr(guider, "model_patcher", None),
                                                             getattr(base_model, "current_patcher", None))):
            reason = "ComfyUI hook LoRAs on the conditioning rewrite the same weights during sampling"
        else:
            obstacle = self._obstacle("merge", base_model)
            reason = None if obstacle is None else f"cannot merge into these weights: {obstacle}"
        if reason is not None:
            self._refuse_if_hooks_cannot_run(base_model, reason)
            # asked for by name: a warning; auto's choice: said, as every fallback of auto is
            (log.warning if self.strategy in MERGED else log.info)(
                "[LoRA Composer] %s: %s; running unmerged (LoRAs added to the layers' outputs).", self.key, reason)
            return "unmerged"
        if strategy == "merged-lowvram":
            obstacle = self._obstacle("in place", base_model)
            if obstacle is not None:
                unmerged_obstacle_ = self._obstacle("unmerged", base_model)
                if unmerged_obstacle_ is not None:  # the copy form: it writes no weight in place
                    log.warning("[LoRA Composer] %s: cannot swap weights in place (%s) and the hooks cannot run %s; "
                                "swapping a patched copy instead (strategy merged).", self.key, obstacle,
                                unmerged_obstacle_)
                    return "merged"
                log.warning("[LoRA Composer] %s: cannot swap weights in place: %s; running unmerged.", self.key,
                            obstacle)
                return "unmerged"
            return strategy
        if self.strategy == "auto" and device.type != "cpu" and noise_shape:
            fits, why = self.merged_copy_fits(base_model, device, noise_shape)
            if not fits:
                obstacle = self._obstacle("in place", base_model)
                in_place, why_not = (False, obstacle) if obstacle else self.in_place_fits(base_model, device,
                                                                                            noise_shape)
                if in_place:
                    log.info("[LoRA Composer] %s: %s; swapping the LoRAs into the weights in place instead (their "
                             "originals in host memory).", self.key, why)
                    return "merged-lowvram"
                unmerged_obstacle_ = self._obstacle("unmerged", base_model)
                if unmerged_obstacle_ is not None:  # nothing else can run these LoRAs: try the copy
                    log.warning("[LoRA Composer] %s: %s, and not in place either (%s), but the hooks cannot run %s; "
                                "keeping the patched copy anyway (it may not fit).", self.key, why, why_not,
                                unmerged_obstacle_)
                    return strategy
                log.info("[LoRA Composer] %s: %s, and not in place either (%s); running unmerged (LoRAs as adapters, "
                         "no weight copy).", self.key, why, why_not)
                return "unmerged"
        return strategy

    def _refuse_if_hooks_cannot_run(self, base_model, why_not_merged: str) -> None:
        obstacle = self._obstacle("unmerged", base_model)
        if obstacle is not None:
            raise ValueError(f"{self.key}: these LoRAs can neither be merged into the weights ({why_not_merged}) nor "
                             f"run as adapters (the hooks cannot run {obstacle}).")

    def _obstacle(self, kind: str, base_model) -> str | None:
        """``merge_obstacle`` ("merge"), ``in_place_obstacle`` ("in place") or ``unmerged_obstacle`` ("unmerged") of
        the options on this model, worked out at its first run and kept (a model's layers keep the form they were
        loaded in; the check resolves every LoRA'd layer, a few ms per run)."""
        found = self._obstacles.setdefault(base_model, {})
        if kind not in found:
            check = {"merge": merge_obstacle, "in place": in_place_obstacle,
                     "unmerged": partial(unmerged_obstacle, combined_rows=self.combined_rows)}[kind]
            found[kind] = check(base_model, self.options)
        return found[kind]

    def merged_copy_bytes(self, base_model) -> int:
        """Memory a merged run holds beyond one static LoRA on an accelerator: ComfyUI keeps a static LoRA's
        original weights on the offload device, while the swapper keeps them in place beside its patched copy
        (swaps stay exact without a transfer per swap): ``merged_swap.held_bytes``, plus the fast path's LoRA
        factors in fp32 on the device."""
        return held_bytes(base_model, self.options, self.cached_sets) + self.low_rank_terms().device_bytes()

    def low_rank_terms(self) -> LowRankTerms:
        """The merged fast path's view of the options, made once and kept for every run."""
        if self._terms is None:
            self._terms = LowRankTerms(self.options)
        return self._terms

    def merged_copy_fits(self, base_model, device: torch.device, noise_shape: Sequence[int]) -> tuple[bool, str]:
        """Whether ``merged_copy_bytes`` fit in the free memory next to what ComfyUI estimates one model call of
        this latent needs (cond and uncond rows, as ``comfy.sampler_helpers.estimate_memory``); and why not."""
        copy = self.merged_copy_bytes(base_model)
        inference = self._inference_bytes(base_model, noise_shape)
        free = self.free_memory(device)
        if copy + inference <= free:
            return True, ""
        return False, (f"the merged strategy's patched weight copy ({copy / 2**20:.0f} MiB) does not fit next to "
                       f"sampling ({inference / 2**20:.0f} MiB) in the {free / 2**20:.0f} MiB free on {device}")

    def in_place_fits(self, base_model, device: torch.device, noise_shape: Sequence[int]) -> tuple[bool, str]:
        """Whether an in-place swap (``InPlaceSwapper``) fits: on the device only the LoRA factors next to sampling,
        in host memory the originals of the LoRA'd layers; and why not."""
        factors = self.low_rank_terms().device_bytes()
        inference = self._inference_bytes(base_model, noise_shape)
        free = self.free_memory(device)
        if factors + inference > free:
            return False, (f"the LoRA factors ({factors / 2**20:.0f} MiB) do not fit next to sampling in the "
                           f"{free / 2**20:.0f} MiB free on {device}")
        backup = backup_bytes(base_model, self.options)
        host = self.free_memory(torch.device("cpu"))
        if backup > host:
            return False, (f"the originals of the LoRA'd layers ({backup / 2**20:.0f} MiB) do not fit in the "
                           f"{host / 2**20:.0f} MiB of free host memory")
        return True, ""

    @staticmethod
    def _inference_bytes(base_model, noise_shape: Sequence[int]) -> int:
        shape = [noise_shape[0] * 2] + list(noise_shape[1:])
        return base_model.memory_required(shape)

    # -- lifetime of one sampling run ------------------------------------------------------------
    def sampler_sample(self, executor, *args, **kwargs):
        guider, sigmas, extra_args, callback, noise = args[:5]
        latent_image = args[5] if len(args) > 5 else kwargs.get("latent_image")
        base_model = guider.inner_model
        run = RunState(tracker=StepTracker.probed_from(sigmas, probe_events(executor.class_obj, guider, sigmas,
                                                                            extra_args, noise, latent_image)))
        if run.tracker.after_step:  # its steps are the real run's callbacks (dpm_adaptive): count them as they come
            args = args[:3] + (_counting_callback(run.tracker, callback),) + args[4:]
        strategy = self.strategy_for_run(guider, base_model, noise.device, tuple(noise.shape))
        if strategy == "merged":
            run.swapper = MergedSwapper(base_model, self.options, cached_sets=self.cached_sets,
                                        terms=self.low_rank_terms())
        elif strategy == "merged-lowvram":
            run.swapper = InPlaceSwapper(base_model, self.options, terms=self.low_rank_terms())
        if run.swapper is not None:
            _SWAPPING[id(base_model)] = self.key
        else:
            plans = build_layer_plans(base_model, self.options, lowrank_memo=self._lowrank_memo)
            self._hook_upload = lowrank_upload(plans, kept=self._hook_upload)
            run.hooks = UnmergedAdapters(plans, run.routing, upload=self._hook_upload)
            run.hooks.install(base_model, noise.device)
        self.run = run
        try:
            return executor(*args, **kwargs)
        finally:
            if run.swapper is not None:
                run.swapper.restore()
                _SWAPPING.pop(id(base_model), None)
            if run.hooks is not None:
                run.hooks.remove()
            for record, value in ((self.strategies, strategy), (self.history, run.steps_seen),
                                  (self.forwards, run.forwards)):
                record.append(value)
                del record[:-RUNS_KEPT]  # ComfyUI may cache this node's output for a whole session: stay bounded
            self.run = None

    def activate(self, option) -> None:
        """Make ``option`` act on every row of the following network evaluations (inside a run)."""
        run = self.run
        if run is None:
            raise RuntimeError("the LoRA runtime is only active while its model samples")
        run.active_option = option
        if run.swapper is not None:
            run.swapper.activate(option)
        else:
            run.routing.set(self._routing_row(option).unsqueeze(0))

    def route_by_cond(self, routes: "Sequence[tuple[object, int]] | None") -> None:
        """Route the rows of the following network evaluations by the cond they belong to (unmerged runs).

        ``routes[i] = (option, index)``: the rows of the i-th cond of ``calc_cond_batch``'s list (its index in
        ``transformer_options["cond_or_uncond"]``) get ``option``, and the network sees ``index`` in that list
        instead of i, so attention patches that tell cond (0) from uncond (1) keep working when a guider batches
        several branches' [cond, uncond] pairs in one call. ``None`` ends it.
        """
        run = self.run
        if run is None or run.hooks is None:
            raise RuntimeError("routing by cond needs an unmerged run of this runtime in progress")
        run.cond_routes = None if routes is None else list(routes)

    def _routing_row(self, option) -> torch.Tensor:
        row = torch.zeros(len(self.options))
        if isinstance(option, int):
            row[option] = 1.0
        elif option is not None:
            row[:] = torch.tensor(option, dtype=torch.float32)
        return row

    # -- per model call --------------------------------------------------------------------------
    def predict_noise(self, executor, x, timestep, model_options=None, seed=None, *args, **kwargs):
        run = self.run
        if run is not None:
            run.step = run.tracker.step_for_call(timestep)
            run.steps_seen.append(run.step)
            run.stateful_cfg = cfg_reads_network_state(model_options or {})
            run.model_patches = (model_options or {}).get("transformer_options", {}).get("patches")
            if self.select is not None:
                self.activate(self.select(run.step))
        return executor(x, timestep, model_options, seed, *args, **kwargs)

    def apply_model(self, executor, *args, **kwargs):
        run = self.run
        if run is None:
            return executor(*args, **kwargs)
        if run.cond_routes is not None:
            return self._routed_by_cond(run, executor, args, kwargs)
        if self.mixture is None:  # a guider's branch evaluated alone (it activated the option itself)
            run.forwards += 1
            args, kwargs = batching.with_option_uuids(args, kwargs, run.active_option)
            return executor(*args, **kwargs)
        components = list(self.mixture(run.step))
        # One evaluation per component where batching cannot be exact: merged weights, a CFG step that reads the
        # network's state, or patches the conds brought (GLIGEN's is made for this call's batch size).
        if run.swapper is not None or len(components) == 1 or run.stateful_cfg or batching.cond_patches(
                batching.transformer_options_of(args, kwargs), run.model_patches):
            return self._sequential(run, components, executor, args, kwargs)
        return self._batched(run, components, executor, args, kwargs)

    def _sequential(self, run, components, executor, args, kwargs):
        """One network evaluation per component, weights swapped (merged) or rows routed (unmerged) in between.

        Every other call visits the components backwards, so the weights active at the end of one call serve the
        first evaluation of the next: k − 1 swaps per call instead of k. The terms are summed in the components'
        order either way, so the result does not depend on the visiting order.
        """
        order = range(len(components))
        if run.reverse and not run.stateful_cfg:  # in set order when the CFG step reads the network's state
            order = reversed(order)
        run.reverse = not run.reverse
        outs = [None] * len(components)
        for i in order:
            self.activate(components[i][1])
            call_args, call_kwargs = batching.with_fresh_control(args, kwargs)  # the UNet pops ControlNet's lists
            call_args, call_kwargs = batching.with_option_uuids(call_args, call_kwargs, components[i][1])
            outs[i] = executor(*call_args, **call_kwargs)
            run.forwards += 1
        acc = None
        for (coefficient, _), out in zip(components, outs):
            term = out if coefficient == 1.0 else out * coefficient
            acc = term if acc is None else acc + term
        return acc

    def _routed_by_cond(self, run, executor, args, kwargs):
        """One network evaluation whose rows carry the options of their conds (see ``route_by_cond``)."""
        args, kwargs, options = batching.transformer_options_copy(args, kwargs)
        indices = options.get("cond_or_uncond") if options is not None else None
        x = args[0]
        if not indices or x.shape[0] % len(indices):
            raise RuntimeError("the LoRA runtime cannot tell which rows belong to which cond in this model call "
                               f"(cond_or_uncond = {indices!r}, {x.shape[0]} rows)")
        routes = run.cond_routes
        per_cond = x.shape[0] // len(indices)
        rows = torch.stack([self._routing_row(routes[i][0]) for i in indices]).repeat_interleave(per_cond, dim=0)
        run.routing.set(rows)
        options["cond_or_uncond"] = [routes[i][1] for i in indices]
        uuids = options.get("uuids")
        if isinstance(uuids, list) and len(uuids) == len(indices):  # each branch's rows: their own uuids
            options["uuids"] = [batching.option_uuids([u], routes[i][0])[0] for u, i in zip(uuids, indices)]
        run.forwards += 1
        return executor(*args, **kwargs)

    def components_per_forward(self, base_model, x: torch.Tensor, count: int) -> int:
        """How many components fit in one forward, by ComfyUI's own memory estimate."""
        need = base_model.memory_required(list(x.shape)) * 1.5
        free = self.free_memory(x.device)
        if need > free:
            raise MemoryError(
                f"even one LoRA's batch ({x.shape[0]} rows of {tuple(x.shape[1:])}) needs about "
                f"{need / 2**20:.0f} MiB but {free / 2**20:.0f} MiB are free; lower the resolution or batch size.")
        return max(1, min(count, int(free // need)))

    def _batched(self, run, components, executor, args, kwargs):
        x = args[0]
        base_model = executor.class_obj
        per_forward = self.components_per_forward(base_model, x, len(components))
        acc = None
        for start in range(0, len(components), per_forward):
            chunk = components[start:start + per_forward]
            rows = torch.stack([self._routing_row(option) for _, option in chunk]).repeat_interleave(x.shape[0], dim=0)
            run.routing.set(rows)
            big_args, big_kwargs = batching.expand_call(args, kwargs, [option for _, option in chunk])
            out = batching.fold(executor(*big_args, **big_kwargs), [c for c, _ in chunk])
            run.forwards += 1
            acc = out if acc is None else acc + out
        return acc
