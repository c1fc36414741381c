// LoRA Composer web extension: Switch timeline, LoRA info panels, evaluations-per-step badges.
// Plain ES module; imports only ComfyUI's stable shims (scripts/app.js, scripts/api.js). Everything is drawn
// on the node's canvas (onDrawForeground), so no widget is added and saved workflows are unchanged.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import {
  evaluationsPerStep, findSampler, loraSetEntries, segments, switchTimeline,
} from "./lora_composer_logic.js";

const PALETTE = ["#e6a23c", "#409eff", "#67c23a", "#f56c6c", "#b37feb", "#36cfc9", "#ff85c0", "#a0d911"];
const PANEL_PAD = 6;
const LINE = 14;
const TIMELINE_STEPS_PROPERTY = "timeline steps (no sampler connected)";

// --- the graph adapter the pure logic walks (see lora_composer_logic.js) ------------------------------------

function linkOf(graph, id) {
  const links = graph.links;
  if (!links) return null;
  const l = typeof links.get === "function" ? links.get(id) : links[id];
  if (!l) return null;
  if (Array.isArray(l)) return { origin_id: l[1], origin_slot: l[2], target_id: l[3], target_slot: l[4] };
  return l;
}

function adapt(node) {
  if (!node) return null;
  const widgets = {};
  for (const w of node.widgets || []) widgets[w.name] = w.value;
  return { id: node.id, type: node.type, widgets, inputs: node.inputs || [], outputs: node.outputs || [] };
}

function graphAdapter(node) {
  const graph = node.graph || app.graph;
  return { node: (id) => adapt(graph.getNodeById(id)), link: (id) => linkOf(graph, id) };
}

function widgetValue(node, name, fallback = null) {
  const w = (node.widgets || []).find((x) => x.name === name);
  return w ? w.value : fallback;
}

// --- drawing helpers ---------------------------------------------------------------------------------------

/** y where our panel starts: below the widgets (LiteGraph's natural size), in node coordinates. */
function panelTop(node) {
  const natural = node.computeSize ? node.computeSize()[1] : node.size[1];
  return Math.max(0, natural - 4);
}

function ensureHeight(node, top, height) {
  const needed = top + height + PANEL_PAD;
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
}

function fitText(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let s = text;
  while (s.length > 1 && ctx.measureText(s + "…").width > width) s = s.slice(0, -1);
  return s + "…";
}

function drawLines(ctx, node, top, lines) {
  const width = node.size[0] - 2 * PANEL_PAD;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  lines.forEach((line, i) => {
    const { text, color } = typeof line === "string" ? { text: line, color: "#bbb" } : line;
    ctx.fillStyle = color || "#bbb";
    ctx.fillText(fitText(ctx, text, width), PANEL_PAD, top + i * LINE);
  });
  ctx.restore();
  return lines.length * LINE;
}

// --- LoRA Switch timeline -----------------------------------------------------------------------------------

/** What the timeline shows for `node` now: {steps, source, k, names, every, schedule, indices} (indices may be []). */
export function timelineModel(node) {
  const g = graphAdapter(node);
  const self = g.node(node.id);
  const set = loraSetEntries(g, self);
  const sampler = findSampler(g, self);
  const fallback = Number(node.properties?.[TIMELINE_STEPS_PROPERTY] ?? 0);
  const steps = sampler ? sampler.steps : fallback;
  const source = sampler ? sampler.source : fallback > 0 ? "node property" : null;
  const every = Number(widgetValue(node, "switch_every", 0));
  const schedule = String(widgetValue(node, "schedule", "paper"));
  const k = set.exact ? set.names.length : 0;
  const indices = switchTimeline(steps, k, every, schedule);
  return { steps, source, k, names: set.names, exact: set.exact, every, schedule, indices };
}

