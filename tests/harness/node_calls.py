"""Call a node the way ComfyUI's executor does: instantiate, then call its FUNCTION with keyword inputs."""
from __future__ import annotations


def call_node(node_id: str, **inputs):
    import nodes  # ComfyUI's node registry, where load_custom_node put the pack's nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out


def load_set(names, strengths=None):
    """A LORA_SET of files from the loras folder, chained through LoraSetLoad (clip strength 1)."""
    lora_set = None
    for i, name in enumerate(names):
        (lora_set,) = call_node("LoraSetLoad", lora_name=name, strength_model=strengths[i] if strengths else 1.0,
                                strength_clip=1.0, lora_set=lora_set)
    return lora_set
