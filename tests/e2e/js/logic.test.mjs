// Unit tests of web/js/lora_composer_logic.js with node's own runner: `node --test tests/e2e/js/`.
// No npm package is needed. tests/e2e/test_web_logic.py runs this file and cross-checks switchTimeline
// against the Python schedule (nodes/runtime/schedules.py).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  evaluationsPerStep, findSampler, gammaAt, loraSetEntries, parseEntryWeights, segments, switchIndex, switchTimeline,
} from "../../../web/js/lora_composer_logic.js";

test("paper schedule: floor(step / tau) mod k", () => {
  assert.deepEqual(switchTimeline(12, 3, 2, "paper"), [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2]);
});

test("reference-code schedule: the first LoRA runs tau + 1 steps", () => {
  assert.deepEqual(switchTimeline(12, 3, 5, "reference-code"), [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2]);
  assert.deepEqual(segments(switchTimeline(16, 3, 5, "reference-code")).map((s) => s.end - s.start), [6, 5, 5]);
});

test("nothing to draw: tau 0, no steps, no LoRAs, unknown schedule, garbage", () => {
  for (const args of [[30, 3, 0], [0, 3, 5], [30, 0, 5], [NaN, 3, 5], [30, 3, undefined], [null, 3, 5], [-4, 3, 5]]) {
    assert.deepEqual(switchTimeline(...args, "paper"), [], String(args));
  }
  assert.deepEqual(switchTimeline(10, 2, 5, "zigzag"), []);
});

test("switchIndex rejects what the Python function rejects", () => {
  assert.throws(() => switchIndex(0, 0, 5), /empty/);
  assert.throws(() => switchIndex(0, 2, 0), /switch_every/);
  assert.throws(() => switchIndex(0, 2, 5, "zigzag"), /schedule/);
});

test("entry weights: uniform, normalised, errors", () => {
  assert.deepEqual(parseEntryWeights("", 4).weights, [0.25, 0.25, 0.25, 0.25]);
  assert.deepEqual(parseEntryWeights("1, 1, 2", 3).weights, [0.25, 0.25, 0.5]);
  assert.match(parseEntryWeights("1, 2", 3).error, /2 numbers/);
  assert.match(parseEntryWeights("0 0", 2).error, /not all 0/);
  assert.match(parseEntryWeights("a", 1).error, /not a number/);
  assert.deepEqual(parseEntryWeights("1e308, 1e308", 2).weights, [0.5, 0.5]);  // the sum overflows: ratios count
});

test("evaluations per step: Composite k × (cond + uncond), zero weights skipped, cfg 1, heun", () => {
  assert.equal(evaluationsPerStep({ kind: "LoraSetComposite", loraCount: 3, cfg: 7 }).perStep, 6);
  assert.equal(evaluationsPerStep({ kind: "LoraSetComposite", loraCount: 3, entryWeights: "1 0 1", cfg: 7 }).perStep, 4);
  assert.equal(evaluationsPerStep({ kind: "LoraSetComposite", loraCount: 3, cfg: 1 }).perStep, 3);
  const heun = evaluationsPerStep({ kind: "LoraSetComposite", loraCount: 2, cfg: 5, sampler: "heun" });
  assert.equal(heun.perStep, 8);
  assert.equal(heun.plain, 4);
  assert.match(evaluationsPerStep({ kind: "LoraSetComposite", loraCount: 0 }).error, /LoRA set/);
});

test("evaluations per step: AutoLoRA model form and guider", () => {
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuidance", gamma: 0.6, cfg: 7 }).perStep, 4);
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuidance", gamma: 1, cfg: 7 }).perStep, 2);
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuidance", gamma: 0, cfg: 1 }).perStep, 1);
  assert.match(evaluationsPerStep({ kind: "AutoLoraGuidance", gamma: NaN }).error, /finite/);
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuider", gamma: 0.5, cfgBase: 7, cfgLora: 7 }).perStep, 4);
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuider", gamma: 0.5, cfgBase: 1, cfgLora: 7 }).perStep, 3);
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuider", gamma: 1, gammaSchedule: "constant", cfgLora: 7 }).perStep, 2);
  assert.equal(evaluationsPerStep({ kind: "AutoLoraGuider", gamma: 0, gammaEnd: 1, gammaSchedule: "linear",
    cfgBase: 1, cfgLora: 1, mix: "blend-then-cfg" }).perStep, 4);
});

// A tiny graph in the adapter's shape: ckpt -> Switch <- Load(b) <- Load(a); Switch -> ModelSampling -> KSampler.
function makeGraph(nodes, links) {
  const byId = new Map(nodes.map((n) => [n.id, n]));
  const linkById = new Map(links.map(([id, o, os, t, ts]) => [id, { origin_id: o, origin_slot: os, target_id: t, target_slot: ts }]));
  return { node: (id) => byId.get(id), link: (id) => linkById.get(id) };
}

