#!/usr/bin/env python3
"""``make demo``: run the example workflows (``workflows/*.json``) headless on tiny models and say what ran.

Everything is real ComfyUI: the pack and a test-only model pack (tests/server/testing_pack: tiny SD1.5/SDXL
UNets and CLIPs, a weight-free stub VAE, a tiny CLIP-vision model) are loaded with ``nodes.load_custom_node``.
Each workflow is converted from the UI format to an API prompt the way the frontend does it, its stock
loaders are swapped for the tiny models (``CheckpointLoaderSimple``, ``CLIPVisionLoader``; latents 64×64,
sampler steps ≤ 20, training a few steps — tests/harness/workflows.py:substitute_for_tests), tiny LoRAs,
hypernets and images are written under the names the workflows use, and the prompt goes through ComfyUI's
own ``validate_prompt`` and ``PromptExecutor``. Nothing is downloaded. ``--only NAME`` runs one workflow.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from harness import comfy_env  # noqa: E402
from harness import workflows as wf  # noqa: E402
from harness.executor import run_prompt  # noqa: E402

TESTING_PACK = REPO / "tests" / "server" / "testing_pack"


def definitions(workflows: dict[str, dict]) -> dict[str, dict]:
    defs = wf.definitions_for(list(workflows.values()))
    for tiny in (wf.TINY_CHECKPOINT, wf.TINY_CLIP_VISION):
        defs[tiny] = wf.node_definition(tiny)
    return defs


def short(text: str, width: int = 110) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= width else line[: width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run just this workflow (file name without .json)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny models: one thread is fastest and immune to a busy machine
    env = comfy_env.start()
    import folder_paths
    import nodes

    print(f"LoRA Composer demo on {env.describe()}")
    if wf.TINY_CHECKPOINT not in nodes.NODE_CLASS_MAPPINGS and not asyncio.run(
            nodes.load_custom_node(str(TESTING_PACK), module_parent="custom_nodes")):
        print("could not load the tiny-model test pack", file=sys.stderr)
        return 1
    workflows = {p.stem: wf.load(p) for p in wf.workflow_files()}
    if args.only:
        workflows = {k: v for k, v in workflows.items() if k == args.only}
        if not workflows:
            print(f"no workflow named {args.only!r} in {wf.WORKFLOWS_DIR}", file=sys.stderr)
            return 2
    folder_paths.add_model_folder_path("lora_hypernets", str(env.models_dir / "lora_hypernets"), is_default=True)
    wf.write_workflow_files(env.engine, env.models_dir, Path(folder_paths.get_input_directory()), workflows,
                            definitions(workflows))
    defs = definitions(workflows)  # again: the file combos list the files written just now
    failures = 0
    for name, workflow in workflows.items():
        tiny = wf.substitute_for_tests(workflow, defs=defs)
        problems = wf.check_workflow(tiny, defs)
        prompt = wf.ui_to_api(tiny, defs)
        t0 = time.perf_counter()
        run = run_prompt(prompt) if not problems else None
        seconds = time.perf_counter() - t0
        if run is None or not run.success:
            failures += 1
            print(f"\n== workflows/{name}.json: FAILED")
            errors = problems or [run.error, run.node_errors,
                                  [m[1].get("exception_message") for m in run.messages if m[0] == "execution_error"]]
            for error in errors:
                print(f"   {short(error, 300)}")
            continue
        print(f"\n== workflows/{name}.json: {len(run.node_seconds)} nodes in {seconds:.2f} s")
        for node_id, node_seconds in run.node_seconds.items():
            node = prompt[node_id]
            title = node["_meta"]["title"]
            label = node["class_type"] + (f" ({title})" if title != node["class_type"] else "")
            print(f"   {label:<58} {node_seconds * 1000:8.1f} ms")
        for node_id, ui in run.outputs.items():
            for key, values in ui.items():
                if key == "images":
                    print(f"   [{prompt[node_id]['class_type']}] {len(values)} image(s): "
                          + ", ".join(v.get("filename", "?") for v in values))
                elif key == "text":
                    for value in values:
                        print(f"   [{prompt[node_id]['class_type']}] {short(value)}")
    print(f"\n{len(workflows) - failures} of {len(workflows)} example workflows ran "
          f"(outputs in {env.output_dir})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
