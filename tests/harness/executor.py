"""Run API-format prompts through ComfyUI's own validator and executor, in this process (no server).

Works on the engine-only ComfyUI too (it has ``execution.py`` but no server). The server stub
records the executor's messages, which also gives per-node timings.
"""
from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from dataclasses import dataclass, field


class _ServerStub:
    """What PromptExecutor needs from PromptServer: a client id, last node id and send_sync."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.events: list[tuple[float, str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.events.append((time.perf_counter(), event, data))

    def queue_updated(self):
        pass


@dataclass
class PromptRun:
    success: bool
    outputs: dict
    node_errors: dict = field(default_factory=dict)
    error: dict | None = None
    messages: list = field(default_factory=list)
    node_seconds: dict[str, float] = field(default_factory=dict)  # node id → time spent executing


def _executor(server):
    import execution

    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    if "cache_args" in params:  # ComfyUI ≥ 0.4 (0.9.2)
        return execution.PromptExecutor(server, cache_type=False, cache_args={"lru": 0, "ram": 0})
    return execution.PromptExecutor(server, cache_type=False, cache_size=None)  # 0.3.x


def _node_timings(events, end: float) -> dict[str, float]:
    starts = [(t, d.get("node")) for t, e, d in events if e == "executing"]
    timings: dict[str, float] = {}
    for (t0, node), (t1, _) in zip(starts, starts[1:] + [(end, None)]):
        if node is not None:
            timings[node] = timings.get(node, 0.0) + (t1 - t0)
    return timings


def run_prompt(prompt: dict) -> PromptRun:
    """Validate then execute ``prompt``; returns outputs (node id → ui dict) or the validation errors."""
    import execution

    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        return PromptRun(success=False, outputs={}, node_errors=node_errors, error=error)
    server = _ServerStub()
    ex = _executor(server)
    asyncio.run(ex.execute_async(prompt, prompt_id, {"client_id": "lora-composer"}, outputs))
    end = time.perf_counter()
    return PromptRun(success=ex.success, outputs=ex.history_result.get("outputs", {}),
                     messages=ex.status_messages, node_seconds=_node_timings(server.events, end))