const NODES = [
  { id: 1, type: "LoraSetLoad", widgets: { lora_name: "a.safetensors" }, inputs: [{ name: "lora_set", link: null }], outputs: [{ type: "LORA_SET", links: [1] }] },
  { id: 2, type: "LoraSetLoad", widgets: { lora_name: "b.safetensors" }, inputs: [{ name: "lora_set", link: 1 }], outputs: [{ type: "LORA_SET", links: [2] }] },
  { id: 3, type: "LoraSetSwitch", widgets: { switch_every: 5 }, inputs: [{ name: "model", link: null }, { name: "lora_set", link: 2 }], outputs: [{ type: "MODEL", links: [3] }] },
  { id: 4, type: "ModelSamplingDiscrete", widgets: {}, inputs: [{ name: "model", link: 3 }], outputs: [{ type: "MODEL", links: [4] }] },
  { id: 5, type: "KSamplerAdvanced", widgets: { steps: 30, start_at_step: 4, end_at_step: 10000, cfg: 6, sampler_name: "heun" }, inputs: [{ name: "model", link: 4 }], outputs: [{ type: "LATENT", links: [] }] },
];
const LINKS = [[1, 1, 0, 2, 0], [2, 2, 0, 3, 1], [3, 3, 0, 4, 0], [4, 4, 0, 5, 0]];

test("graph: LoRA names in set order, and the sampler reached through a model patch", () => {
  const g = makeGraph(NODES, LINKS);
  assert.deepEqual(loraSetEntries(g, g.node(3)), { names: ["a.safetensors", "b.safetensors"], exact: true });
  assert.deepEqual(findSampler(g, g.node(3)), { steps: 26, source: "KSamplerAdvanced #5", sampler: "heun", cfg: 6 });
});

test("graph: no sampler connected -> null; a stack in the chain makes the count inexact", () => {
  const g = makeGraph(NODES.slice(0, 3).map((n) => (n.id === 3 ? { ...n, outputs: [{ type: "MODEL", links: [] }] } : n)), LINKS.slice(0, 2));
  assert.equal(findSampler(g, g.node(3)), null);
  const stack = { id: 9, type: "LoraSetFromStack", widgets: {}, inputs: [{ name: "lora_set", link: null }], outputs: [{ type: "LORA_SET", links: [1] }] };
  const g2 = makeGraph([stack, ...NODES.slice(1)], [[1, 9, 0, 2, 0], ...LINKS.slice(1)]);
  assert.deepEqual(loraSetEntries(g2, g2.node(3)), { names: ["b.safetensors"], exact: false });
});

test("graph: SamplerCustomAdvanced through a guider reads steps from BasicScheduler", () => {
  const nodes = [
    { id: 1, type: "LoraSetSwitch", widgets: {}, inputs: [], outputs: [{ type: "MODEL", links: [1] }] },
    { id: 2, type: "CFGGuider", widgets: { cfg: 4.5 }, inputs: [{ name: "model", link: 1 }], outputs: [{ type: "GUIDER", links: [2] }] },
    { id: 3, type: "SamplerCustomAdvanced", widgets: {}, inputs: [{ name: "guider", link: 2 }, { name: "sampler", link: 3 }, { name: "sigmas", link: 4 }], outputs: [] },
    { id: 4, type: "KSamplerSelect", widgets: { sampler_name: "dpmpp_2m" }, inputs: [], outputs: [{ type: "SAMPLER", links: [3] }] },
    { id: 5, type: "BasicScheduler", widgets: { steps: 18 }, inputs: [], outputs: [{ type: "SIGMAS", links: [4] }] },
  ];
  const g = makeGraph(nodes, [[1, 1, 0, 2, 0], [2, 2, 0, 3, 0], [3, 4, 0, 3, 1], [4, 5, 0, 3, 2]]);
  assert.deepEqual(findSampler(g, g.node(1)), { steps: 18, source: "BasicScheduler #5", sampler: "dpmpp_2m", cfg: 4.5 });
});

test("guider with a γ schedule: exact average when steps are known, an upper bound otherwise", () => {
  const s = { kind: "AutoLoraGuider", gamma: 0, gammaEnd: 1, gammaSchedule: "linear", cfgBase: 7, cfgLora: 7 };
  assert.equal(evaluationsPerStep({ ...s, steps: 3 }).perStep, 8 / 3);
  const unknown = evaluationsPerStep(s);
  assert.equal(unknown.perStep, 4);
  assert.ok(unknown.upperBound && unknown.text.startsWith("≤ 4"));
  assert.equal(gammaAt(2, 3, 0.25, 0.75, "cosine"), 0.75);
});
