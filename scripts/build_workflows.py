#!/usr/bin/env python3
"""Write ``workflows/*.json`` (UI format, ComfyUI's templates menu) from the compact specs below.

Widget order and input/output slots come from the live node definitions (the pack and ComfyUI loaded
in-process, tests/harness/workflows.py), so a workflow can't drift from the nodes it uses; the layout is
automatic (columns by graph depth). tests/e2e checks every file against a real server's ``/object_info``
and runs it. Run ``python scripts/build_workflows.py`` after changing a node's inputs, then commit the JSON.

Files users download name stock loaders and example file names (``v1-5-pruned-emaonly.safetensors``,
``character_lora.safetensors``…): pick your own in the loader nodes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

SD15 = "v1-5-pruned-emaonly.safetensors"
SDXL = "sd_xl_base_1.0.safetensors"
NEGATIVE = "lowres, bad anatomy, bad hands, extra fingers, blurry, jpeg artifacts, watermark, text"
COL_WIDTH, ROW_GAP, X0, Y0 = 400, 36, 40, 40


class Out:
    def __init__(self, node: "Node", slot: int):
        self.node, self.slot = node, slot


class Node:
    def __init__(self, graph: "Graph", node_id: int, type_: str, title: str | None, values: dict):
        self.graph, self.id, self.type, self.title, self.values = graph, node_id, type_, title, values
        self.info = graph.defs[type_] if type_ != "Note" else None

    def __getitem__(self, key) -> Out:
        if isinstance(key, int):
            return Out(self, key)
        names = self.info["output_name"]
        return Out(self, names.index(key))


class Graph:
    def __init__(self, defs_for):
        self.defs_for = defs_for
        self.defs: dict[str, dict] = {}
        self.nodes: list[Node] = []
        self.note_text: str | None = None

    def add(self, type_: str, title: str | None = None, **values) -> Node:
        if type_ not in self.defs:
            info = self.defs_for(type_)
            if info is None:
                raise KeyError(f"node type {type_} is not registered in this ComfyUI")
            self.defs[type_] = info
        node = Node(self, len(self.nodes) + 1, type_, title, values)
        self.nodes.append(node)
        return node

    def note(self, text: str) -> None:
        self.note_text = text.strip()

    # --- serialisation ---------------------------------------------------------------------------------------
    def to_ui(self) -> dict:
        from harness.workflows import input_spec, is_widget, widget_slots

        links, link_id = [], 0
        node_inputs: dict[int, list] = {}
        node_outputs: dict[int, dict[int, list]] = {n.id: {} for n in self.nodes}
        widgets_values: dict[int, list] = {}
        for node in self.nodes:
            info = node.info
            declared = [(s, n) for s in ("required", "optional") for n in info["input_order"].get(s, [])]
            unknown = set(node.values) - {n for _, n in declared}
            if unknown:
                raise KeyError(f"{node.type} has no input(s) {sorted(unknown)}")
            inputs = []
            for section, name in declared:
                kind, options = input_spec(info, name)
                value = node.values.get(name)
                widget = is_widget(kind, options)
                if isinstance(value, Out):
                    link_id += 1
                    out_type = value.node.info["output"][value.slot]
                    links.append([link_id, value.node.id, value.slot, node.id, len(inputs), out_type])
                    node_outputs[value.node.id].setdefault(value.slot, []).append(link_id)
                    slot = {"name": name, "type": "COMBO" if isinstance(kind, list) else kind, "link": link_id}
                    if widget:
                        slot["widget"] = {"name": name}
                    inputs.append(slot)
                elif not widget:
                    if section == "required":
                        raise ValueError(f"{node.type}.{name} (required) is not connected")
                    inputs.append({"name": name, "type": kind, "link": None})
            node_inputs[node.id] = inputs
            values = []
            for name, role in widget_slots(info):
                kind, options = input_spec(info, name)
                if role == "control":
                    values.append("fixed")
                elif role == "upload":
                    values.append("image")
                elif name in node.values and not isinstance(node.values[name], Out):
                    values.append(node.values[name])
                else:
                    values.append(_default(kind, options))
            widgets_values[node.id] = values
        positions, sizes, order = self._layout(node_inputs, widgets_values, links)
        ui_nodes = []
        if self.note_text:
            ui_nodes.append({"id": len(self.nodes) + 1, "type": "Note", "pos": [X0, Y0], "size": [COL_WIDTH - 40, 300],
                             "flags": {}, "order": 0, "mode": 0, "inputs": [], "outputs": [],
                             "title": "About this workflow", "properties": {},
                             "widgets_values": [self.note_text], "color": "#432", "bgcolor": "#653"})
        for node in self.nodes:
            info = node.info
            outputs = []
            for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"])):
                outputs.append({"name": out_name, "type": out_type,
                                "links": node_outputs[node.id].get(slot) or None, "slot_index": slot})
            entry = {"id": node.id, "type": node.type, "pos": positions[node.id], "size": sizes[node.id],
                     "flags": {}, "order": order[node.id] + (1 if self.note_text else 0), "mode": 0,
                     "inputs": node_inputs[node.id], "outputs": outputs,
                     "properties": {"Node name for S&R": node.type}, "widgets_values": widgets_values[node.id]}
            if node.title:
                entry["title"] = node.title
            ui_nodes.append(entry)
        return {"last_node_id": len(ui_nodes), "last_link_id": link_id, "nodes": ui_nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}}, "version": 0.4}

    def _layout(self, node_inputs, widgets_values, links):
        depth = {n.id: 0 for n in self.nodes}
        types = {n.id: n.type for n in self.nodes}
        for _ in self.nodes:  # longest path from a source (graphs are small); a LoRA chain stays in one column
            for _, origin, _, target, _, link_type in links:
                step = 0 if link_type == "LORA_SET" and types[target] in ("LoraSetLoad", "LoraSetBlocks") else 1
                depth[target] = max(depth[target], depth[origin] + step)
        positions, sizes, next_y = {}, {}, {}
        if self.note_text:
            next_y[0] = Y0 + 300 + ROW_GAP
        for node in sorted(self.nodes, key=lambda n: (depth[n.id], n.id)):
            col = depth[node.id]
            multiline = sum(1 for v in widgets_values[node.id] if isinstance(v, str) and len(v) > 40)
            slots = max(len(node_inputs[node.id]), len(node.info["output"]))
            height = 30 + 22 * slots + 26 * len(widgets_values[node.id]) + 60 * multiline
            if node.type in ("LoraSetSwitch", "LoraSetLoad"):
                height += 90  # room for the web extension's panel
            elif node.type == "LoraSetInfo":
                height += 60 + 45 * 3  # three lines per LoRA
            y = next_y.get(col, Y0)
            positions[node.id] = [X0 + col * COL_WIDTH, y]
            sizes[node.id] = [COL_WIDTH - 60, height]
            next_y[col] = y + height + ROW_GAP
        order = {n.id: i for i, n in enumerate(sorted(self.nodes, key=lambda n: (depth[n.id], n.id)))}
        return positions, sizes, order


def _default(kind, options):
    from harness.workflows import combo_options

    if "default" in options:
        return options["default"]
    choices = combo_options(kind, options)
    if choices is not None:
        return choices[0] if choices else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind]


# --- shared pieces ---------------------------------------------------------------------------------------------

def text_encode(g: Graph, clip: Out, positive: str, negative: str = NEGATIVE):
    pos = g.add("CLIPTextEncode", "Positive prompt", clip=clip, text=positive)
    neg = g.add("CLIPTextEncode", "Negative prompt", clip=clip, text=negative)
    return pos, neg


def sample_and_save(g: Graph, model: Out, pos: Node, neg: Node, vae: Out, prefix: str, *, steps=30, cfg=7.0,
                    sampler="dpmpp_2m", scheduler="karras", seed=111, size=(512, 512)) -> Node:
    latent = g.add("EmptyLatentImage", width=size[0], height=size[1], batch_size=1)
    ks = g.add("KSampler", model=model, positive=pos[0], negative=neg[0], latent_image=latent[0], seed=seed,
               steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler, denoise=1.0)
    decode = g.add("VAEDecode", samples=ks[0], vae=vae)
    g.add("SaveImage", images=decode[0], filename_prefix=prefix)
    return ks


def lora_chain(g: Graph, loras: list[tuple[str, float, float]]) -> Node:
    previous = None
    for name, sm, sc in loras:
        extra = {"lora_set": previous[0]} if previous else {}
        previous = g.add("LoraSetLoad", lora_name=name, strength_model=sm, strength_clip=sc, **extra)
    return previous


PAPER_LORAS = [("character_lora.safetensors", 0.8, 0.8), ("clothing_lora.safetensors", 0.8, 0.8),
               ("style_lora.safetensors", 0.8, 0.8)]
PAPER_PROMPT = "masterpiece, best quality, 1girl, red kimono, ukiyo-e style, standing in a garden"
PAPER_NOTE = ("Settings follow Multi-LoRA Composition (Zhong et al. 2024, algorithms.md §1.5): LoRA scale 0.8, "
              "DPM-Solver++ (dpmpp_2m), CFG 7 (realistic; 10 for anime), seed 111, character LoRA first. The "
              "paper ran 100–200 steps; 30 here.")


# --- the workflows ---------------------------------------------------------------------------------------------

def static_apply(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, PAPER_LORAS)
    g.add("LoraSetInfo", lora_set=loras[0], model=ckpt[0], clip=ckpt[1])
    apply = g.add("LoraSetApply", model=ckpt[0], lora_set=loras[0], clip=ckpt[1])
    pos, neg = text_encode(g, apply["clip"], PAPER_PROMPT)
    sample_and_save(g, apply["model"], pos, neg, ckpt[2], "lora_composer/static_apply")
    g.note("Static multi-LoRA apply — the paper's 'LoRA Merge' baseline.\n\nThree LoRAs are chained into one "
           "LoRA set and applied together: W' = W + Σ strength_i·ΔW_i (a sum, not an average), bit for bit what "
           "chaining ComfyUI's own 'Load LoRA' nodes gives. 'LoRA set info' lists each file's type, rank, base "
           "model and trigger words, and how many keys matched the model; the Load nodes show the same from the "
           "file header before you run anything.\n\n" + PAPER_NOTE + "\n\nPick your own checkpoint and LoRA files "
           "in the loader nodes.")


def switch(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, PAPER_LORAS)
    sw = g.add("LoraSetSwitch", model=ckpt[0], lora_set=loras[0], clip=ckpt[1], switch_every=5, schedule="paper")
    pos, neg = text_encode(g, sw["clip"], PAPER_PROMPT)
    sample_and_save(g, sw["model"], pos, neg, ckpt[2], "lora_composer/switch")
    g.note("LoRA Switch (LoRA-S, Zhong et al. 2024) — k = 3 LoRAs, τ = 5.\n\nExactly one LoRA is active at "
           "each denoising step, cycling in set order every τ = switch_every steps: 'paper' = ⌊step/τ⌋ mod k; "
           "'reference-code' = the authors' code, where the first LoRA runs τ+1 steps. The timeline under the "
           "node shows which LoRA runs at each of the connected sampler's steps and follows every change of τ, "
           "schedule, steps or LoRAs.\n\nThe step is the sampler's step (heun & co. keep their extra "
           "evaluations on the same LoRA). Text-encoder parts of all LoRAs are applied together.\n\n" + PAPER_NOTE)


def composite(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, PAPER_LORAS[:1] + PAPER_LORAS[2:])
    comp = g.add("LoraSetComposite", model=ckpt[0], lora_set=loras[0], clip=ckpt[1], entry_weights="")
    pos, neg = text_encode(g, comp["clip"], PAPER_PROMPT)
    sample_and_save(g, comp["model"], pos, neg, ckpt[2], "lora_composer/composite")
    g.note("LoRA Composite (LoRA-C, Zhong et al. 2024) — k = 2 LoRAs.\n\nAt every step each LoRA is evaluated "
           "on its own, on the conditional and the unconditional branch, and the guided scores are averaged: "
           "ε̃ = (1/k) Σ_i [ε_i(∅) + w(ε_i(c) − ε_i(∅))]. The badge above the node counts the network evaluations "
           "per step this implies (k × cond+uncond), so you see the cost before you queue. 'entry_weights' "
           "(e.g. '2, 1') weights LoRAs instead of the paper's uniform 1/k (normalised to sum 1).\n\n" + PAPER_NOTE)


def autolora_model(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, [("style_lora.safetensors", 1.0, 1.0)])
    auto = g.add("AutoLoraGuidance", model=ckpt[0], lora_set=loras[0], gamma=0.5, clip=ckpt[1])
    pos, neg = text_encode(g, auto["clip"], "a photo of a cat sitting on a windowsill, detailed fur")
    sample_and_save(g, auto["model"], pos, neg, ckpt[2], "lora_composer/autolora_model", cfg=7.0)
    g.note("AutoLoRA guidance, model-patch form (Kasymov et al. 2024) — works with the stock KSampler.\n\n"
           "ε = ε_base + γ·(ε_LoRA − ε_base) on each branch, then the sampler's CFG: γ = 0 is the base model, "
           "γ = 1 plain LoRA sampling, in between trades the LoRA's domain for the base model's diversity, "
           "γ > 1 extrapolates away from the base. The badge counts 4 network evaluations per step (base and "
           "LoRA, cond and uncond).\n\nThe paper's γ values and equations could not be verified (algorithms.md "
           "§2): γ = 0.5 and CFG 7 here are a neutral starting point, not the paper's setting. Use the "
           "'AutoLoRA guider' workflow for separate CFG scales and a γ schedule.")


def autolora_guider(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, [("style_lora.safetensors", 1.0, 1.0)])
    pos, neg = text_encode(g, ckpt[1], "a photo of a cat sitting on a windowsill, detailed fur")
    guider = g.add("AutoLoraGuider", model=ckpt[0], lora_set=loras[0], positive=pos[0], negative=neg[0],
                   cfg_base=7.0, cfg_lora=7.0, gamma=0.3, gamma_schedule="linear", gamma_end=0.8,
                   mix="cfg-then-blend")
    noise = g.add("RandomNoise", noise_seed=111)
    sampler = g.add("KSamplerSelect", sampler_name="dpmpp_2m")
    sigmas = g.add("BasicScheduler", model=ckpt[0], scheduler="karras", steps=30, denoise=1.0)
    latent = g.add("EmptyLatentImage", width=512, height=512, batch_size=1)
    out = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                latent_image=latent[0])
    decode = g.add("VAEDecode", samples=out[0], vae=ckpt[2])
    g.add("SaveImage", images=decode[0], filename_prefix="lora_composer/autolora_guider")
    g.note("AutoLoRA guider, separate-CFG form (Kasymov et al. 2024) — a GUIDER for SamplerCustomAdvanced.\n\n"
           "ε̂_base = CFG(base; cfg_base), ε̂_LoRA = CFG(LoRA; cfg_lora), ε = ε̂_base + γ_t(ε̂_LoRA − ε̂_base). "
           "Here γ ramps linearly from 0.3 (first step) to 0.8 (last): diverse composition from the base model "
           "early, the LoRA's look late. 'blend-then-cfg' is the other reading of the paper. The badge counts the "
           "evaluations per step (4: base and LoRA, cond and uncond; 3 when one branch has CFG 1); with "
           "strategy 'auto' they run as one batched network call (rows routed per branch).\n\n"
           "The paper's equations and γ values "
           "could not be verified (algorithms.md §2); these settings are a starting point, equal CFG scales as "
           "the simplest variant.")


def merge_save(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, [("character_lora.safetensors", 0.8, 0.8), ("style_lora.safetensors", 0.8, 0.8)])
    svd = g.add("LoraSetMerge", "Merge (svd, rank 32)", model=ckpt[0], lora_set=loras[0], method="svd", rank=32,
                density=0.5, seed=0, clip=ckpt[1])
    ties = g.add("LoraSetMerge", "Merge (ties, density 0.5)", model=ckpt[0], lora_set=loras[0], method="ties",
                 rank=32, density=0.5, seed=0, clip=ckpt[1])
    g.add("LoraSetSave", lora_set=svd["lora_set"], filename_prefix="lora_composer/merged_svd", dtype="fp16")
    g.add("LoraSetSave", lora_set=ties["lora_set"], filename_prefix="lora_composer/merged_ties", dtype="fp16")
    apply = g.add("LoraSetApply", "Try the svd merge", model=ckpt[0], lora_set=svd["lora_set"], clip=ckpt[1])
    pos, neg = text_encode(g, apply["clip"], PAPER_PROMPT)
    sample_and_save(g, apply["model"], pos, neg, ckpt[2], "lora_composer/merged_svd")
    g.note("Merge + save: two LoRAs merged into one file, two ways.\n\n'svd' re-compresses the exact sum of the "
           "weight deltas to rank 32 per layer (Eckart–Young: the best rank-32 approximation; the report output "
           "gives the relative error). 'ties' (Yadav et al. 2023, PEFT semantics) trims each delta to its top "
           "50 % entries (density 0.5), elects a sign per weight and averages the agreeing entries, then "
           "re-compresses to rank 32. Both are saved as ordinary kohya .safetensors in models/loras/lora_composer/ "
           "— they load with 'Load LoRA (set)' and with ComfyUI's own 'Load LoRA'. The svd merge is also "
           "applied and sampled so you can compare it with the two LoRAs applied statically.")


def b_lora(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SDXL)
    content = g.add("LoraSetLoad", "Content B-LoRA", lora_name="b-lora_content.safetensors", strength_model=1.0,
                    strength_clip=0.0)
    content_blocks = g.add("LoraSetBlocks", "Keep its content block", lora_set=content[0],
                           preset="B-LoRA content (SDXL output_blocks.0.1)", block_weights="", apply_to="last entry")
    style = g.add("LoraSetLoad", "Style B-LoRA", lora_name="b-lora_style.safetensors", strength_model=1.0,
                  strength_clip=0.0, lora_set=content_blocks[0])
    style_blocks = g.add("LoraSetBlocks", "Keep its style block", lora_set=style[0],
                         preset="B-LoRA style (SDXL output_blocks.1.1)", block_weights="", apply_to="last entry")
    apply = g.add("LoraSetApply", model=ckpt[0], lora_set=style_blocks[0])
    pos, neg = text_encode(g, ckpt[1], "A [v30] in [v28] style", "")
    sample_and_save(g, apply["model"], pos, neg, ckpt[2], "lora_composer/b_lora", steps=50, cfg=5.0,
                    sampler="euler", scheduler="normal", seed=0, size=(1024, 1024))
    g.note("B-LoRA (Frenkel et al., ECCV 2024) — content from one image, style from another (SDXL).\n\nEach "
           "B-LoRA was trained jointly on one image; its content lives in output_blocks.0.1 "
           "(up_blocks.0.attentions.0) and its style in output_blocks.1.1 (up_blocks.0.attentions.1). The "
           "block presets keep only the content block of the first file and only the style block of the "
           "second; the two are applied together (model only: B-LoRAs have no text-encoder part). Prompt "
           "'A [v30] in [v28] style' with your training tokens; 1024², 50 steps, CFG 5 as in the authors' "
           "inference script (algorithms.md §6). Author files with the doubled 'unet.unet.' prefix load as "
           "they are.")


def lcm_lora(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    loras = lora_chain(g, [("lcm-lora-sdv1-5.safetensors", 1.0, 1.0), ("style_lora.safetensors", 0.8, 0.8)])
    apply = g.add("LoraSetApply", model=ckpt[0], lora_set=loras[0], clip=ckpt[1])
    lcm = g.add("ModelSamplingDiscrete", model=apply["model"], sampling="lcm", zsnr=False)
    pos, neg = text_encode(g, apply["clip"], "a papercut illustration of a fox in a forest", "")
    sample_and_save(g, lcm[0], pos, neg, ckpt[2], "lora_composer/lcm_lora", steps=6, cfg=1.5, sampler="lcm",
                    scheduler="sgm_uniform", seed=0)
    g.note("LCM-LoRA + a style LoRA in 6 steps (Luo et al. 2023).\n\nThe LCM-LoRA (strength 1.0) turns the "
           "model into a few-step latent consistency model; the style LoRA (0.8) is added to it — the paper's "
           "training-free 'acceleration vector + style vector' sum (algorithms.md §7). 'ModelSamplingDiscrete' "
           "(lcm) gives the LCM boundary conditions, the 'lcm' sampler re-noises between steps; 4–8 steps and "
           "CFG 1–2 as the LCM-LoRA docs recommend (at CFG 1 the negative prompt is skipped).")


def hypernet_generate(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    vision = g.add("CLIPVisionLoader", clip_name="clip_vision_vit_h.safetensors")
    image = g.add("LoadImage", "Subject photo", image="subject.png")
    encoded = g.add("CLIPVisionEncode", clip_vision=vision[0], image=image[0], crop="center")
    hypernet = g.add("LoraHypernetLoad", hypernet_name="hyperdreambooth_sd15.safetensors")
    generated = g.add("LoraHypernetGenerate", hypernet=hypernet["hypernet"], clip_vision_output=encoded[0],
                      strength_model=1.0, strength_clip=1.0, model=ckpt[0], clip=ckpt[1])
    g.add("LoraSetSave", lora_set=generated[0], filename_prefix="lora_composer/hyperdreambooth", dtype="fp16")
    apply = g.add("LoraSetApply", model=ckpt[0], lora_set=generated[0], clip=ckpt[1])
    pos, neg = text_encode(g, apply["clip"], "a portrait photo of a person, oil painting, detailed")
    sample_and_save(g, apply["model"], pos, neg, ckpt[2], "lora_composer/hyperdreambooth", steps=30, cfg=7.0,
                    seed=0)
    g.note("Hypernetwork → LoRA from one image (HyperDreamBooth, Ruiz et al. 2023).\n\nThe hypernetwork reads the "
           "subject photo through a CLIP-vision encoder and predicts a LiDB LoRA (rank-1 factors in a frozen random "
           "basis, down 100 / up 50, on every attention layer; 4 refinement steps from zero — algorithms.md §3) in "
           "one forward pass. The LoRA is applied like any other and also saved as an ordinary kohya file, which "
           "'Load LoRA' loads and 'Train LoRA' (rank-relaxed) can fine-tune further, as the paper does (~40 "
           "steps).\n\nNo pretrained HyperDreamBooth weights exist to download: train your hypernet with 'Train "
           "LoRA hypernet' on pairs of images and LoRAs, using the same CLIP-vision model as here.")


def hypernet_pair(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    vision = g.add("CLIPVisionLoader", clip_name="clip_vision_vit_h.safetensors")
    before = g.add("LoadImage", "Before the edit", image="before.png")
    after = g.add("LoadImage", "After the edit", image="after.png")
    enc_before = g.add("CLIPVisionEncode", clip_vision=vision[0], image=before[0], crop="center")
    enc_after = g.add("CLIPVisionEncode", clip_vision=vision[0], image=after[0], crop="center")
    hypernet = g.add("LoraHypernetLoad", hypernet_name="lora_of_change_sd15.safetensors")
    edit = g.add("LoraHypernetGeneratePair", before=enc_before[0], after=enc_after[0],
                 hypernet=hypernet["hypernet"], strength_model=1.0, strength_clip=1.0, model=ckpt[0], clip=ckpt[1])
    apply = g.add("LoraSetApply", model=ckpt[0], lora_set=edit[0], clip=ckpt[1])
    query = g.add("LoadImage", "Image to edit", image="query.png")
    latent = g.add("VAEEncode", pixels=query[0], vae=ckpt[2])
    pos, neg = text_encode(g, apply["clip"], "a photo")
    ks = g.add("KSampler", model=apply["model"], positive=pos[0], negative=neg[0], latent_image=latent[0], seed=0,
               steps=30, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras", denoise=0.75)
    decode = g.add("VAEDecode", samples=ks[0], vae=ckpt[2])
    g.add("SaveImage", images=decode[0], filename_prefix="lora_composer/lora_of_change")
    g.note("Hypernetwork → LoRA from a before/after pair (LoRA of Change, Song et al. 2024).\n\nThe pair is a "
           "visual instruction: the hypernetwork reads both images and predicts the LoRA of the edit that turns "
           "'before' into 'after' (algorithms.md §4). Applied at strength 1 it performs the edit on a new image "
           "(img2img, denoise 0.75 here); at −1 it performs the reverse edit — the paper's LoRA-reverse "
           "objective, which 'Train LoRA hypernet' (variant 'pair') trains for.\n\nThe paper's base model is an "
           "InstructPix2Pix-style UNet; no pretrained LoC hypernet exists to download, so train one with 'Train "
           "LoRA hypernet' from pairs and their edit LoRAs.")


def training(g: Graph) -> None:
    ckpt = g.add("CheckpointLoaderSimple", ckpt_name=SD15)
    train = g.add("LoraTrain", model=ckpt[0], clip=ckpt[1], vae=ckpt[2], image_folder="dreambooth/sks_dog",
                  instance_prompt="a photo of sks dog", identifier="sks", parameterisation="standard LoRA",
                  targets="attention", rank=4, alpha=4.0, steps=500, learning_rate=1e-4, batch_size=1,
                  optimizer="AdamW", lambda_prior=1.0, class_prompt="a photo of a dog", num_class_images=100,
                  class_sampling_steps=25, seed=0, resolution=512, checkpoint_every=100,
                  checkpoint_prefix="lora_composer/training/sks_dog")
    g.add("LoraSetSave", lora_set=train["lora_set"], filename_prefix="lora_composer/dreambooth_sks_dog", dtype="fp16")
    g.add("PreviewImage", images=train["loss_curve"])
    apply = g.add("LoraSetApply", model=ckpt[0], lora_set=train["lora_set"], clip=ckpt[1])
    pos, neg = text_encode(g, apply["clip"], "a photo of sks dog on the beach")
    sample_and_save(g, apply["model"], pos, neg, ckpt[2], "lora_composer/dreambooth", steps=30, cfg=7.0, seed=0)
    g.note("LoRA training with prior preservation (DreamBooth-LoRA, Ruiz et al. 2023).\n\nPut 3–5 photos of "
           "your subject in ComfyUI/input/dreambooth/sks_dog. The LoRA learns 'sks dog' from them, while the "
           "prior-preservation loss (λ = 1, DreamBooth's weight) keeps 'a photo of a dog' looking like the base "
           "model's dogs: L = E‖ε − ε_θ(x_t, c)‖² + λ·E‖ε − ε_θ(x_pr, c_pr)‖², with 100 class images generated "
           "by the base model first. Rank 4, learning rate 1e-4, 500 steps, 512² as in diffusers' DreamBooth-LoRA "
           "example. The trained LoRA is saved as an ordinary kohya file (plus checkpoints every 100 steps), its "
           "loss curve previewed, and it is tried right away. The base model is never modified.")


WORKFLOWS = {
    "lora_static_apply": static_apply,
    "lora_switch": switch,
    "lora_composite": composite,
    "autolora_model": autolora_model,
    "autolora_guider": autolora_guider,
    "lora_merge_save": merge_save,
    "b_lora_content_style": b_lora,
    "lcm_lora_style": lcm_lora,
    "hypernet_generate": hypernet_generate,
    "hypernet_pair": hypernet_pair,
    "lora_training_prior": training,
}


def main() -> int:
    from harness import comfy_env
    from harness.workflows import node_definition

    comfy_env.start()
    out_dir = REPO / "workflows"
    out_dir.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        g = Graph(node_definition)
        build(g)
        path = out_dir / f"{name}.json"
        path.write_text(json.dumps(g.to_ui(), indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {path.relative_to(REPO)} ({len(g.nodes)} nodes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
