"""One place where node classes declare their id, display name and category.

Node ids are public API (saved workflows refer to them): once shipped, an id never changes.
"""
from __future__ import annotations

from typing import Callable, TypeVar

CATEGORY_ROOT = "LoRA Composer"

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

NodeClass = TypeVar("NodeClass", bound=type)

_REQUIRED_ATTRIBUTES = ("INPUT_TYPES", "RETURN_TYPES", "FUNCTION", "DESCRIPTION")


def register_node(node_id: str, display_name: str, category: str) -> Callable[[NodeClass], NodeClass]:
    """Class decorator: register a V1 node class under ``node_id`` in ``LoRA Composer/<category>``."""

    def decorate(cls: NodeClass) -> NodeClass:
        if node_id in NODE_CLASS_MAPPINGS:
            raise ValueError(f"node id {node_id!r} registered twice")
        missing = [a for a in _REQUIRED_ATTRIBUTES if not hasattr(cls, a)]
        if missing:
            raise TypeError(f"node {node_id} lacks {', '.join(missing)}")
        cls.CATEGORY = f"{CATEGORY_ROOT}/{category}"
        NODE_CLASS_MAPPINGS[node_id] = cls
        NODE_DISPLAY_NAME_MAPPINGS[node_id] = display_name
        return cls

    return decorate
