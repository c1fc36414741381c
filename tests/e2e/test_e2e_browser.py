"""The web extension in a real browser: Debian's chromium, driven by Playwright, on a real ComfyUI server.

The server (tests/e2e/conftest.py) loads the pack and the testing pack and serves the real frontend
(``comfyui_frontend_package``). The test opens the UI and, through the page's own ``app``:
- loads every example workflow and checks that the frontend's ``graphToPrompt`` gives exactly the API prompt
  our converter (tests/harness/workflows.py) gives, so the widget order the tests rely on is the frontend's;
- loads the Switch workflow (tiny-model variant: ``substitute_for_tests``) and checks that the timeline is
  drawn — the colour of every step cell on the canvas is the LoRA ``switch_index`` says — and redrawn when
  τ changes; τ = 0 draws nothing and raises nothing;
- checks the LoRA info panel (metadata route) and the Composite evaluations badge;
- queues the Switch workflow from the page and waits for ``execution_success``; a missing LoRA file comes back
  as ComfyUI's validation error on that node, a corrupt one as an execution error naming the file;
- saves screenshots under ``tests/e2e/artifacts/`` (``LORA_COMPOSER_ARTIFACTS`` overrides).
Chromium is never downloaded: it is ``/usr/bin/chromium`` (``make browser`` / ``.ci/run`` install it). The test
skips, visibly, without chromium, Playwright, the frontend package or a complete ComfyUI.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from e2e_support import CORRUPT_LORA, TRUNCATED_LORA
from harness import workflows as wf

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("LORA_COMPOSER_ARTIFACTS", REPO_ROOT / "tests" / "e2e" / "artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PALETTE = ["#e6a23c", "#409eff", "#67c23a", "#f56c6c", "#b37feb", "#36cfc9", "#ff85c0", "#a0d911"]

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def page(e2e_server):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make browser, or apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    if not e2e_server.has_frontend:
        pytest.skip("comfyui_frontend_package is not installed: the server has no UI to open")
    # no first-run template dialog over the canvas
    for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Validation.Workflows", True)):
        request = urllib.request.Request(f"{e2e_server.url}/api/settings/{key}", data=json.dumps(value).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=30).close()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p, tempfile.TemporaryDirectory(prefix="lora-composer-chromium-") as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000}, device_scale_factor=1)
        page = context.new_page()
        page.lc_errors = []
        page.on("pageerror", lambda e: page.lc_errors.append(str(e)))
        page.on("console", lambda m: page.lc_errors.append(m.text) if m.type == "error" else None)
        page.goto(e2e_server.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.comfyAPI?.app?.app?.graph && window.comfyAPI.app.app.canvas",
                               timeout=120_000)
        page.wait_for_function("() => (window.comfyAPI.app.app.extensions || []).some("
                               "(e) => e.name === 'LoRAComposer.panels')", timeout=60_000)
        # node definitions registered and the start-up workflow loaded (else it would replace ours)
        page.wait_for_function("() => window.LiteGraph?.registered_node_types?.LoraSetSwitch && "
                               "window.comfyAPI.app.app.graph._nodes.length > 0", timeout=120_000)
        page.wait_for_timeout(1000)
        yield page
        page.screenshot(path=str(ARTIFACTS / "browser_last_page.png"))
        context.close()


def load(page, workflow: dict) -> None:
    page.evaluate("async (w) => { await window.comfyAPI.app.app.loadGraphData(w); }", workflow)


def redraw_centered(page, node_type: str, index: int = 0) -> None:
    page.evaluate("""([type, index]) => {
        const app = window.comfyAPI.app.app;
        const node = app.graph._nodes.filter((n) => n.type === type)[index];
        app.canvas.ds.scale = 1;
        app.canvas.centerOnNode(node);
        app.canvas.setDirty(true, true);
        app.canvas.draw(true, true);
    }""", [node_type, index])


def node_state(page, node_type: str, index: int = 0) -> dict:
    return page.evaluate("""([type, index]) => {
        const node = window.comfyAPI.app.app.graph._nodes.filter((n) => n.type === type)[index];
        return JSON.parse(JSON.stringify(node.loraComposer || null));
    }""", [node_type, index])


def set_widget(page, node_type: str, name: str, value) -> None:
    page.evaluate("""([type, name, value]) => {
        const node = window.comfyAPI.app.app.graph._nodes.find((n) => n.type === type);
        const widget = node.widgets.find((w) => w.name === name);
        widget.value = value;
        widget.callback?.(value);
    }""", [node_type, name, value])


def bar_cells(page, image_bytes: bytes, steps: int) -> list[int]:
    """The palette index drawn at the centre of every step cell of the Switch timeline (from the pixels)."""
    from PIL import Image

    rect = page.evaluate("""() => {
        const app = window.comfyAPI.app.app;
        const node = app.graph._nodes.find((n) => n.type === "LoraSetSwitch");
        const [x, y, w, h] = node.loraComposer.lastDrawn.bar;
        const box = app.canvas.canvas.getBoundingClientRect();
        const [sx, sy] = app.canvas.ds.convertOffsetToCanvas([node.pos[0] + x, node.pos[1] + y]);
        const s = app.canvas.ds.scale;
        return [box.left + sx, box.top + sy, w * s, h * s];
    }""")
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    palette = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in PALETTE]
    x0, y0, width, height = rect
    cells = []
    for i in range(steps):
        pixel = image.getpixel((int(x0 + (i + 0.5) * width / steps), int(y0 + height / 2)))
        distances = [sum((a - b) ** 2 for a, b in zip(pixel, colour)) for colour in palette]
        cells.append(distances.index(min(distances)) if min(distances) < 30 ** 2 else -1)
    return cells


def test_frontend_converts_every_workflow_as_our_converter_does(page, e2e_server, ui_workflows):
    object_info = e2e_server.get_json("/object_info")
    for name, workflow in ui_workflows.items():
        workflow = wf.substitute_for_tests(workflow)
        load(page, workflow)
        theirs = page.evaluate("async () => (await window.comfyAPI.app.app.graphToPrompt()).output")
        ours = wf.ui_to_api(workflow, object_info)
        strip = lambda p: {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in p.items()}  # noqa: E731
        assert strip(theirs) == strip(ours), name


def test_switch_timeline_renders_reacts_and_queues(page, e2e_server, ui_workflows, env):
    switch_index = env.engine("nodes.runtime.schedules").switch_index
    workflow = wf.substitute_for_tests(ui_workflows["lora_switch"])
    steps = next(n for n in workflow["nodes"] if n["type"] == "KSampler")["widgets_values"][2]
    load(page, workflow)

    redraw_centered(page, "LoraSetSwitch")
    state = node_state(page, "LoraSetSwitch")
    expected = [switch_index(i, 3, 5, "paper") for i in range(steps)]
    assert state["timeline"]["k"] == 3 and state["timeline"]["steps"] == steps
    assert state["lastDrawn"]["indices"] == expected
    shot = page.screenshot(path=str(ARTIFACTS / "browser_switch_timeline_tau5.png"))
    assert bar_cells(page, shot, steps) == expected, "the canvas does not show the schedule"

    set_widget(page, "LoraSetSwitch", "switch_every", 2)
    set_widget(page, "LoraSetSwitch", "schedule", "reference-code")
    redraw_centered(page, "LoraSetSwitch")
    expected = [switch_index(i, 3, 2, "reference-code") for i in range(steps)]
    assert node_state(page, "LoraSetSwitch")["lastDrawn"]["indices"] == expected
    shot = page.screenshot(path=str(ARTIFACTS / "browser_switch_timeline_tau2.png"))
    assert bar_cells(page, shot, steps) == expected, "the timeline did not follow the τ change"

    errors_before = len(page.lc_errors)
    set_widget(page, "LoraSetSwitch", "switch_every", 0)
    redraw_centered(page, "LoraSetSwitch")
    assert node_state(page, "LoraSetSwitch")["lastDrawn"] is None
    assert page.lc_errors[errors_before:] == []

    set_widget(page, "LoraSetSwitch", "switch_every", 5)
    set_widget(page, "LoraSetSwitch", "schedule", "paper")
    redraw_centered(page, "LoraSetSwitch")
    t0 = time.perf_counter()
    result = _queue_and_wait(page)
    assert result["ok"], json.dumps(result["detail"])[:3000]
    entry = e2e_server.wait_history(result["detail"]["prompt_id"], timeout=60)
    assert entry["status"]["status_str"] == "success"
    assert any("images" in out for out in entry["outputs"].values())
    print(f"Switch workflow queued from the browser ran in {time.perf_counter() - t0:.1f} s")
    redraw_centered(page, "LoraSetSwitch")
    page.screenshot(path=str(ARTIFACTS / "browser_switch_workflow.png"))

    # no sampler connected: nothing drawn, a hint instead, nothing thrown
    errors_before = len(page.lc_errors)
    page.evaluate("""() => {
        const node = window.comfyAPI.app.app.graph._nodes.find((n) => n.type === "LoraSetSwitch");
        node.disconnectOutput(0);
    }""")
    redraw_centered(page, "LoraSetSwitch")
    state = node_state(page, "LoraSetSwitch")
    assert state["lastDrawn"] is None and state["timeline"]["source"] is None
    assert page.lc_errors[errors_before:] == []


def _queue_and_wait(page) -> dict:
    page.evaluate("""() => {
        const api = window.comfyAPI.api.api;
        window.__lcResult = null;
        api.addEventListener("execution_success", (e) => { window.__lcResult = {ok: true, detail: e.detail}; });
        api.addEventListener("execution_error", (e) => { window.__lcResult = {ok: false, detail: e.detail}; });
    }""")
    page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.__lcResult !== null", timeout=300_000)
    return page.evaluate("() => window.__lcResult")


def test_errors_show_as_comfyui_node_errors(page, ui_workflows):
    """A missing LoRA file is ComfyUI's validation error on that node; a corrupt one an execution error
    that names the file — both through the frontend's normal error paths, the page stays usable."""
    workflow = wf.substitute_for_tests(ui_workflows["lora_switch"])
    load_node = next(n for n in workflow["nodes"] if n["type"] == "LoraSetLoad")
    load_node["widgets_values"][0] = "not_downloaded_yet.safetensors"
    load(page, workflow)
    page.evaluate("async () => { await window.comfyAPI.app.app.queuePrompt(0, 1); }")
    page.wait_for_function("() => window.comfyAPI.app.app.lastNodeErrors && "
                           "Object.keys(window.comfyAPI.app.app.lastNodeErrors).length > 0", timeout=60_000)
    node_errors = page.evaluate("() => JSON.parse(JSON.stringify(window.comfyAPI.app.app.lastNodeErrors))")
    errors = node_errors[str(load_node["id"])]["errors"]
    assert any(e["type"] == "value_not_in_list" and "not_downloaded_yet.safetensors" in e["details"] for e in errors)
    page.screenshot(path=str(ARTIFACTS / "browser_missing_lora_error.png"))

    load_node["widgets_values"][0] = "corrupt_lora.safetensors"
    load(page, workflow)
    result = _queue_and_wait(page)
    assert not result["ok"]
    detail = result["detail"]
    assert detail["node_type"] == "LoraSetLoad" and "corrupt_lora.safetensors" in detail["exception_message"]
    page.screenshot(path=str(ARTIFACTS / "browser_corrupt_lora_error.png"))


