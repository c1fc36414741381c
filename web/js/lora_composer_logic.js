// Pure logic of the LoRA Composer web extension: no DOM, no ComfyUI import, so it runs under
// `node --test` (tests/e2e/js/) and is cross-checked against the Python engine (tests/e2e/test_web_logic.py).
//
// Graph walking works on a small adapter, not on LiteGraph itself:
//   g.node(id)  -> {id, type, widgets: {name: value}, inputs: [{name, type, link}], outputs: [{name, type, links}]}
//   g.link(id)  -> {origin_id, origin_slot, target_id, target_slot}
// lora_composer.js builds that adapter over app.graph.

export const SWITCH_SCHEDULES = ["paper", "reference-code"];

/**
 * Index of the active LoRA at sampler step `step` (0-based); nodes/runtime/schedules.py:switch_index.
 *   paper:          floor(step / tau) mod k
 *   reference-code: max(0, ceil(step / tau) - 1) mod k   (the official code: first LoRA gets tau + 1 steps)
 * Throws on what the Python function rejects (k < 1, tau < 1, unknown schedule).
 */
export function switchIndex(step, count, every, schedule = "paper") {
  if (!(count >= 1)) throw new Error("lora_set is empty: Switch needs at least one LoRA.");
  if (!(every >= 1)) throw new Error(`switch_every must be >= 1, got ${every}.`);
  if (schedule === "paper") return Math.floor(step / every) % count;
  if (schedule === "reference-code") return Math.max(0, Math.ceil(step / every) - 1) % count;
  throw new Error(`schedule must be one of ${SWITCH_SCHEDULES.join(", ")}, got ${schedule}.`);
}

/** Active LoRA per step for `steps` sampler steps; [] whenever there is nothing to draw (never throws). */
export function switchTimeline(steps, count, every, schedule = "paper") {
  const n = Math.floor(Number(steps));
  const k = Math.floor(Number(count));
  const tau = Math.floor(Number(every));
  if (!Number.isFinite(n) || !Number.isFinite(k) || !Number.isFinite(tau)) return [];
  if (n < 1 || k < 1 || tau < 1 || !SWITCH_SCHEDULES.includes(schedule)) return [];
  const out = new Array(n);
  for (let i = 0; i < n; i++) out[i] = switchIndex(i, k, tau, schedule);
  return out;
}

/** Runs of equal values: [{lora, start, end}] with `end` exclusive. */
export function segments(indices) {
  const runs = [];
  indices.forEach((lora, i) => {
    const last = runs[runs.length - 1];
    if (last && last.lora === lora) last.end = i + 1;
    else runs.push({ lora, start: i, end: i + 1 });
  });
  return runs;
}

// Model calls per sampler step for ComfyUI's multi-evaluation samplers (comfy/k_diffusion/sampling.py);
// every other sampler makes one. A step's extra calls stay on the same LoRA in Switch.
const CALLS_PER_STEP = {
  heun: 2, heunpp2: 3, dpm_2: 2, dpm_2_ancestral: 2, dpmpp_2s_ancestral: 2, dpmpp_2s_ancestral_cfg_pp: 2,
  dpmpp_sde: 2, dpmpp_sde_gpu: 2, seeds_2: 2, seeds_3: 3, exp_heun_2_x0: 2, exp_heun_2_x0_sde: 2,
};

export function samplerCallsPerStep(samplerName) {
  return CALLS_PER_STEP[samplerName] ?? 1;
}

/** nodes/composition.py:parse_entry_weights — uniform 1/k for "", else k non-negative numbers summing > 0. */
export function parseEntryWeights(text, count) {
  const s = String(text ?? "").trim();
  if (!s) return { weights: Array(count).fill(1 / count), error: null };
  const values = s.split(/[,\s;]+/).filter(Boolean).map(Number);
  if (values.some((v) => !Number.isFinite(v))) return { weights: null, error: "entry_weights: not a number" };
  if (values.length !== count) {
    return { weights: null, error: `entry_weights has ${values.length} numbers but the set has ${count} LoRAs` };
  }
  let total = values.reduce((a, b) => a + b, 0);
  if (values.some((v) => v < 0) || total <= 0) return { weights: null, error: "entry_weights must be ≥ 0, not all 0" };
  let scaled = values;
  if (!Number.isFinite(total)) {  // finite weights whose sum overflows (1e308, 1e308): only their ratios count
    const peak = Math.max(...values);
    scaled = values.map((v) => v / peak);
    total = scaled.reduce((a, b) => a + b, 0);
  }
  return { weights: scaled.map((v) => v / total), error: null };
}

/**
 * Network evaluations per sampler step that a node's settings imply.
 *   LoraSetComposite:  m LoRAs with non-zero weight, each on cond and uncond  -> m × 2 per model call
 *   AutoLoraGuidance:  base and LoRA branches (one when γ is exactly 0 or 1)  -> 2 × 2 per model call
 *   AutoLoraGuider:    each branch runs CFG with its own scale (1 call with cfg 1); blend-then-cfg always 2
 * cfg = 1 drops the unconditional call (ComfyUI's cfg1 optimisation) for the model-patch forms.
 * Multi-evaluation samplers multiply everything by their calls per step. `plain` is ordinary sampling.
 * Returns {perStep, plain, components, branches, callsPerStep, text} or {error}.
 */
