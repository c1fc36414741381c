"""UI-format workflows (``workflows/*.json``): check them against node definitions, convert them to
API prompts, and swap the stock model loaders for the tiny test models.

Node definitions have ``/object_info``'s shape (``input``, ``input_order``, ``output``, ``output_node``):
from a running server, or built in-process from ``nodes.NODE_CLASS_MAPPINGS`` the way ComfyUI's server
builds them (``node_definitions``), so the engine-only ComfyUI can be checked too.

Widget order is the frontend's: every widget input (INT, FLOAT, STRING, BOOLEAN, combo; not
``forceInput``) of ``required`` then ``optional`` in ``input_order``; an INT named ``seed``/``noise_seed``
(or any input with ``control_after_generate``) is followed by its "control after generate" value, and
an ``image_upload`` combo by its upload button's value. tests/e2e/test_browser.py checks this against
the real frontend's ``graphToPrompt``.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS_DIR = REPO_ROOT / "workflows"

FRONTEND_ONLY = {"Note", "MarkdownNote"}  # virtual nodes: never sent to the server
PRIMITIVES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
MUTED, BYPASSED = 2, 4

# Stock loaders the tests replace by the testing pack's tiny models (tests/server/testing_pack):
# same outputs (MODEL, CLIP, VAE / CLIP_VISION), so every link stays as it is. The VAE is a weight-free stub.
TINY_CHECKPOINT = "LoraComposerTest_TinyCheckpoint"
TINY_CLIP_VISION = "LoraComposerTest_TinyClipVision"
TINY_CLIP_VISION_WIDTH = 32  # hidden size of the tiny CLIP vision: the feature width of the tests' hypernets
TEST_LATENT_SIZE = 64  # EmptyLatentImage width/height in tests: 8×8 latents for the tiny UNets


def load(path: Path | str) -> dict:
    return json.loads(Path(path).read_text())


def workflow_files() -> list[Path]:
    return sorted(WORKFLOWS_DIR.glob("*.json"))


# --- node definitions ----------------------------------------------------------------------------------------

def node_definition(class_type: str) -> dict | None:
    """``/object_info/<class_type>`` built in-process (same code path as ComfyUI's server)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        return None
    if hasattr(cls, "GET_NODE_INFO_V1"):  # V3 node (comfy_api.latest)
        info = cls.GET_NODE_INFO_V1()
        return json.loads(json.dumps(info, default=list))
    inputs = cls.INPUT_TYPES()
    info = {"input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES), "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "name": class_type}
    return json.loads(json.dumps(info, default=list))


def definitions_for(workflows: list[dict]) -> dict[str, dict]:
    types = {n["type"] for wf in workflows for n in wf["nodes"]} - FRONTEND_ONLY
    return {t: d for t in sorted(types) if (d := node_definition(t)) is not None}


def input_spec(info: dict, name: str) -> tuple[object, dict]:
    for section in ("required", "optional"):
        spec = info["input"].get(section, {}).get(name)
        if spec is not None:
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            return spec[0], options
    raise KeyError(name)


def combo_options(kind: object, options: dict) -> list | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(options.get("options", []))
    return None


def is_widget(kind: object, options: dict) -> bool:
    return not options.get("forceInput") and (combo_options(kind, options) is not None or kind in PRIMITIVES)


def widget_slots(info: dict) -> list[tuple[str, str]]:
    """``[(input name, role)]`` in ``widgets_values`` order; role is ``value``, ``control`` or ``upload``."""
    slots = []
    for section in ("required", "optional"):
        for name in info.get("input_order", {}).get(section, list(info["input"].get(section, {}))):
            kind, options = input_spec(info, name)
            if not is_widget(kind, options):
                continue
            slots.append((name, "value"))
            control = options.get("control_after_generate")
            if control or (control is None and kind == "INT" and name in ("seed", "noise_seed")):
                slots.append((name, "control"))
            if options.get("image_upload"):
                slots.append((name, "upload"))
    return slots


# --- checking ------------------------------------------------------------------------------------------------

def _types_match(a: str, b: str) -> bool:
    if a == "*" or b == "*":
        return True
    return bool(set(a.split(",")) & set(b.split(",")))


def _links(workflow: dict) -> dict[int, list]:
    return {link[0]: link for link in workflow.get("links", [])}


def _widget_problem(name: str, kind: object, options: dict, value: object) -> str | None:
    choices = combo_options(kind, options)
    if choices is not None:
        return None if value in choices else f"{name}={value!r} is not one of {choices[:8]}{'…' if len(choices) > 8 else ''}"
    if kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a boolean"
    if kind == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{name}={value!r} is not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return f"{name}={value!r} is not a number"
    if "min" in options and value < options["min"]:
        return f"{name}={value!r} is below its minimum {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{name}={value!r} is above its maximum {options['max']}"
    return None


def check_workflow(workflow: dict, defs: dict[str, dict]) -> list[str]:
    """Every problem a user would meet on loading/queueing ``workflow``: unknown node types, link type
    mismatches, wrong widget counts or invalid widget values, required inputs left unconnected."""
    problems: list[str] = []
    links = _links(workflow)
    by_id = {n["id"]: n for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        if node["type"] in FRONTEND_ONLY:
            continue
        info = defs.get(node["type"])
        if info is None:
            problems.append(f"{where}: node type {node['type']!r} does not exist")
            continue
        slots = widget_slots(info)
        values = node.get("widgets_values", [])
        if len(values) != len(slots):
            problems.append(f"{where}: {len(values)} widget values for {len(slots)} widgets {slots}")
        else:
            for (name, role), value in zip(slots, values):
                if role == "control":
                    if value not in CONTROL_VALUES:
                        problems.append(f"{where}: control after generate of {name} is {value!r}")
                    continue
                if role == "upload":
                    continue
                kind, options = input_spec(info, name)
                if (problem := _widget_problem(name, kind, options, value)) is not None:
                    problems.append(f"{where}: {problem}")
        linked = {i["name"] for i in node.get("inputs", []) if i.get("link") is not None}
        widgets = {name for name, _ in slots}
        for name in info["input"].get("required", {}):
            if name not in linked and name not in widgets:
                problems.append(f"{where}: required input {name!r} is not connected")
        for i, slot in enumerate(node.get("inputs", [])):
            if slot.get("link") is None:
                continue
            link = links.get(slot["link"])
            if link is None:
                problems.append(f"{where}: input {slot['name']} refers to missing link {slot['link']}")
                continue
            _, origin_id, origin_slot, target_id, target_slot, link_type = link
            origin = by_id.get(origin_id)
            if target_id != node["id"] or target_slot != i or origin is None:
                problems.append(f"{where}: link {link[0]} does not match its endpoints {link}")
                continue
            try:
                kind, _ = input_spec(info, slot["name"])
            except KeyError:
                problems.append(f"{where}: input {slot['name']!r} does not exist")
                continue
            origin_info = defs.get(origin["type"])
            if origin_info is None:
                continue
            out_type = origin_info["output"][origin_slot]
            kind = "COMBO" if isinstance(kind, list) else kind
            if link_type != out_type or not _types_match(out_type, kind):
                problems.append(f"{where}: input {slot['name']} ({kind}) is linked from {origin['type']} "
                                f"output {origin_slot} ({out_type}) with link type {link_type}")
    return problems


# --- conversion ---------------------------------------------------------------------------------------------

def ui_to_api(workflow: dict, defs: dict[str, dict]) -> dict:
    """The API prompt the frontend would queue for ``workflow`` (what "Export (API)" writes)."""
    links = _links(workflow)
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed; the converter does not follow bypasses")
        info = defs[node["type"]]
        inputs: dict[str, object] = {}
        for (name, role), value in zip(widget_slots(info), node.get("widgets_values", [])):
            if role == "value":
                inputs[name] = value
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin_id, origin_slot, *_ = links[slot["link"]]
                inputs[slot["name"]] = [str(origin_id), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title", node["type"])}}
    return prompt


# --- test substitutions -------------------------------------------------------------------------------------

def checkpoint_family(ckpt_name: str) -> str:
    return "sdxl" if "xl" in ckpt_name.lower() else "sd15"


def workflow_family(workflow: dict) -> str:
    for node in workflow["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            return checkpoint_family(node["widgets_values"][0])
    return "sd15"


TEST_MAX_STEPS = 20  # enough for Switch (k = 3, τ = 5) to run every LoRA and come back to the first
# Widget caps for tests: min(value, cap) by widget name.
TEST_CAPS = {
    "KSampler": {"steps": TEST_MAX_STEPS}, "BasicScheduler": {"steps": TEST_MAX_STEPS},
    "LoraTrain": {"steps": 3, "num_class_images": 2, "class_sampling_steps": 2, "resolution": TEST_LATENT_SIZE,
                  "checkpoint_every": 2, "batch_size": 1},
    "LoraHypernetTrain": {"steps": 3, "batch_size": 2},
}


def substitute_for_tests(workflow: dict, latent_size: int = TEST_LATENT_SIZE, defs: dict | None = None) -> dict:
    """A copy of ``workflow`` that runs on the tiny test models (UI format, so the browser can load it too):

    - ``CheckpointLoaderSimple`` → ``LoraComposerTest_TinyCheckpoint`` (tiny SD1.5 or SDXL by the file name,
      stub VAE); ``CLIPVisionLoader`` → ``LoraComposerTest_TinyClipVision``; outputs and links are unchanged;
    - ``EmptyLatentImage`` → ``latent_size`` × ``latent_size`` pixels, batch 1;
    - the widgets in ``TEST_CAPS`` (sampler steps ≤ 20, training steps and class images a handful) capped.
    Everything else (our nodes, samplers, VAEDecode, SaveImage…) runs as written.
    """
    out = copy.deepcopy(workflow)
    for node in out["nodes"]:
        if node["type"] == "CheckpointLoaderSimple":
            family = checkpoint_family(node["widgets_values"][0])
            _retype(node, TINY_CHECKPOINT, [family])
        elif node["type"] == "CLIPVisionLoader":
            _retype(node, TINY_CLIP_VISION, [])
        elif node["type"] == "EmptyLatentImage":
            node["widgets_values"] = [latent_size, latent_size, 1]
        elif node["type"] in TEST_CAPS:
            info = (defs or {}).get(node["type"]) or node_definition(node["type"])
            for i, (name, role) in enumerate(widget_slots(info)):
                cap = TEST_CAPS[node["type"]].get(name)
                if role == "value" and cap is not None:
                    node["widgets_values"][i] = min(node["widgets_values"][i], cap)
    return out


def _retype(node: dict, new_type: str, widgets_values: list) -> None:
    node["type"] = new_type
    node["widgets_values"] = widgets_values
    node["inputs"] = [i for i in node.get("inputs", []) if "widget" not in i]  # the stock loader's file combos
    node.setdefault("properties", {})["Node name for S&R"] = new_type


def referenced_files(workflow: dict, defs: dict[str, dict]) -> dict[str, set[str]]:
    """Model files the workflow names in its combos: ``{"loras": {...}, "checkpoints": {...}, …}``."""
    folders = {"lora_name": "loras", "ckpt_name": "checkpoints", "clip_name": "clip_vision",
               "hypernet_name": "lora_hypernets", "image": "input", "image_folder": "input folders"}
    found: dict[str, set[str]] = {}
    for node in workflow["nodes"]:
        info = defs.get(node["type"])
        if info is None:
            continue
        for (name, role), value in zip(widget_slots(info), node.get("widgets_values", [])):
            if role == "value" and name in folders and isinstance(value, str) and value:
                found.setdefault(folders[name], set()).add(value)
    return found


def hypernet_variants(workflow: dict) -> dict[str, str]:
    """hypernet file name → ``image`` or ``pair``, from the Generate node each ``LoraHypernetLoad`` feeds."""
    by_id = {n["id"]: n for n in workflow["nodes"]}
    links = _links(workflow)
    variants = {}
    for node in workflow["nodes"]:
        if node["type"] != "LoraHypernetLoad":
            continue
        targets = {by_id[links[i][3]]["type"] for out in node.get("outputs", []) for i in (out.get("links") or [])}
        variants[node["widgets_values"][0]] = "pair" if "LoraHypernetGeneratePair" in targets else "image"
    return variants


def write_tiny_hypernet(engine, path: Path, variant: str, seed: int = 3) -> None:
    """A small untrained hypernet file for the tiny SD1.5 model and the tiny CLIP vision (pack's own format).

    ``engine(name)`` imports a pack module (``ComfyEnv.engine``). Large heads, so the LoRA it generates changes
    the sample visibly.
    """
    import torch

    from harness.tiny_models import build_unet

    lidb, net, ff = (engine(f"nodes.hypernet.{m}") for m in ("lidb", "network", "file_format"))
    spec = lidb.lidb_spec_for_model(build_unet("sd15", seed=0), down_dim=16, up_dim=8, base_seed=seed)
    config = net.HypernetConfig(variant=variant, feature_dim=TINY_CLIP_VISION_WIDTH, model_dim=32, num_blocks=1,
                                num_heads=1, iterations=4, base_model="SD15")
    network = net.LidbHypernet(config, spec, seed=seed)
    with torch.no_grad():
        network.head_weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    ff.save_hypernet(str(path), network, training={"step": 0})


def write_test_image(path: Path, seed: int, size: int = TEST_LATENT_SIZE) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    base = rng.uniform(0.2, 0.8, 3)
    disc = ((xs - size * rng.uniform(0.3, 0.7)) ** 2 + (ys - size / 2) ** 2) < (size / 4) ** 2
    image = np.where(disc[..., None], rng.uniform(0, 1, 3), base)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((image * 255).astype(np.uint8)).save(path)


def write_workflow_files(engine, models_dir: Path, input_dir: Path, workflows: dict[str, dict],
                         defs: dict[str, dict]) -> None:
    """Every file the workflows name, tiny: LoRAs (per workflow family), hypernets, input images and image
    folders, and empty placeholders for the checkpoints and CLIP-vision models the tests substitute."""
    for workflow in workflows.values():
        files = referenced_files(workflow, defs)
        write_tiny_loras(models_dir / "loras", files.get("loras", set()), workflow_family(workflow))
        for folder in ("checkpoints", "clip_vision"):
            for name in files.get(folder, set()):
                (models_dir / folder / name).parent.mkdir(parents=True, exist_ok=True)
                (models_dir / folder / name).touch()  # listed by /object_info; never loaded by the tests
        for name, variant in hypernet_variants(workflow).items():
            if not (models_dir / "lora_hypernets" / name).exists():
                write_tiny_hypernet(engine, models_dir / "lora_hypernets" / name, variant)
        for i, name in enumerate(sorted(files.get("input", set()))):
            if not (input_dir / name).exists():
                write_test_image(input_dir / name, seed=i)
        for folder in files.get("input folders", set()):
            for i in range(3):
                if not (input_dir / folder / f"{i}.png").exists():
                    write_test_image(input_dir / folder / f"{i}.png", seed=100 + i)


def write_tiny_loras(folder: Path, names: set[str], family: str) -> None:
    """Tiny kohya LoRAs for the test models of ``family`` under ``names`` (SD1.5 ones also patch the CLIP)."""
    from harness import lora_factory as lf
    from harness.tiny_models import SDXL_SAMPLING_OVERRIDES, build_sd15_clip, build_unet

    overrides = SDXL_SAMPLING_OVERRIDES if family == "sdxl" else None  # the testing pack's TinyCheckpoint model
    unet_sd = build_unet(family, seed=0, config_overrides=overrides).model.state_dict()
    clip_sd = build_sd15_clip(seed=1).cond_stage_model.state_dict() if family == "sd15" else None
    if family == "sdxl":  # every attention projection, so B-LoRA's output_blocks.0.1 / 1.1 are covered
        targets = [k for k in unet_sd if k.startswith("diffusion_model.") and ".attn" in k and ".to_" in k
                   and k.endswith(".weight")]
    else:
        targets = lf.pick_targets(unet_sd, ("attn", "proj", "ff"))
    for i, name in enumerate(sorted(names)):
        path = folder / name
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        seed = 100 + sum(name.encode()) % 1000 + i
        lora = lf.make_lora(unet_sd, targets, "kohya", rank=4, alpha=2.0, seed=seed)
        if clip_sd is not None:
            lora.tensors.update(lf.make_te_lora(clip_sd, seed=seed + 1).tensors)
        stem = Path(name).stem.replace("-", "_")
        lora.metadata = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "2.0",
                         "ss_tag_frequency": json.dumps({"10_" + stem: {f"{stem} style": 9, "tiny test": 3}})}
        lora.save(path)
