"""API-format prompts for tests/server: tiny model → (LoRAs) → encode → KSampler → LatentStats.

``lora_graph(loras, mode)`` patches the tiny model with ``loras`` (``[(file, strength_model,
strength_clip), …]``) either through LoRA Composer (``LoraSetLoad`` chain → ``LoraSetApply``), through
ComfyUI's own ``LoraLoader`` chain (``mode="core"``), or not at all (empty ``loras``). The sampler and
the text encoders always use the patched model and CLIP.
"""
from __future__ import annotations

STATS_NODE = "stats"


def _node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def lora_graph(loras: list[tuple[str, float, float]], mode: str = "composer") -> dict:
    graph = {"model": _node("LoraComposerTest_TinySD15")}
    model, clip = ["model", 0], ["model", 1]
    if loras and mode == "composer":
        lora_set = None
        for i, (name, sm, sc) in enumerate(loras):
            extra = {"lora_set": lora_set} if lora_set else {}
            graph[f"load{i}"] = _node("LoraSetLoad", lora_name=name, strength_model=sm, strength_clip=sc, **extra)
            lora_set = [f"load{i}", 0]
        graph["apply"] = _node("LoraSetApply", model=model, clip=clip, lora_set=lora_set)
        model, clip = ["apply", 0], ["apply", 1]
    elif loras and mode == "core":
        for i, (name, sm, sc) in enumerate(loras):
            graph[f"core{i}"] = _node("LoraLoader", model=model, clip=clip, lora_name=name,
                                      strength_model=sm, strength_clip=sc)
            model, clip = [f"core{i}", 0], [f"core{i}", 1]
    elif loras:
        raise ValueError(f"unknown mode {mode!r}")
    graph["positive"] = _node("CLIPTextEncode", clip=clip, text="a tiny cat, watercolor")
    graph["negative"] = _node("CLIPTextEncode", clip=clip, text="blurry")
    graph["latent"] = _node("EmptyLatentImage", width=64, height=64, batch_size=1)
    graph["sampler"] = _node("KSampler", model=model, positive=["positive", 0], negative=["negative", 0],
                             latent_image=["latent", 0], seed=1, steps=3, cfg=5.0, sampler_name="euler",
                             scheduler="normal", denoise=1.0)
    graph[STATS_NODE] = _node("LoraComposerTest_LatentStats", samples=["sampler", 0])
    return graph


def latent_stats(history_entry: dict) -> dict:
    """The LatentStats dict of a finished prompt's ``/history`` entry."""
    return history_entry["outputs"][STATS_NODE]["stats"][0]


def error_messages(history_entry: dict) -> list[dict]:
    """The ``execution_error`` payloads recorded in a prompt's status."""
    return [data for event, data in history_entry["status"].get("messages", []) if event == "execution_error"]