function drawTimeline(node, ctx) {
  const model = timelineModel(node);
  const top = panelTop(node);
  const state = (node.loraComposer = node.loraComposer || {});
  state.timeline = model;
  if (!model.indices.length) {
    state.lastDrawn = null;
    const why = !model.source ? "connect a sampler to see which LoRA runs at each step"
      : model.k < 1 ? (model.exact ? "connect a LoRA set" : "LoRA count unknown (stack or foreign node)")
        : "nothing to draw (steps or τ < 1)";
    ensureHeight(node, top, LINE + PANEL_PAD);
    drawLines(ctx, node, top + PANEL_PAD, [{ text: why, color: "#888" }]);
    return;
  }
  const x0 = PANEL_PAD;
  const width = node.size[0] - 2 * PANEL_PAD;
  const barY = top + PANEL_PAD + LINE + 2;
  const barH = 16;
  const legendRows = Math.min(model.k, 6);
  ensureHeight(node, top, LINE + 2 + barH + 14 + legendRows * LINE + PANEL_PAD);
  drawLines(ctx, node, top + PANEL_PAD, [
    `${model.steps} steps (${model.source}) · τ ${model.every} · ${model.schedule}`,
  ]);
  const n = model.indices.length;
  const cell = width / n;
  ctx.save();
  for (const run of segments(model.indices)) {
    ctx.fillStyle = PALETTE[run.lora % PALETTE.length];
    ctx.fillRect(x0 + run.start * cell, barY, Math.max(1, (run.end - run.start) * cell - (cell > 4 ? 1 : 0)), barH);
  }
  ctx.strokeStyle = "#222";
  ctx.strokeRect(x0, barY, width, barH);
  ctx.fillStyle = "#999";
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillText("0", x0, barY + barH + 2);
  const last = String(n - 1);
  ctx.fillText(last, x0 + width - ctx.measureText(last).width, barY + barH + 2);
  ctx.restore();
  const legend = model.names.slice(0, legendRows).map((name, i) => ({
    text: `■ ${i + 1}: ${name} (${model.indices.filter((v) => v === i).length} steps)`,
    color: PALETTE[i % PALETTE.length],
  }));
  drawLines(ctx, node, barY + barH + 14, legend);
  state.lastDrawn = {
    steps: n, indices: model.indices.slice(), every: model.every, schedule: model.schedule, bar: [x0, barY, width, barH],
  };
}

// --- LoRA info panels (metadata route) ----------------------------------------------------------------------

// lora name -> {status: "loading"|"ok"|"error", info?, error?, at?}. Cleared by ComfyUI's "Refresh" (files may have
// been added or replaced); an error is asked again after ERROR_RETRY_MS (the file may appear, the server restart).
const infoCache = new Map();
const ERROR_RETRY_MS = 10000;

function requestInfo(name, node) {
  if (!name) return undefined;
  const cached = infoCache.get(name);
  if (cached && !(cached.status === "error" && Date.now() - cached.at > ERROR_RETRY_MS)) return cached;
  const entry = { status: "loading" };
  infoCache.set(name, entry);
  const failed = (error) => Object.assign(entry, { status: "error", error, at: Date.now() });
  api.fetchApi(`/lora_composer/lora_info?name=${encodeURIComponent(name)}`)
    .then(async (response) => {
      const body = await response.json().catch(() => null);  // null: not JSON (e.g. a proxy's error page)
      if (response.ok && body) Object.assign(entry, { status: "ok", info: body });
      else failed(body?.error || `HTTP ${response.status}${body ? "" : " (not a JSON answer)"}`);
    })
    .catch((e) => failed(String(e)))
    .finally(() => node.setDirtyCanvas?.(true, true));
  return entry;
}

function describeInfo(info) {
  const types = Object.entries(info.network_types || {}).map(([t, n]) => (n > 1 ? `${t}×${n}` : t)).join(", ");
  const span = (v) => (!v || !v.length ? "n/a" : v[0] === v[v.length - 1] ? `${v[0]}` : `${v[0]}–${v[v.length - 1]}`);
  return [
    `${types || "unknown"} · rank ${span(info.ranks)} · alpha ${span(info.alphas)} · ${info.modules} modules`,
    `base model: ${info.base_model}`,
    `trigger words: ${(info.trigger_words || []).join(", ") || "none found"}`,
  ];
}

function infoLines(name, node) {
  const entry = requestInfo(name, node);
  if (!entry) return [];
  if (entry.status === "loading") return [{ text: `${name}: reading…`, color: "#888" }];
  if (entry.status === "error") return [{ text: `${name}: ${entry.error}`, color: "#f56c6c" }];
  return describeInfo(entry.info);
}

function drawLoadInfo(node, ctx) {
  const name = widgetValue(node, "lora_name");
  const lines = name ? infoLines(String(name), node) : [];
  const top = panelTop(node);
  (node.loraComposer = node.loraComposer || {}).info = { name, lines: lines.map((l) => (l.text ?? l)) };
  if (!lines.length) return;
  ensureHeight(node, top, lines.length * LINE + PANEL_PAD);
  drawLines(ctx, node, top + PANEL_PAD, lines);
}

