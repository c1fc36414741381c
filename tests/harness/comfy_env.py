"""Bring up a real ComfyUI in this process and load the pack through ComfyUI's own loader.

Used by the tests, the benchmarks and ``make demo``. Nothing of ``comfy.*`` is mocked: the pack is
imported with ``nodes.load_custom_node`` exactly as a user's ComfyUI would do at start-up.

Which ComfyUI: ``COMFYUI_PATH`` when set, otherwise the 0.9.2 engine provisioned by
``scripts/provision_comfyui.py`` (see that file for the import placeholder it adds).

Which device: the CPU (``--cpu``), so that every run is reproducible on any machine, unless
``LORA_COMPOSER_DEVICE=cuda`` asks for ComfyUI's own device choice (GPU benchmarks and GPU test runs).
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[2]
PROVISION_SCRIPT = REPO_ROOT / "scripts" / "provision_comfyui.py"


@dataclass(frozen=True)
class ComfyEnv:
    root: Path
    version: str
    complete: bool  # True when app/ and server.py can start (server, API and browser tests)
    pack: ModuleType  # the pack as ComfyUI imported it
    pack_module_name: str
    models_dir: Path  # temporary models folder registered with folder_paths
    output_dir: Path

    def describe(self) -> str:
        kind = "complete checkout" if self.complete else "engine-only (no server, VAE placeholder)"
        return f"ComfyUI {self.version} at {self.root} [{kind}]"

    def engine(self, name: str) -> ModuleType:
        """Import ``<pack>.<name>`` (e.g. ``nodes.lora_set``) from the pack ComfyUI loaded."""
        return importlib.import_module(f"{self.pack_module_name}.{name}")


_ENV: ComfyEnv | None = None


def wanted_device() -> str:
    """``cpu`` (default) or ``cuda``, from ``LORA_COMPOSER_DEVICE``."""
    device = os.environ.get("LORA_COMPOSER_DEVICE", "cpu").strip().lower() or "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"LORA_COMPOSER_DEVICE must be 'cpu' or 'cuda', not {device!r}")
    return device


def locate_comfyui() -> Path:
    given = os.environ.get("COMFYUI_PATH")
    if given:
        return Path(given).resolve()
    out = subprocess.run([sys.executable, str(PROVISION_SCRIPT)], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def read_version(root: Path) -> str:
    text = (root / "comfyui_version.py").read_text()
    return text.split("__version__ =")[-1].strip().strip("\"'")


def is_complete(root: Path) -> bool:
    return (root / "app").is_dir() and (root / "server.py").exists() and (
        root / "comfy" / "ldm" / "models" / "autoencoder.py").exists() and "LORA_COMPOSER_IMPORT_PLACEHOLDER" not in (
        root / "comfy" / "ldm" / "models" / "autoencoder.py").read_text()


def start(models_dir: Path | None = None, quiet: bool = True) -> ComfyEnv:
    """Import ComfyUI (on the CPU unless ``LORA_COMPOSER_DEVICE=cuda``), point its model folders at a temporary
    directory, load the pack.

    Idempotent: the second call returns the first environment (ComfyUI is process-global).
    """
    global _ENV
    if _ENV is not None:
        return _ENV
    root = locate_comfyui()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    # Pure-torch kernels are importable directly for unit tests; appended *after* ComfyUI so that
    # ComfyUI's top-level ``nodes`` module is never shadowed by the pack's ``nodes/`` package.
    if str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))
    if quiet:
        logging.getLogger().setLevel(logging.WARNING)

    from comfy.cli_args import args  # noqa: E402  (must precede comfy.model_management)

    args.cpu = wanted_device() == "cpu"
    import comfy.model_management  # noqa: F401
    import folder_paths
    import nodes

    base = Path(tempfile.mkdtemp(prefix="lora-composer-comfy-"))
    models_dir = models_dir or base / "models"
    output_dir = base / "output"
    for sub in ("loras", "checkpoints", "clip_vision", "lora_hypernets"):
        (models_dir / sub).mkdir(parents=True, exist_ok=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    (base / "input").mkdir(exist_ok=True)
    (base / "temp").mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(models_dir / "loras"), is_default=True)
    folder_paths.add_model_folder_path("checkpoints", str(models_dir / "checkpoints"), is_default=True)
    folder_paths.add_model_folder_path("clip_vision", str(models_dir / "clip_vision"), is_default=True)
    folder_paths.set_output_directory(str(output_dir))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))

    asyncio.run(nodes.init_builtin_extra_nodes())
    pack_path = str(REPO_ROOT)
    if not asyncio.run(nodes.load_custom_node(pack_path, module_parent="custom_nodes")):
        raise RuntimeError(f"ComfyUI could not load the pack at {pack_path} (see the log above)")
    pack_module_name = pack_path.replace(".", "_x_")
    pack = sys.modules[pack_module_name]
    version = read_version(root)
    _ENV = ComfyEnv(root=root, version=version, complete=is_complete(root), pack=pack,
                    pack_module_name=pack_module_name, models_dir=models_dir, output_dir=output_dir)
    return _ENV
