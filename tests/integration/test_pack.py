"""The pack as ComfyUI sees it: registration, declarations, conventions, fail-soft import."""
from __future__ import annotations

import asyncio
import re
import shutil
import tomllib

import pytest

from harness.comfy_env import REPO_ROOT

EXPECTED_NODES = {"LoraSetLoad", "LoraSetFromStack", "LoraSetToStack", "LoraSetBlocks", "LoraSetApply",
                  "LoraSetMerge", "LoraSetSave", "LoraSetInfo"}


def test_nodes_registered_in_comfyui(env):
    import nodes

    ours = set(env.pack.NODE_CLASS_MAPPINGS)
    assert EXPECTED_NODES <= ours
    for node_id in ours:
        assert nodes.NODE_CLASS_MAPPINGS[node_id] is env.pack.NODE_CLASS_MAPPINGS[node_id]
        assert env.pack.NODE_DISPLAY_NAME_MAPPINGS[node_id]


@pytest.mark.parametrize("node_id", sorted(EXPECTED_NODES))
def test_node_declarations(env, node_id):
    cls = env.pack.NODE_CLASS_MAPPINGS[node_id]
    assert cls.CATEGORY.startswith("LoRA Composer/")
    assert len(cls.DESCRIPTION) > 40
    inputs = cls.INPUT_TYPES()
    for section in ("required", "optional"):
        for name, spec in inputs.get(section, {}).items():
            assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert callable(getattr(cls, cls.FUNCTION))


def test_pyproject_and_requirements_follow_registry_conventions():
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "comfyui-lora-composer"
    for field in ("version", "description", "license"):
        assert meta["project"][field]
    comfy = meta["tool"]["comfy"]
    assert comfy["DisplayName"] == "LoRA Composer" and comfy["PublisherId"] and comfy["requires-comfyui"]
    reqs = [l.split("#")[0].strip() for l in (REPO_ROOT / "requirements.txt").read_text().splitlines()]
    assert not [r for r in reqs if re.match(r"torch", r)], "torch belongs to ComfyUI"


def test_no_eval_exec_or_pip_in_pack_code():
    for path in list((REPO_ROOT / "nodes").rglob("*.py")) + list((REPO_ROOT / "kernels").rglob("*.py")) + [
            REPO_ROOT / "__init__.py"]:
        text = path.read_text()
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path
        assert "pip install" not in text and "subprocess" not in text, path
        assert "torch.load(" not in text and not re.search(r"^\s*(import|from)\s+pickle", text, re.M), path


def test_kernels_do_not_import_comfy():
    for path in (REPO_ROOT / "kernels").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(comfy|nodes|folder_paths)", path.read_text(), re.M), path


def test_broken_import_fails_soft(env, tmp_path, caplog):
    """A pack whose import fails logs one clear line; ComfyUI's loader carries on."""
    import nodes

    copy = tmp_path / "lora_composer_broken"
    shutil.copytree(REPO_ROOT, copy, ignore=shutil.ignore_patterns(".git", "tests", "__pycache__", "bench"))
    (copy / "nodes" / "ui" / "loading.py").write_text("raise ImportError('simulated missing dependency')\n")
    with caplog.at_level("ERROR"):
        ok = asyncio.run(nodes.load_custom_node(str(copy), module_parent="custom_nodes"))
    assert ok is True
    lines = [r.getMessage() for r in caplog.records if "LoRA Composer" in r.getMessage()]
    assert lines == ["[LoRA Composer] not loaded: ImportError: simulated missing dependency"]
