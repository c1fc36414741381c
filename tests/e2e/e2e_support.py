"""Shared by the e2e fixtures, tests and scripts/workflow_thumbnails.py (a module name of its own, unlike
conftest.py): pack folder names, the bad files the route tests use, where the frontend package lives."""
from __future__ import annotations

import importlib.util
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
TESTING_PACK = REPO_ROOT / "tests" / "server" / "testing_pack"
PACK_DIR_NAME = "comfyui-lora-composer"
TESTING_PACK_DIR_NAME = "lora_composer_testing"
ENGINE_ONLY = "needs a complete ComfyUI checkout (COMFYUI_PATH); the engine-only {version} cannot start a server"

CORRUPT_LORA = "corrupt_lora.safetensors"
TRUNCATED_LORA = "truncated_lora.safetensors"
PICKLE_LORA = "pickled_lora.pt"
OUTSIDE_FILE = "outside_models.safetensors"  # written next to models/, never readable through the route


def frontend_root() -> Path | None:
    spec = importlib.util.find_spec("comfyui_frontend_package")
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(list(spec.submodule_search_locations)[0]) / "static"
    return static if (static / "index.html").exists() else None


def write_bad_files(models_dir: Path) -> None:
    loras = models_dir / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    (loras / CORRUPT_LORA).write_bytes(b"\x00this is not a safetensors file\xff" * 8)
    good = sorted(p for p in loras.glob("*.safetensors") if p.name not in (CORRUPT_LORA, TRUNCATED_LORA))
    if good:
        (loras / TRUNCATED_LORA).write_bytes(good[0].read_bytes()[:200])
    (loras / PICKLE_LORA).write_bytes(b"\x80\x04not really a pickle")
    (models_dir / OUTSIDE_FILE).write_bytes(good[0].read_bytes() if good else b"secret")
