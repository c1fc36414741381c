#!/usr/bin/env python3
"""``make demo``: run the pack's example graphs headless on a tiny in-memory model and say what ran.

Everything is real ComfyUI: the pack and a test-only model pack (tests/server/testing_pack, a tiny
SD1.5-shaped UNet and CLIP with deterministic weights) are loaded with ``nodes.load_custom_node``,
tiny LoRA files are written into a temporary ``loras`` folder, and each graph goes through ComfyUI's
own ``validate_prompt`` and ``PromptExecutor``. Nothing is downloaded.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import comfy_env, lora_factory  # noqa: E402
from harness.executor import run_prompt  # noqa: E402
from harness.tiny_models import build_unet  # noqa: E402

TESTING_PACK = REPO / "tests" / "server" / "testing_pack"


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def sampled(graph: dict, model, clip) -> dict:
    """Add text encoding, an empty latent, a 4-step KSampler and a LatentStats output to ``graph``."""
    graph.update({
        "pos": node("CLIPTextEncode", clip=clip, text="a tiny watercolor cat"),
        "neg": node("CLIPTextEncode", clip=clip, text="blurry"),
        "latent": node("EmptyLatentImage", width=64, height=64, batch_size=1),
        "sample": node("KSampler", model=model, positive=["pos", 0], negative=["neg", 0], latent_image=["latent", 0],
                       seed=7, steps=4, cfg=5.0, sampler_name="euler", scheduler="normal", denoise=1.0),
        "stats": node("LoraComposerTest_LatentStats", samples=["sample", 0]),
    })
    return graph


def example_graphs() -> dict[str, dict]:
    tiny = {"tiny": node("LoraComposerTest_TinySD15")}
    load_ab = {
        "lora_a": node("LoraSetLoad", lora_name="demo_style.safetensors", strength_model=0.8, strength_clip=1.0),
        "lora_b": node("LoraSetLoad", lora_name="demo_subject.safetensors", strength_model=0.6, strength_clip=0.5,
                       lora_set=["lora_a", 0]),
    }
    return {
        "static multi-LoRA apply (LoRA Merge)": sampled({
            **tiny, **load_ab,
            "apply": node("LoraSetApply", model=["tiny", 0], clip=["tiny", 1], lora_set=["lora_b", 0]),
            "info": node("LoraSetInfo", lora_set=["lora_b", 0], model=["tiny", 0], clip=["tiny", 1]),
        }, ["apply", 0], ["apply", 1]),
        "block weights (output blocks only, input half strength)": sampled({
            **tiny, **load_ab,
            "blocks": node("LoraSetBlocks", lora_set=["lora_b", 0], preset="output",
                           block_weights="input_blocks=0.5", apply_to="all entries"),
            "apply": node("LoraSetApply", model=["tiny", 0], clip=["tiny", 1], lora_set=["blocks", 0]),
        }, ["apply", 0], ["apply", 1]),
        "LoRA Switch (k = 2, τ = 2, paper schedule)": sampled({
            **tiny, **load_ab,
            "switch": node("LoraSetSwitch", model=["tiny", 0], clip=["tiny", 1], lora_set=["lora_b", 0],
                           switch_every=2, schedule="paper"),
        }, ["switch", 0], ["switch", 1]),
        "LoRA Composite (k = 2, uniform)": sampled({
            **tiny, **load_ab,
            "composite": node("LoraSetComposite", model=["tiny", 0], clip=["tiny", 1], lora_set=["lora_b", 0]),
        }, ["composite", 0], ["composite", 1]),
        "AutoLoRA guidance, model form (γ = 0.6)": sampled({
            **tiny, **load_ab,
            "autolora": node("AutoLoraGuidance", model=["tiny", 0], clip=["tiny", 1], lora_set=["lora_b", 0],
                             gamma=0.6),
        }, ["autolora", 0], ["autolora", 1]),
        "AutoLoRA guider (cfg 3 / 6, γ 0 → 1 linear) with SamplerCustomAdvanced": {
            **tiny, **load_ab,
            "pos": node("CLIPTextEncode", clip=["tiny", 1], text="a tiny watercolor cat"),
            "neg": node("CLIPTextEncode", clip=["tiny", 1], text="blurry"),
            "latent": node("EmptyLatentImage", width=64, height=64, batch_size=1),
            "guider": node("AutoLoraGuider", model=["tiny", 0], lora_set=["lora_b", 0], positive=["pos", 0],
                           negative=["neg", 0], cfg_base=3.0, cfg_lora=6.0, gamma=0.0, gamma_schedule="linear",
                           gamma_end=1.0, mix="cfg-then-blend"),
            "noise": node("RandomNoise", noise_seed=7),
            "sampler": node("KSamplerSelect", sampler_name="euler"),
            "sigmas": node("BasicScheduler", model=["tiny", 0], scheduler="normal", steps=4, denoise=1.0),
            "sample": node("SamplerCustomAdvanced", noise=["noise", 0], guider=["guider", 0], sampler=["sampler", 0],
                           sigmas=["sigmas", 0], latent_image=["latent", 0]),
            "stats": node("LoraComposerTest_LatentStats", samples=["sample", 0]),
        },
        "merge (svd, rank 4) and save": {
            **tiny, **load_ab,
            "merge": node("LoraSetMerge", model=["tiny", 0], clip=["tiny", 1], lora_set=["lora_b", 0], method="svd",
                          rank=4, density=0.5, seed=0),
            "save": node("LoraSetSave", lora_set=["merge", 0], filename_prefix="demo/merged_svd", dtype="fp16"),
        },
        "merge (ties) and save": {
            **tiny, **load_ab,
            "merge": node("LoraSetMerge", model=["tiny", 0], lora_set=["lora_b", 0], method="ties", rank=4,
                          density=0.5, seed=0),
            "save": node("LoraSetSave", lora_set=["merge", 0], filename_prefix="demo/merged_ties", dtype="fp16"),
        },
    }


def write_demo_loras(loras_dir: Path) -> None:
    sd = build_unet("sd15", seed=0).model.state_dict()  # same keys as the testing pack's model
    lora_factory.make_lora(sd, lora_factory.pick_targets(sd, ("attn", "proj")), "kohya", rank=4, seed=1).save(
        loras_dir / "demo_style.safetensors")
    lora_factory.make_lora(sd, lora_factory.pick_targets(sd, ("attn", "conv3")), "kohya", rank=2, seed=2).save(
        loras_dir / "demo_subject.safetensors")


def main() -> int:
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine
    env = comfy_env.start()
    import nodes

    print(f"LoRA Composer demo on {env.describe()}")
    if not asyncio.run(nodes.load_custom_node(str(TESTING_PACK), module_parent="custom_nodes")):
        print("could not load the tiny-model test pack", file=sys.stderr)
        return 1
    write_demo_loras(env.models_dir / "loras")
    failures = 0
    for title, graph in example_graphs().items():
        t0 = time.perf_counter()
        run = run_prompt(graph)
        status = "ok" if run.success else "FAILED"
        print(f"\n== {title}: {status} in {time.perf_counter() - t0:.2f} s")
        if not run.success:
            failures += 1
            print(f"   {run.error or ''} {run.node_errors or ''} {run.messages[-1:] if run.messages else ''}")
            continue
        for node_id, seconds in run.node_seconds.items():
            print(f"   {graph[node_id]['class_type']:<32} {seconds * 1000:8.1f} ms")
        for node_id, ui in run.outputs.items():
            for key, values in ui.items():
                for value in values:
                    text = str(value).replace("\n", "\n      ")
                    print(f"   [{graph[node_id]['class_type']}] {key}: {text}")
    print(f"\n{len(example_graphs()) - failures} of {len(example_graphs())} example graphs ran")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
