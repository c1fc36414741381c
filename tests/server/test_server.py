"""The pack inside a real ComfyUI server: /object_info, start-up log, and /prompt end to end.

One server per module (``python main.py --cpu`` on a free loopback port, throw-away base directory). The
pack is linked into its ``custom_nodes`` as ``comfyui-lora-composer``, next to the test-only pack in
``testing_pack/`` (tiny SD1.5 model loader, latent statistics output). Skipped when ComfyUI is the
engine-only copy, which cannot start a server.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from harness import lora_factory as lf
from harness.server import ComfyServer, prepare_base_directory
from harness.tiny_models import build_sd15_clip, build_unet
from prompt_graphs import error_messages, latent_stats, lora_graph

pytestmark = pytest.mark.server

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PACK_DIR_NAME = "comfyui-lora-composer"
TESTING_PACK_DIR_NAME = "lora_composer_testing"
ENGINE_ONLY = "needs a complete ComfyUI checkout (COMFYUI_PATH); the engine-only {version} cannot start a server"

LORA_A, LORA_B, LORA_BAD = "tiny_a.safetensors", "tiny_b.safetensors", "bad.safetensors"
LORAS = [(LORA_A, 0.8, 0.9), (LORA_B, -0.6, 0.5)]


def write_test_loras(folder: Path) -> None:
    """Two tiny LoRAs keyed for the testing pack's model (A also patches the CLIP), plus a corrupt file."""
    unet_sd = build_unet("sd15", seed=0).model.state_dict()
    lora_a = lf.make_lora(unet_sd, lf.pick_targets(unet_sd), "kohya", rank=4, alpha=2.0, seed=11)
    lora_a.tensors.update(lf.make_te_lora(build_sd15_clip(seed=1).cond_stage_model.state_dict(), seed=12).tensors)
    lora_a.save(folder / LORA_A)
    lf.make_lora(unet_sd, lf.pick_targets(unet_sd, kinds=("attn", "ff")), "kohya", rank=2, alpha=1.0,
                 seed=13).save(folder / LORA_B)
    (folder / LORA_BAD).write_bytes(b"\x00this is not a safetensors file\xff" * 8)


@pytest.fixture(scope="module")
def server(env, tmp_path_factory):
    if not env.complete:
        pytest.skip(ENGINE_ONLY.format(version=env.version))
    base = tmp_path_factory.mktemp("comfy-server")
    front_end = prepare_base_directory(base, {PACK_DIR_NAME: REPO_ROOT, TESTING_PACK_DIR_NAME: HERE / "testing_pack"})
    write_test_loras(base / "models" / "loras")
    yield from ComfyServer(env.root, base, front_end).serve(timeout=120)


@pytest.fixture(scope="module")
def object_info(server):
    return server.get_json("/object_info")


def test_object_info_lists_every_node(env, object_info):
    expected = env.pack.NODE_CLASS_MAPPINGS
    assert expected, "the pack registered no node in-process"
    missing = sorted(set(expected) - set(object_info))
    assert not missing, f"/object_info lacks {missing}"
    for node_id, cls in expected.items():
        info = object_info[node_id]
        assert info["category"].startswith("LoRA Composer/"), (node_id, info["category"])
        assert info["description"].strip(), f"{node_id} has no description"
        declared = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            want = list(declared.get(section, {}))
            got = info["input_order"].get(section, [])
            assert got == want, f"{node_id} {section} inputs: server {got}, class {want}"


def test_pack_imports_without_failure(server, object_info):
    log = server.log_text()
    import_lines = [line for line in log.splitlines() if PACK_DIR_NAME in line or TESTING_PACK_DIR_NAME in line]
    failed = [line for line in import_lines if "IMPORT FAILED" in line]
    assert not failed, "\n".join(failed)
    assert any("seconds" in line and line.rstrip().endswith(PACK_DIR_NAME) for line in import_lines), (
        f"the pack is missing from the import summary:\n{server.log_tail()}")
    assert "[LoRA Composer] not loaded" not in log
    assert "LoraComposerTest_TinySD15" in object_info, "the testing pack did not load"


def test_lora_set_over_api_equals_core_lora_loader(server):
    base = server.run_prompt(lora_graph([]))
    ours = server.run_prompt(lora_graph(LORAS, mode="composer"))
    core = server.run_prompt(lora_graph(LORAS, mode="core"))
    for name, entry in (("no LoRA", base), ("LoRA Composer", ours), ("core LoraLoader", core)):
        assert entry["status"]["status_str"] == "success", f"{name}: {error_messages(entry)}\n{server.log_tail()}"
    ours_stats, core_stats = latent_stats(ours), latent_stats(core)
    assert ours_stats["shape"] == [1, 4, 8, 8]
    assert ours_stats == core_stats, "LoraSetApply differs from chained core LoraLoader nodes"
    assert ours_stats["sha256"] != latent_stats(base)["sha256"], "the LoRAs changed nothing: keys did not match?"


def test_missing_lora_file_is_a_validation_error(server):
    graph = lora_graph([("does_not_exist.safetensors", 1.0, 1.0)])
    status, answer = server.post_json("/prompt", {"prompt": graph})
    assert status == 400, answer
    errors = answer["node_errors"]["load0"]["errors"]
    assert any(e["type"] == "value_not_in_list" and "lora_name" in str(e) for e in errors), errors
    assert server.process.poll() is None, "the server died on a bad prompt"


def test_corrupt_lora_file_fails_the_prompt_with_its_name(server):
    entry = server.run_prompt(lora_graph([(LORA_BAD, 1.0, 1.0)]))
    assert entry["status"]["status_str"] == "error"
    errors = error_messages(entry)
    assert errors, entry["status"]
    assert LORA_BAD in errors[0]["exception_message"], errors[0]["exception_message"]
    assert server.get_json("/object_info/LoraSetApply"), "the server stopped answering after the error"