export function evaluationsPerStep(settings) {
  const { kind, loraCount, entryWeights = "", gamma = 0.5, cfg = null, sampler = null } = settings;
  const calls = samplerCallsPerStep(sampler);
  const branchesFor = (scale) => (scale === 1 ? 1 : 2);
  let components;
  let perCall;
  let detail;
  let upperBound = false;
  if (kind === "LoraSetComposite") {
    if (!(loraCount >= 1)) return { error: "connect a LoRA set to count evaluations" };
    const parsed = parseEntryWeights(entryWeights, loraCount);
    if (parsed.error) return { error: parsed.error };
    components = parsed.weights.filter((w) => w !== 0).length;
    perCall = components * branchesFor(cfg);
    detail = `${components} LoRA${components === 1 ? "" : "s"} × ${branchesFor(cfg) === 2 ? "cond+uncond" : "cond (cfg 1)"}`;
  } else if (kind === "AutoLoraGuidance") {
    const g = Number(gamma);
    if (!Number.isFinite(g)) return { error: "gamma must be a finite number" };
    components = g === 0 || g === 1 ? 1 : 2;
    perCall = components * branchesFor(cfg);
    detail = `${components === 2 ? "base + LoRA" : g === 0 ? "base only (γ 0)" : "LoRA only (γ 1)"} × ${
      branchesFor(cfg) === 2 ? "cond+uncond" : "cond (cfg 1)"}`;
  } else if (kind === "AutoLoraGuider") {
    const { cfgBase = 7, cfgLora = 7, mix = "cfg-then-blend", gammaSchedule = "constant", gammaEnd = gamma } = settings;
    const g0 = Number(gamma);
    const g1 = gammaSchedule === "constant" ? g0 : Number(gammaEnd);
    if (!Number.isFinite(g0) || !Number.isFinite(g1)) return { error: "gamma must be a finite number" };
    // γ exactly 0 or 1 evaluates one branch only (nodes/composition.py:autolora_mixture)
    const callsAt = (g) => {
      const parts = g === 0 ? ["base"] : g === 1 ? ["lora"] : ["base", "lora"];
      return parts.reduce((n, p) => n + (mix === "blend-then-cfg" ? 2 : branchesFor(p === "base" ? cfgBase : cfgLora)), 0);
    };
    const steps = Math.floor(Number(settings.steps));
    if (gammaSchedule === "constant") {
      perCall = callsAt(g0);
    } else if (steps >= 1) { // the schedule's γ at every step, averaged
      let total = 0;
      for (let i = 0; i < steps; i++) total += callsAt(gammaAt(i, steps, g0, g1, gammaSchedule));
      perCall = total / steps;
    } else { // steps unknown: the most a step can cost
      perCall = callsAt(0.5);
      upperBound = true;
    }
    components = g0 === g1 && (g0 === 0 || g0 === 1) ? 1 : 2;
    detail = `${components === 1 ? (g0 === 0 ? "base" : "LoRA") + " branch" : "base + LoRA branches"}, CFG on each${
      gammaSchedule === "constant" ? "" : `, γ ${gammaSchedule} ${g0}→${g1}`}`;
  } else {
    return { error: `no evaluation count for ${kind}` };
  }
  const plain = branchesFor(kind === "AutoLoraGuider" ? settings.cfgLora ?? 7 : cfg) * calls;
  const perStep = perCall * calls;
  const samplerNote = calls > 1 ? ` × ${calls} calls/step (${sampler})` : "";
  const fmt = (v) => (Number.isInteger(v) ? String(v) : v.toFixed(2));
  return {
    perStep, plain, components, callsPerStep: calls, upperBound,
    text: `${upperBound ? "≤ " : ""}${fmt(perStep)} evals/step: ${detail}${samplerNote} · ${fmt(perStep / plain)}× plain`,
  };
}

/** nodes/guidance.py:gamma_at — γ at a step: constant, or from γ (first step) to γ_end (last), linear or cosine. */
export function gammaAt(step, totalSteps, gamma, gammaEnd, schedule) {
  if (schedule === "constant") return gamma;
  const p = step / Math.max(1, totalSteps - 1);
  let f;
  if (schedule === "linear") f = p;
  else if (schedule === "cosine") f = (1.0 - Math.cos(Math.PI * p)) / 2.0;
  else throw new Error(`gamma_schedule must be constant, linear or cosine, got ${schedule}.`);
  return gamma + (gammaEnd - gamma) * f;
}

// --- graph walking ---------------------------------------------------------------------------------------

export function inputLink(g, node, name) {
  const input = (node.inputs || []).find((i) => i.name === name);
  if (!input || input.link == null) return null;
  return g.link(input.link) || null;
}