def test_lora_info_panel_and_evaluations_badge(e2e_server, page, ui_workflows):
    load(page, wf.substitute_for_tests(ui_workflows["lora_static_apply"]))
    redraw_centered(page, "LoraSetLoad")
    page.wait_for_function("""() => {
        const app = window.comfyAPI.app.app;
        app.canvas.draw(true, true);
        const node = app.graph._nodes.find((n) => n.type === "LoraSetLoad");
        return (node.loraComposer?.info?.lines || []).some((l) => l.includes("rank"));
    }""", timeout=30_000)
    lines = node_state(page, "LoraSetLoad")["info"]["lines"]
    assert any("LoRA" in line and "rank 2–4" in line for line in lines), lines
    assert any("trigger words: character_lora style" in line for line in lines), lines
    page.screenshot(path=str(ARTIFACTS / "browser_lora_info.png"))

    set_widget(page, "LoraSetLoad", "lora_name", "corrupt_lora.safetensors")
    page.wait_for_function("""() => {
        const app = window.comfyAPI.app.app;
        app.canvas.draw(true, true);
        const node = app.graph._nodes.find((n) => n.type === "LoraSetLoad");
        return (node.loraComposer?.info?.lines || []).some((l) => l.includes("not a readable safetensors"));
    }""", timeout=30_000)

    # A file added after the panel asked for it: ComfyUI's "Refresh" clears the panel's cache and it reads the file.
    loras = e2e_server.base / "models" / "loras"
    late = loras / "late_lora.safetensors"
    set_widget(page, "LoraSetLoad", "lora_name", late.name)
    info_includes = """(text) => {
        const app = window.comfyAPI.app.app;
        app.canvas.draw(true, true);
        const node = app.graph._nodes.find((n) => n.type === "LoraSetLoad");
        return (node.loraComposer?.info?.lines || []).some((l) => l.includes(text));
    }"""
    page.wait_for_function(info_includes, arg="is not in the loras folders", timeout=30_000)
    try:
        good = sorted(p for p in loras.glob("*.safetensors") if p.name not in (CORRUPT_LORA, TRUNCATED_LORA))[0]
        shutil.copyfile(good, late)
        page.evaluate("() => window.comfyAPI.app.app.refreshComboInNodes()")
        set_widget(page, "LoraSetLoad", "lora_name", late.name)  # a refresh may reset a value it did not list
        # well inside the panel's 10 s error retry, so this is the refresh at work, not the retry
        page.wait_for_function(info_includes, arg="rank", timeout=8_000)
    finally:
        late.unlink(missing_ok=True)

    load(page, wf.substitute_for_tests(ui_workflows["lora_composite"]))
    redraw_centered(page, "LoraSetComposite")
    badge = node_state(page, "LoraSetComposite")["evaluations"]
    assert badge["perStep"] == 4 and badge["plain"] == 2, badge  # 2 LoRAs × (cond + uncond), KSampler cfg 7
    page.screenshot(path=str(ARTIFACTS / "browser_composite_badge.png"))
