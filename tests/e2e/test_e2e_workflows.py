"""Every example workflow in ``workflows/`` is valid for the live node definitions and runs.

- Checked against ``/object_info`` of a real server with the pack loaded (complete checkout), and against
  the same definitions built in-process (both ComfyUI versions): every node type exists, every link's
  types match, every widget value is valid, no required input is left open.
- Converted to an API prompt (tests/harness/workflows.py:ui_to_api, the frontend's widget order) and run
  through ComfyUI's own validator and executor in this process (tests/harness/executor.py), on both
  versions. **Substitution** (harness ``substitute_for_tests``): the stock ``CheckpointLoaderSimple`` becomes
  the testing pack's ``LoraComposerTest_TinyCheckpoint`` (tiny SD1.5/SDXL UNet and CLIP by the checkpoint's
  file name, weight-free stub VAE) and ``CLIPVisionLoader`` its ``LoraComposerTest_TinyClipVision``;
  ``EmptyLatentImage`` shrinks to 64×64, sampler steps are capped at 20 and training to a few steps and class
  images. Everything else — our nodes, samplers, ``ModelSamplingDiscrete``, ``CLIPVisionEncode``, ``LoadImage``,
  ``VAEEncode``/``VAEDecode``, ``SaveImage`` — runs as written, on tiny LoRAs, hypernets and images written
  under the names the workflows use. Every node of the pack in a workflow must execute.
"""
from __future__ import annotations

import json
import time
import urllib.request

import pytest
from harness import workflows as wf
from harness.executor import run_prompt

# The features issue #7 lists, by file.
EXPECTED = {"lora_static_apply", "lora_switch", "lora_composite", "autolora_model", "autolora_guider",
            "lora_merge_save", "b_lora_content_style", "lcm_lora_style", "hypernet_generate", "hypernet_pair",
            "lora_training_prior"}
PACK_DIR_NAME = "comfyui-lora-composer"


def _ours(env) -> set[str]:
    return set(env.pack.NODE_CLASS_MAPPINGS)


def test_every_feature_has_a_workflow(ui_workflows, env):
    missing = EXPECTED - set(ui_workflows)
    assert not missing, f"workflows/ lacks {sorted(missing)}"
    for name, workflow in ui_workflows.items():
        assert workflow.get("version") == 0.4 and workflow["nodes"] and workflow["links"], name
        notes = [n for n in workflow["nodes"] if n["type"] == "Note"]
        assert len(notes) == 1 and len(notes[0]["widgets_values"][0]) > 200, f"{name}: needs one explanatory note"
        assert any(n["type"] in _ours(env) for n in workflow["nodes"]), f"{name} uses none of the pack's nodes"
        ids = [n["id"] for n in workflow["nodes"]]
        assert len(ids) == len(set(ids)) and workflow["last_node_id"] >= max(ids), name
        assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"]), name


def test_workflows_are_valid_in_process(ui_workflows, live_defs):
    problems = {name: wf.check_workflow(w, live_defs) for name, w in ui_workflows.items()}
    assert not any(problems.values()), json.dumps({k: v for k, v in problems.items() if v}, indent=1)


def test_workflows_are_valid_for_the_live_server(e2e_server, ui_workflows):
    object_info = e2e_server.get_json("/object_info")
    problems = {name: wf.check_workflow(w, object_info) for name, w in ui_workflows.items()}
    assert not any(problems.values()), json.dumps({k: v for k, v in problems.items() if v}, indent=1)


