"""Fixtures for the end-to-end tests: the example workflows, tiny model files under the names they use,
and one real ComfyUI server (complete checkout only) shared by the route, workflow and browser tests.

The server is ``python main.py --cpu`` on a free loopback port with a throw-away base directory; the
pack and the testing pack (tests/server/testing_pack: tiny checkpoints with a stub VAE) are linked into
its ``custom_nodes``. It serves the real frontend (``comfyui_frontend_package``) when installed, so the
browser test can open the UI; otherwise a one-line index page.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e_support import (ENGINE_ONLY, PACK_DIR_NAME, REPO_ROOT, TESTING_PACK, TESTING_PACK_DIR_NAME, frontend_root,
                         write_bad_files)
from harness import workflows as wf
from harness.server import ComfyServer, prepare_base_directory


@pytest.fixture(scope="session")
def workflow_paths() -> list[Path]:
    return wf.workflow_files()


@pytest.fixture(scope="session")
def ui_workflows(workflow_paths) -> dict[str, dict]:
    return {p.stem: wf.load(p) for p in workflow_paths}


@pytest.fixture(scope="session")
def testing_pack_loaded(env):
    """The tiny-model test nodes, loaded in-process with ComfyUI's own loader (once)."""
    import nodes

    if wf.TINY_CHECKPOINT not in nodes.NODE_CLASS_MAPPINGS:
        assert asyncio.run(nodes.load_custom_node(str(TESTING_PACK), module_parent="custom_nodes"))
    return True


@pytest.fixture(scope="session")
def workflow_defs(env, testing_pack_loaded, ui_workflows) -> dict[str, dict]:
    """In-process node definitions for every type the workflows use (plus the tiny checkpoint)."""
    defs = wf.definitions_for(list(ui_workflows.values()))
    for tiny in (wf.TINY_CHECKPOINT, wf.TINY_CLIP_VISION):
        defs[tiny] = wf.node_definition(tiny)
    return defs


@pytest.fixture(scope="session")
def in_process_models(env, ui_workflows, workflow_defs) -> Path:
    """The in-process ComfyUI's models folder with every file the workflows name, and the bad files."""
    import folder_paths

    folder_paths.add_model_folder_path("lora_hypernets", str(env.models_dir / "lora_hypernets"), is_default=True)
    wf.write_workflow_files(env.engine, env.models_dir, Path(folder_paths.get_input_directory()), ui_workflows,
                            workflow_defs)
    write_bad_files(env.models_dir)
    return env.models_dir


@pytest.fixture(scope="session")
def live_defs(in_process_models, ui_workflows) -> dict[str, dict]:
    """Definitions re-read after the model files exist (file combos list them now)."""
    defs = wf.definitions_for(list(ui_workflows.values()))
    for tiny in (wf.TINY_CHECKPOINT, wf.TINY_CLIP_VISION):
        defs[tiny] = wf.node_definition(tiny)
    return defs


@pytest.fixture(scope="session")
def e2e_server(env, tmp_path_factory, ui_workflows, workflow_defs):
    if not env.complete:
        pytest.skip(ENGINE_ONLY.format(version=env.version))
    base = tmp_path_factory.mktemp("e2e-server")
    minimal_front_end = prepare_base_directory(base, {PACK_DIR_NAME: REPO_ROOT, TESTING_PACK_DIR_NAME: TESTING_PACK})
    wf.write_workflow_files(env.engine, base / "models", base / "input", ui_workflows, workflow_defs)
    write_bad_files(base / "models")
    server = ComfyServer(env.root, base, frontend_root() or minimal_front_end)
    server.has_frontend = frontend_root() is not None
    yield from server.serve(timeout=180)
