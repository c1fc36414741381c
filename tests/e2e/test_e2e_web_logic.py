"""The web extension's pure logic (web/js/lora_composer_logic.js) under node, checked against the engine.

- ``node --test tests/e2e/js/`` (node's own runner, no npm package);
- the Switch timeline equals ``nodes/runtime/schedules.py:switch_index`` for a grid of (steps, k, τ, schedule);
- the evaluations-per-step badge equals the number of UNet batch rows ComfyUI actually evaluates per
  sampler step when the node runs (counted with a forward hook on the tiny UNet), for Composite,
  AutoLoRA guidance and the AutoLoRA guider.
Skipped, visibly, where ``node`` is not installed.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from harness.executor import run_prompt
from harness.workflows import TINY_CHECKPOINT

REPO_ROOT = Path(__file__).resolve().parents[2]
LOGIC = REPO_ROOT / "web" / "js" / "lora_composer_logic.js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node (JavaScript runtime) is not installed")


def run_js(body: str) -> object:
    """Evaluate ``body`` (which must print JSON) with the logic module imported as ``L``."""
    script = f"import * as L from {json.dumps(LOGIC.as_uri())};\n{body}"
    out = subprocess.run([NODE, "--input-type=module", "-e", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_node
def test_node_unit_tests_pass():
    out = subprocess.run([NODE, "--test", str(REPO_ROOT / "tests" / "e2e" / "js")], capture_output=True, text=True,
                         timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "# fail 0" in out.stdout


@needs_node
def test_timeline_matches_the_python_schedule(env):
    switch_index = env.engine("nodes.runtime.schedules").switch_index
    cases = [(steps, k, tau, schedule) for steps in (1, 7, 30) for k in (1, 2, 3, 5) for tau in (1, 2, 5, 7)
             for schedule in ("paper", "reference-code")]
    js = run_js(f"const cases = {json.dumps(cases)};\n"
                "console.log(JSON.stringify(cases.map(([n, k, t, s]) => L.switchTimeline(n, k, t, s))));")
    for (steps, k, tau, schedule), timeline in zip(cases, js):
        assert timeline == [switch_index(i, k, tau, schedule) for i in range(steps)], (steps, k, tau, schedule)


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def _graph(loras: list[str], patch: tuple[str, dict] | None = None, guider: dict | None = None, cfg: float = 5.0,
           steps: int = 3) -> dict:
    graph = {"ckpt": _node(TINY_CHECKPOINT, family="sd15")}
    previous = None
    for i, name in enumerate(loras):
        extra = {"lora_set": [previous, 0]} if previous else {}
        graph[f"load{i}"] = _node("LoraSetLoad", lora_name=name, strength_model=1.0, strength_clip=1.0, **extra)
        previous = f"load{i}"
    graph["pos"] = _node("CLIPTextEncode", clip=["ckpt", 1], text="a cat")
    graph["neg"] = _node("CLIPTextEncode", clip=["ckpt", 1], text="blurry")
    graph["latent"] = _node("EmptyLatentImage", width=64, height=64, batch_size=1)
    if guider is not None:
        graph["guider"] = _node("AutoLoraGuider", model=["ckpt", 0], lora_set=[previous, 0], positive=["pos", 0],
                                negative=["neg", 0], **guider)
        graph["noise"] = _node("RandomNoise", noise_seed=1)
        graph["sampler"] = _node("KSamplerSelect", sampler_name="euler")
        graph["sigmas"] = _node("BasicScheduler", model=["ckpt", 0], scheduler="normal", steps=steps, denoise=1.0)
        graph["sample"] = _node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0],
                                sampler=["sampler", 0], sigmas=["sigmas", 0], latent_image=["latent", 0])
    else:
        kind, settings = patch
        graph["patch"] = _node(kind, model=["ckpt", 0], lora_set=[previous, 0], **settings)
        graph["sample"] = _node("KSampler", model=["patch", 0], positive=["pos", 0], negative=["neg", 0],
                                latent_image=["latent", 0], seed=1, steps=steps, cfg=cfg, sampler_name="euler",
                                scheduler="normal", denoise=1.0)
    graph["stats"] = _node("LoraComposerTest_LatentStats", samples=["sample", 0])
    return graph


def _unet_rows_per_step(graph: dict, steps: int = 3) -> float:
    import torch

    rows = []

    def count(module, args):
        if type(module).__name__ == "UNetModel" and args:
            rows.append(int(args[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(count)
    try:
        run = run_prompt(graph)
    finally:
        handle.remove()
    assert run.success, (run.error, run.node_errors, run.messages[-1:])
    return sum(rows) / steps


THREE = ["character_lora.safetensors", "clothing_lora.safetensors", "style_lora.safetensors"]
CASES = [
    ("composite k=2", dict(kind="LoraSetComposite", loraCount=2, cfg=5), _graph(THREE[:2], ("LoraSetComposite", {}))),
    ("composite k=3, one weight 0", dict(kind="LoraSetComposite", loraCount=3, entryWeights="1, 0, 1", cfg=5),
     _graph(THREE, ("LoraSetComposite", {"entry_weights": "1, 0, 1"}))),
    ("composite k=3, cfg 1", dict(kind="LoraSetComposite", loraCount=3, cfg=1),
     _graph(THREE, ("LoraSetComposite", {}), cfg=1.0)),
    ("autolora γ=0.6", dict(kind="AutoLoraGuidance", gamma=0.6, cfg=5),
     _graph(THREE[:1], ("AutoLoraGuidance", {"gamma": 0.6}))),
    ("autolora γ=1", dict(kind="AutoLoraGuidance", gamma=1, cfg=5), _graph(THREE[:1], ("AutoLoraGuidance", {"gamma": 1.0}))),
    ("guider cfg_base 1", dict(kind="AutoLoraGuider", gamma=0.5, cfgBase=1, cfgLora=5),
     _graph(THREE[:1], guider=dict(cfg_base=1.0, cfg_lora=5.0, gamma=0.5))),
    ("guider blend-then-cfg, linear γ", dict(kind="AutoLoraGuider", gamma=0.0, gammaEnd=1.0, gammaSchedule="linear",
                                             cfgBase=1, cfgLora=1, mix="blend-then-cfg", steps=3),
     _graph(THREE[:1], guider=dict(cfg_base=1.0, cfg_lora=1.0, gamma=0.0, gamma_schedule="linear", gamma_end=1.0,
                                   mix="blend-then-cfg"))),
]


@needs_node
def test_evaluation_badge_counts_what_comfyui_evaluates(env, testing_pack_loaded, in_process_models):
    settings = [case[1] for case in CASES]
    badges = run_js(f"console.log(JSON.stringify({json.dumps(settings)}.map((s) => L.evaluationsPerStep(s))));")
    for (label, _, graph), badge in zip(CASES, badges):
        assert "error" not in badge, (label, badge)
        assert not badge["upperBound"]
        assert _unet_rows_per_step(graph) == pytest.approx(badge["perStep"], abs=1e-9), (label, badge)