/**
 * The LoRAs that reach `node`'s `lora_set` input, in set order: {names, exact}. `exact` is false when a
 * node on the way adds an unknown number of entries (a LORA_STACK conversion, another pack's node).
 */
export function loraSetEntries(g, node, inputName = "lora_set", depth = 0) {
  const link = inputLink(g, node, inputName);
  if (!link) return { names: [], exact: true };
  const src = g.node(link.origin_id);
  if (!src || depth > 64) return { names: [], exact: false };
  const upstream = (name = "lora_set") => loraSetEntries(g, src, name, depth + 1);
  switch (src.type) {
    case "LoraSetLoad": {
      const prev = upstream();
      return { names: [...prev.names, String(src.widgets.lora_name ?? "?")], exact: prev.exact };
    }
    case "LoraSetBlocks":
      return upstream();
    case "LoraSetMerge":
      return { names: ["merged"], exact: true };
    case "LoraHypernetGenerate":
    case "LoraHypernetGeneratePair": {
      const prev = upstream();
      return { names: [...prev.names, "generated"], exact: prev.exact };
    }
    case "LoraSetFromStack": {
      const prev = upstream();
      return { names: prev.names, exact: false };
    }
    case "Reroute":
      return loraSetEntriesFromInputIndex(g, src, 0, depth + 1);
    default:
      return { names: [], exact: false };
  }
}

function loraSetEntriesFromInputIndex(g, node, index, depth) {
  const input = (node.inputs || [])[index];
  return input ? loraSetEntries(g, node, input.name, depth) : { names: [], exact: false };
}

const STEP_SOURCES = new Set(["BasicScheduler", "KarrasScheduler", "ExponentialScheduler", "PolyexponentialScheduler",
  "SDTurboScheduler", "BetaSamplingScheduler", "LaplaceScheduler", "VPScheduler", "AlignYourStepsScheduler",
  "GITSScheduler", "OptimalStepsScheduler", "LTXVScheduler"]);

function stepsFromSigmas(g, node) {
  const link = inputLink(g, node, "sigmas");
  if (!link) return null;
  const src = g.node(link.origin_id);
  if (src && src.widgets && Number.isFinite(Number(src.widgets.steps)) && STEP_SOURCES.has(src.type)) {
    return { steps: Number(src.widgets.steps), source: `${src.type} #${src.id}`, sampler: null, cfg: null };
  }
  return null;
}

function samplerNameFrom(g, node) {
  if (node.widgets && node.widgets.sampler_name != null) return String(node.widgets.sampler_name);
  const link = inputLink(g, node, "sampler");
  const src = link ? g.node(link.origin_id) : null;
  return src && src.widgets && src.widgets.sampler_name != null ? String(src.widgets.sampler_name) : null;
}

/** What a sampling node reached from `node` says: {steps, source, sampler, cfg} or null. */
export function samplerSettings(g, node) {
  const w = node.widgets || {};
  switch (node.type) {
    case "KSampler":
      return { steps: Number(w.steps), source: `KSampler #${node.id}`, sampler: w.sampler_name ?? null, cfg: Number(w.cfg) };
    case "KSamplerAdvanced": {
      const total = Number(w.steps);
      const run = Math.max(0, Math.min(Number(w.end_at_step), total) - Number(w.start_at_step));
      return { steps: run, source: `KSamplerAdvanced #${node.id}`, sampler: w.sampler_name ?? null, cfg: Number(w.cfg) };
    }
    case "SamplerCustom": {
      const s = stepsFromSigmas(g, node);
      return s && { ...s, sampler: samplerNameFrom(g, node), cfg: Number(w.cfg) };
    }
    case "SamplerCustomAdvanced": {
      const s = stepsFromSigmas(g, node);
      return s && { ...s, sampler: samplerNameFrom(g, node) };
    }
    default:
      if (STEP_SOURCES.has(node.type) && Number.isFinite(Number(w.steps))) {
        return { steps: Number(w.steps), source: `${node.type} #${node.id}`, sampler: null, cfg: null };
      }
      return null;
  }
}

/**
 * Follow the MODEL (and GUIDER) outputs of `node` downstream, through model patches and guiders, to the
 * first sampling node; returns its settings ({steps, source, sampler, cfg}) or null when none is connected.
 */
export function findSampler(g, node) {
  const seen = new Set([node.id]);
  const queue = [node];
  while (queue.length) {
    const current = queue.shift();
    for (const output of current.outputs || []) {
      if (!["MODEL", "GUIDER"].includes(output.type)) continue;
      for (const linkId of output.links || []) {
        const link = g.link(linkId);
        const target = link && g.node(link.target_id);
        if (!target || seen.has(target.id)) continue;
        seen.add(target.id);
        const found = samplerSettings(g, target);
        if (found && Number.isFinite(found.steps)) {
          if (found.cfg == null && current.widgets && current.widgets.cfg != null) found.cfg = Number(current.widgets.cfg);
          return found;
        }
        queue.push(target);
      }
    }
  }
  return null;
}