function drawSetInfo(node, ctx) {
  const g = graphAdapter(node);
  const set = loraSetEntries(g, g.node(node.id));
  const lines = [];
  for (const name of set.names) {
    if (name === "merged" || name === "generated") {
      lines.push({ text: `${name} LoRA (in memory): run the graph for its details`, color: "#888" });
      continue;
    }
    const [first, ...rest] = infoLines(name, node);
    if (first === undefined) {  // an entry without a file name (an empty widget): say so, keep drawing the rest
      lines.push({ text: "(a LoRA entry without a file name)", color: "#888" });
      continue;
    }
    const head = typeof first === "string" ? `${name}: ${first}` : first;
    lines.push({ text: head.text ?? head, color: head.color || "#ddd" }, ...rest.map((t) => (typeof t === "string" ? `   ${t}` : t)));
  }
  if (!set.exact) lines.push({ text: "(more LoRAs arrive through a stack/foreign node)", color: "#888" });
  const executed = node.loraComposer?.executedText;
  if (executed) lines.push({ text: "last run:", color: "#999" }, ...executed.split("\n").slice(0, 12));
  const top = panelTop(node);
  (node.loraComposer = node.loraComposer || {}).info = { names: set.names, lines: lines.map((l) => (l.text ?? l)) };
  if (!lines.length) return;
  ensureHeight(node, top, lines.length * LINE + PANEL_PAD);
  drawLines(ctx, node, top + PANEL_PAD, lines);
}

// --- evaluations-per-step badge -----------------------------------------------------------------------------

export function evaluationsModel(node) {
  const g = graphAdapter(node);
  const self = g.node(node.id);
  const set = loraSetEntries(g, self);
  const sampler = findSampler(g, self);
  return evaluationsPerStep({
    kind: node.type,
    loraCount: set.exact ? set.names.length : 0,
    entryWeights: widgetValue(node, "entry_weights", ""),
    gamma: widgetValue(node, "gamma", 0.5),
    gammaEnd: widgetValue(node, "gamma_end", 0.5),
    gammaSchedule: widgetValue(node, "gamma_schedule", "constant"),
    cfgBase: Number(widgetValue(node, "cfg_base", 7)),
    cfgLora: Number(widgetValue(node, "cfg_lora", 7)),
    mix: widgetValue(node, "mix", "cfg-then-blend"),
    cfg: sampler && Number.isFinite(sampler.cfg) ? sampler.cfg : null,
    sampler: sampler ? sampler.sampler : null,
    steps: sampler ? sampler.steps : null,
  });
}

function drawBadge(node, ctx) {
  const result = evaluationsModel(node);
  (node.loraComposer = node.loraComposer || {}).evaluations = result;
  const text = result.error ? result.error : result.text;
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  const w = Math.min(node.size[0] - 8, ctx.measureText(text).width + 12);
  const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const x = node.size[0] - w - 4;
  const y = -titleH - 20;
  ctx.fillStyle = result.error ? "#5a2a2a" : "#2a4a6a";
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(x, y, w, 16, 8); else ctx.rect(x, y, w, 16);
  ctx.fill();
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(fitText(ctx, text, w - 12), x + 6, y + 8);
  ctx.restore();
}

// --- registration -------------------------------------------------------------------------------------------

function chainDraw(nodeType, draw) {
  const original = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
    const r = original?.apply(this, [ctx, ...rest]);
    if (this.flags?.collapsed) return r;
    try {
      draw(this, ctx);
    } catch (e) {
      // A drawing bug must never break the canvas; say it once per node.
      if (!this.__loraComposerWarned) console.warn("[LoRA Composer] panel not drawn:", e);
      this.__loraComposerWarned = true;
    }
    return r;
  };
}

app.registerExtension({
  name: "LoRAComposer.panels",
  refreshComboInNodes() {
    infoCache.clear(); // "Refresh" re-reads the LoRA folders: re-read the files' headers too
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    switch (nodeData?.name) {
      case "LoraSetSwitch": {
        const created = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
          const r = created?.apply(this, arguments);
          this.properties = this.properties || {};
          if (!(TIMELINE_STEPS_PROPERTY in this.properties)) this.properties[TIMELINE_STEPS_PROPERTY] = 0;
          return r;
        };
        chainDraw(nodeType, drawTimeline);
        break;
      }
      case "LoraSetLoad":
        chainDraw(nodeType, drawLoadInfo);
        break;
      case "LoraSetInfo": {
        const executed = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
          const r = executed?.apply(this, arguments);
          if (message?.text?.length) (this.loraComposer = this.loraComposer || {}).executedText = String(message.text[0]);
          this.setDirtyCanvas?.(true, true);
          return r;
        };
        chainDraw(nodeType, drawSetInfo);
        break;
      }
      case "LoraSetComposite":
      case "AutoLoraGuidance":
      case "AutoLoraGuider":
        chainDraw(nodeType, drawBadge);
        break;
      default:
    }
  },
});
