"""A tiny backend registry for the pack's kernels (no ComfyUI imports).

Modelled on comfy-kitchen's dispatch: every *op* (``"lowrank_delta"``, ``"dense_delta"``) has
one or more named implementations (*backends*), each with a priority and an availability check.
:func:`select` returns the highest-priority backend that is available and runs on the input's
device type; :func:`backends` lists all of them with the reason each one is or is not usable,
so a node or a bug report can say *why* a faster path was not taken.

Availability is checked once, on first use, and remembered (a Triton import or a CUDA
capability query is not free, and a forward pass asks for a backend on every call). A check that
raises counts as unavailable, with the exception as its reason, so an optional backend can never
break the always-available ``"torch"`` one.

The built-in ``"torch"`` backends live in :mod:`kernels.lowrank` and :mod:`kernels.dense`, which
register themselves when imported; :func:`select` and :func:`backends` import them on demand, so
``dispatch`` works on its own without a circular import.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "BackendInfo",
    "backends",
    "ops",
    "register_backend",
    "select",
    "unregister_backend",
]

Availability = Callable[[], tuple[bool, str]]


@dataclass
class _Backend:
    name: str
    fn: Callable[..., Any]
    priority: int
    available: Availability
    devices: frozenset[str] | None
    # Filled on the first query; (ok, reason).
    status: tuple[bool, str] | None = field(default=None)


@dataclass(frozen=True)
class BackendInfo:
    """One row of :func:`backends`: ``(name, priority, available, reason)`` (unpackable)."""

    name: str
    priority: int
    available: bool
    reason: str

    def __iter__(self):  # lets callers write `for name, prio, ok, why in backends(op)`
        return iter((self.name, self.priority, self.available, self.reason))


_LOCK = threading.RLock()
_REGISTRY: dict[str, dict[str, _Backend]] = {}
_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """Import the modules that register the built-in backends (once)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    # Imported here, not at module level: lowrank/dense import dispatch to register themselves.
    from . import dense, lowrank, lowrank_routed  # noqa: F401

    _BUILTINS_LOADED = True


def register_backend(
    op: str,
    name: str,
    fn: Callable[..., Any],
    priority: int,
    available: Availability | None = None,
    devices: Collection[str] | None = None,
) -> None:
    """Register (or replace) backend ``name`` for ``op``.

    Args:
        op: operation name, e.g. ``"lowrank_delta"``.
        name: backend name, unique per op; registering an existing name replaces it.
        fn: the implementation; all backends of one op share its call signature.
        priority: higher wins in :func:`select`.
        available: ``() -> (ok, reason)``, called once on first query; ``None`` means always
            available. ``reason`` should say why when ``ok`` is false (e.g. "triton not installed").
        devices: device types the backend runs on (``{"cuda"}``); ``None`` means any.
    """
    if not isinstance(op, str) or not op:
        raise ValueError(f"op must be a non-empty string, got {op!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable, got {type(fn).__name__}")
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if available is not None and not callable(available):
        raise ValueError(f"available must be callable or None, got {type(available).__name__}")
    if isinstance(devices, str):
        # A bare "cuda" would otherwise become the set of its letters.
        raise ValueError(
            f"devices must be a collection of device types, got the string {devices!r}"
        )
    dev = None if devices is None else frozenset(str(d) for d in devices)
    check = available if available is not None else (lambda: (True, "always available"))
    with _LOCK:
        _REGISTRY.setdefault(op, {})[name] = _Backend(name, fn, priority, check, dev)


def unregister_backend(op: str, name: str) -> None:
    """Remove backend ``name`` of ``op`` (tests use this to undo a temporary registration)."""
    with _LOCK:
        table = _REGISTRY.get(op, {})
        if name not in table:
            raise ValueError(f"name {name!r} is not a registered backend of op {op!r}")
        del table[name]


def _status(b: _Backend) -> tuple[bool, str]:
    if b.status is None:
        try:
            ok, reason = b.available()
            b.status = (bool(ok), str(reason))
        except Exception as exc:  # an optional backend's probe must not break dispatch
            b.status = (False, f"availability check raised {type(exc).__name__}: {exc}")
    return b.status


def _table(op: str) -> dict[str, _Backend]:
    _load_builtins()
    table = _REGISTRY.get(op)
    if not table:
        known = sorted(k for k, v in _REGISTRY.items() if v)
        raise ValueError(f"op {op!r} has no registered backends; known ops: {known}")
    return table


def ops() -> list[str]:
    """Names of the ops that have at least one backend."""
    _load_builtins()
    with _LOCK:
        return sorted(k for k, v in _REGISTRY.items() if v)


def _usable(b: _Backend, dev_type: str | None) -> tuple[bool, str]:
    ok, reason = _status(b)
    if ok and dev_type is not None and b.devices is not None and dev_type not in b.devices:
        return False, f"does not run on device type {dev_type!r} (runs on {sorted(b.devices)})"
    return ok, reason


def _dev_type(device: torch.device | str | None) -> str | None:
    return None if device is None else torch.device(device).type


def backends(op: str, device: torch.device | str | None = None) -> list[BackendInfo]:
    """All backends of ``op``, highest priority first, each with ``available`` and its reason.

    With ``device``, a backend that does not run on that device type is listed as unavailable
    (with that as the reason); without it, only the backend's own availability check counts.
    """
    dev_type = _dev_type(device)
    with _LOCK:
        return [
            BackendInfo(b.name, b.priority, *_usable(b, dev_type))
            for b in sorted(_table(op).values(), key=lambda b: -b.priority)
        ]


def select(op: str, device: torch.device | str | None = None) -> tuple[str, Callable[..., Any]]:
    """``(name, fn)`` of the highest-priority available backend of ``op`` for ``device``.

    ``device`` may be a ``torch.device``, a string (``"cuda:0"``) or ``None`` (any device).
    Raises ``RuntimeError`` listing every backend's reason when none qualifies.
    """
    dev_type = _dev_type(device)
    with _LOCK:
        rejected: list[str] = []
        for b in sorted(_table(op).values(), key=lambda b: -b.priority):
            ok, reason = _usable(b, dev_type)
            if ok:
                return b.name, b.fn
            rejected.append(f"{b.name}: {reason}")
    raise RuntimeError(f"no backend of op {op!r} can run on {device}: " + "; ".join(rejected))