def test_checker_catches_broken_workflows(ui_workflows, workflow_defs):
    broken = json.loads(json.dumps(ui_workflows["lora_switch"]))
    switch = next(n for n in broken["nodes"] if n["type"] == "LoraSetSwitch")
    switch["widgets_values"][0] = 0  # τ below its minimum
    broken["links"][0][5] = "MODEL"  # a LORA_SET link typed as MODEL
    broken["nodes"].append({"id": 99, "type": "NoSuchNode", "inputs": [], "outputs": [], "widgets_values": []})
    text = "\n".join(wf.check_workflow(broken, workflow_defs))
    assert "switch_every=0 is below its minimum 1" in text
    assert "link type MODEL" in text
    assert "'NoSuchNode' does not exist" in text


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_workflow_runs_on_tiny_models(name, env, ui_workflows, live_defs):
    workflow = wf.substitute_for_tests(ui_workflows[name])
    assert not wf.check_workflow(workflow, live_defs)
    prompt = wf.ui_to_api(workflow, live_defs)
    t0 = time.perf_counter()
    run = run_prompt(prompt)
    assert run.success, (f"{name} failed on {env.describe()}: {run.error} {run.node_errors} "
                         f"{[m for m in run.messages if m[0] == 'execution_error']}")
    executed = {prompt[node_id]["class_type"] for node_id in run.node_seconds}
    ours = {n["type"] for n in workflow["nodes"]} & _ours(env)
    assert ours <= executed, f"{name}: {sorted(ours - executed)} did not execute"
    outputs = [out for out in run.outputs.values() if "images" in out or "text" in out]
    assert outputs, f"{name} produced no output: {run.outputs}"
    print(f"{name}: {len(run.node_seconds)} nodes in {time.perf_counter() - t0:.2f} s on ComfyUI {env.version}")


def test_switch_workflow_runs_with_every_strategy(env, ui_workflows, live_defs):
    """The Switch example with each value of its ``strategy`` input through ComfyUI's own executor (which runs nodes
    under ``torch.inference_mode``): every strategy samples, including ``merged-lowvram``'s in-place writes."""
    strategies = env.engine("nodes.runtime.binding").STRATEGIES
    for strategy in strategies:
        workflow = wf.substitute_for_tests(ui_workflows["lora_switch"])
        switch = next(n for n in workflow["nodes"] if n["type"] == "LoraSetSwitch")
        switch["widgets_values"][2] = strategy
        assert not wf.check_workflow(workflow, live_defs)
        run = run_prompt(wf.ui_to_api(workflow, live_defs))
        assert run.success, (strategy, run.error, run.node_errors)
        assert str(switch["id"]) in run.node_seconds, strategy


def test_missing_lora_file_is_a_validation_error_not_a_crash(env, ui_workflows, workflow_defs, in_process_models):
    workflow = wf.substitute_for_tests(ui_workflows["lora_switch"])
    load = next(n for n in workflow["nodes"] if n["type"] == "LoraSetLoad")
    load["widgets_values"][0] = "not_downloaded_yet.safetensors"
    run = run_prompt(wf.ui_to_api(workflow, workflow_defs))
    assert not run.success
    errors = run.node_errors[str(load["id"])]["errors"]
    assert any(e["type"] == "value_not_in_list" and "not_downloaded_yet.safetensors" in e["details"] for e in errors)


def test_missing_lora_file_over_http(e2e_server, ui_workflows, workflow_defs):
    workflow = wf.substitute_for_tests(ui_workflows["lora_static_apply"])
    load = next(n for n in workflow["nodes"] if n["type"] == "LoraSetLoad")
    load["widgets_values"][0] = "not_downloaded_yet.safetensors"
    status, answer = e2e_server.post_json("/prompt", {"prompt": wf.ui_to_api(workflow, workflow_defs)})
    assert status == 400, answer
    errors = answer["node_errors"][str(load["id"])]["errors"]
    assert any(e["type"] == "value_not_in_list" and "lora_name" in e["message"] + e["details"] for e in errors), errors
    assert e2e_server.process.poll() is None


def test_workflow_runs_through_the_server(e2e_server, ui_workflows, workflow_defs):
    """One workflow end to end over HTTP (the executor path runs all of them above)."""
    prompt = wf.ui_to_api(wf.substitute_for_tests(ui_workflows["lora_composite"]), workflow_defs)
    entry = e2e_server.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert any("images" in out for out in entry["outputs"].values())


def test_templates_menu_serves_the_workflows(e2e_server, ui_workflows):
    templates = e2e_server.get_json("/workflow_templates")
    assert sorted(templates.get(PACK_DIR_NAME, [])) == sorted(ui_workflows), templates
    url = f"{e2e_server.url}/api/workflow_templates/{PACK_DIR_NAME}/lora_switch.json"
    with urllib.request.urlopen(url, timeout=30) as response:
        assert json.loads(response.read()) == ui_workflows["lora_switch"]
