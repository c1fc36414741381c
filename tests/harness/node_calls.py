"""Call a node the way ComfyUI's executor does: instantiate, then call its FUNCTION with keyword inputs."""
from __future__ import annotations


def call_node(node_id: str, **inputs):
    import nodes  # ComfyUI's node registry, where load_custom_node put the pack's nodes

    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    out = getattr(cls(), cls.FUNCTION)(**inputs)
    return out["result"] if isinstance(out, dict) else out
