#!/usr/bin/env python3
"""Write ``workflows/<name>.jpg`` (the templates menu's thumbnails): each workflow as the real UI draws it.

Needs what the browser test needs: a complete ComfyUI (``COMFYUI_PATH``), ``comfyui_frontend_package``,
Playwright's Python package and Debian's chromium (``make browser``). A throw-away server gets the pack, the
testing pack and tiny files under the names the workflows use (so the LoRA info panels have something to
show); each workflow is loaded as users download it, fitted to the view and captured.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

SIZE = (960, 600)


def main() -> int:
    from harness import comfy_env
    from harness import workflows as wf
    from harness.server import ComfyServer, prepare_base_directory

    env = comfy_env.start()
    import e2e_support as e2e  # frontend location, pack folder names
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    front_end = e2e.frontend_root()
    if not env.complete or chromium is None or front_end is None:
        print("needs a complete ComfyUI (COMFYUI_PATH), chromium (make browser) and comfyui_frontend_package",
              file=sys.stderr)
        return 2
    import asyncio

    import nodes

    if wf.TINY_CHECKPOINT not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.load_custom_node(str(e2e.TESTING_PACK), module_parent="custom_nodes"))
    workflows = {p.stem: wf.load(p) for p in wf.workflow_files()}
    defs = wf.definitions_for(list(workflows.values()))
    base = Path(tempfile.mkdtemp(prefix="lora-composer-thumbnails-"))
    prepare_base_directory(base, {e2e.PACK_DIR_NAME: REPO, e2e.TESTING_PACK_DIR_NAME: e2e.TESTING_PACK})
    wf.write_workflow_files(env.engine, base / "models", base / "input", workflows, defs)
    server = ComfyServer(env.root, base, front_end)
    server.start()
    try:
        server.wait_ready(timeout=180)
        for key, value in (("Comfy.TutorialCompleted", b"true"), ("Comfy.Minimap.Visible", b"false"),
                           ("LiteGraph.Canvas.MinFontSizeForLOD", b"1")):  # full detail when zoomed out
            request = urllib.request.Request(f"{server.url}/api/settings/{key}", data=value,
                                             headers={"Content-Type": "application/json"}, method="POST")
            urllib.request.urlopen(request, timeout=30).close()
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            context = p.chromium.launch_persistent_context(
                profile, executable_path=chromium, headless=True, viewport={"width": 2400, "height": 1500},
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update", "--disable-sync"])
            page = context.new_page()
            page.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.LiteGraph?.registered_node_types?.LoraSetSwitch && "
                                   "window.comfyAPI.app.app.graph._nodes.length > 0", timeout=120_000)
            for name, workflow in workflows.items():
                page.evaluate("async (w) => { await window.comfyAPI.app.app.loadGraphData(w); }", workflow)
                page.wait_for_timeout(1500)  # the info panels' requests
                page.evaluate("""() => {
                    const app = window.comfyAPI.app.app, canvas = app.canvas, nodes = app.graph._nodes;
                    canvas.show_info = false;
                    canvas.draw(true, true);  // panels grow their nodes on the first draw
                    const xs = nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
                    const ys = nodes.flatMap((n) => [n.pos[1] - 40, n.pos[1] + n.size[1]]);
                    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
                    const box = canvas.canvas.getBoundingClientRect();
                    const scale = Math.min(box.width / (x1 - x0 + 80), box.height / (y1 - y0 + 80));
                    canvas.ds.scale = scale;
                    canvas.ds.offset = [-x0 + 40 / scale + (box.width / scale - (x1 - x0 + 80)) / 2, -y0 + 40 / scale];
                    canvas.setDirty(true, true);
                    canvas.draw(true, true);
                }""")
                box = page.evaluate("() => { const r = window.comfyAPI.app.app.canvas.canvas.getBoundingClientRect();"
                                    " return [r.left, r.top, r.width, r.height]; }")
                png = page.screenshot(clip={"x": box[0], "y": box[1], "width": box[2], "height": box[3]})
                _save_jpeg(png, REPO / "workflows" / f"{name}.jpg")
                print(f"wrote workflows/{name}.jpg")
            context.close()
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _save_jpeg(png: bytes, path: Path) -> None:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.thumbnail(SIZE)
    image.save(path, "JPEG", quality=82, optimize=True)


if __name__ == "__main__":
    sys.exit(main())
