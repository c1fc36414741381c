"""LoRA Composer: multi-LoRA loading, composition and merging for ComfyUI.

ComfyUI imports this package with ``nodes.load_custom_node``. Node classes register themselves in
``nodes/registry.py``; importing ``nodes.ui`` is what fills the registry. A failing import logs one
clear line and leaves ComfyUI's start-up intact (the pack then offers no nodes).
"""
import logging

WEB_DIRECTORY = "./web/js"

try:
    from .nodes import ui as _ui  # noqa: F401  (import registers every node)
    from .nodes.registry import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
except Exception as _error:  # pragma: no cover - exercised by tests/integration/test_pack_loading.py
    logging.error("[LoRA Composer] not loaded: %s: %s", type(_error).__name__, _error)
    logging.debug("[LoRA Composer] import traceback", exc_info=True)
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

try:  # the web extension's metadata route; only a running ComfyUI server has one to extend
    from .nodes.server_routes import register_routes as _register_routes

    _register_routes()
except Exception as _error:  # pragma: no cover - never blocks the nodes
    logging.warning("[LoRA Composer] web routes not registered: %s: %s", type(_error).__name__, _error)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
