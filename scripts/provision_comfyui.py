#!/usr/bin/env python3
"""Provision a ComfyUI for development and tests, and print its path.

Order of preference:
1. ``COMFYUI_PATH`` (a user's real ComfyUI checkout) is used as is.
2. Otherwise the ComfyUI *engine* (0.9.2) vendored in the sdist of ``switchgen==0.1.1`` is
   downloaded with pip (the only ComfyUI reachable through a package registry) and unpacked into
   ``$LORA_COMPOSER_CACHE/comfyui-engine-0.9.2`` (default cache: ``~/.cache/lora-composer``).

That engine copy is incomplete: it has no ``app/`` (so no server can start) and no
``comfy/ldm/models/autoencoder.py`` (so ``import comfy.sd`` fails). We add an **import
placeholder** for the latter: its classes raise a clear error when instantiated, so everything but
VAE encode/decode works. Nothing in the placeholder computes anything.

Usage: ``python scripts/provision_comfyui.py`` prints the ComfyUI root on stdout (logs go to stderr).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_REQUIREMENT = "switchgen==0.1.1"
ENGINE_DIR_NAME = "comfyui-engine-0.9.2"
PLACEHOLDER_MARK = "LORA_COMPOSER_IMPORT_PLACEHOLDER"

PLACEHOLDER_SOURCE = f'''"""{PLACEHOLDER_MARK}

Import placeholder written by LoRA Composer's test harness (scripts/provision_comfyui.py).
The ComfyUI engine vendored in the switchgen sdist lacks comfy/ldm/models/autoencoder.py, which
`comfy.sd` imports at module level. These names exist only so that the import succeeds; the VAE
cannot work in this engine-only ComfyUI. Use a complete ComfyUI (COMFYUI_PATH) for VAE work.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            "VAE is unavailable in the engine-only ComfyUI (comfy/ldm/models/autoencoder.py is an "
            "import placeholder). Point COMFYUI_PATH at a complete ComfyUI checkout."
        )


class AutoencoderKL(_Unavailable):
    pass


class AutoencodingEngine(_Unavailable):
    pass


class DiagonalGaussianRegularizer(_Unavailable):
    pass


class EmptyRegularizer(_Unavailable):
    pass
'''


def cache_root() -> Path:
    return Path(os.environ.get("LORA_COMPOSER_CACHE", Path.home() / ".cache" / "lora-composer"))


def log(msg: str) -> None:
    print(f"[provision] {msg}", file=sys.stderr)


def install_placeholder(comfy_root: Path) -> None:
    """Write comfy/ldm/models/autoencoder.py if (and only if) the tree lacks it."""
    models_dir = comfy_root / "comfy" / "ldm" / "models"
    target = models_dir / "autoencoder.py"
    if target.exists():
        return
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / "__init__.py").touch()
    target.write_text(PLACEHOLDER_SOURCE)
    log(f"wrote import placeholder {target}")


def provision_engine() -> Path:
    dest = cache_root() / ENGINE_DIR_NAME
    if (dest / "comfy" / "lora.py").exists():
        install_placeholder(dest)
        return dest
    cache_root().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:
        log(f"downloading the {SDIST_REQUIREMENT} sdist (ComfyUI engine 0.9.2)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             SDIST_REQUIREMENT, "-d", tmp],
            check=True, stdout=sys.stderr,
        )
        (archive,) = list(Path(tmp).glob("switchgen-*.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/ComfyUI/" in m.name + "/"]
            tar.extractall(tmp, members=members, filter="data")
        (src,) = list(Path(tmp).glob("switchgen-*/vendor/ComfyUI"))
        staging = dest.with_name(dest.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.move(str(src), staging)
        install_placeholder(staging)
        shutil.rmtree(dest, ignore_errors=True)
        staging.rename(dest)
    log(f"engine ready at {dest}")
    return dest


def main() -> int:
    given = os.environ.get("COMFYUI_PATH")
    if given:
        root = Path(given).resolve()
        if not (root / "comfy" / "lora.py").exists():
            log(f"COMFYUI_PATH={given} does not look like a ComfyUI checkout (no comfy/lora.py)")
            return 2
    else:
        root = provision_engine()
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
