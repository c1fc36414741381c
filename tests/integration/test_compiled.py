"""The runtime on a model compiled with ComfyUI's own ``torch.compile`` wrapper (``set_torch_compile_wrapper``, what
core's TorchCompileModel node installs: the whole ``diffusion_model`` compiled, run through an APPLY_MODEL wrapper).

Dynamo traces forward hooks into the compiled graph. Our hooks read per-run state (the run's prepared factors, the
rows' routing), and a graph traced in one run was replayed in the next without re-reading it: Composite's second run
on a compiled model came out 4e-4 (relative) off the eager result. The hooks are excluded from tracing
(``torch.compiler.disable``), so they always run eagerly on the current state: every run equals eager sampling. The
``eager`` backend is enough to show it (the bug is in tracing, not in code generation) and compiles fastest.

A merged swap puts new Parameters into the layers; dynamo takes a module's parameters as graph inputs, so a second
run with its swaps compiles no new graph (counted; the same holds over 5 swaps per run at τ = 1, checked by hand).
"""
from __future__ import annotations

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set
from harness.sampling import cat_conds, run_custom, sigmas_for
from harness.tiny_models import build_unet, weights_snapshot

REL = 1e-6  # observed 0: compiled with the eager backend runs the same kernels


@pytest.fixture(scope="module")
def setup(env):
    model = build_unet("sd15", seed=31)
    sd = model.model.state_dict()
    names = lf.save_strong_loras(sd, lf.pick_targets(sd, ("attn", "ff")), env.models_dir / "loras", "compiled",
                                 seeds=(40, 41), ranks=(2, 2))
    pos, neg = cat_conds()
    yield model, names, pos, neg
    torch._dynamo.reset()


@pytest.mark.parametrize("node, options", [("LoraSetComposite", {}),
                                           ("LoraSetSwitch", {"switch_every": 2, "schedule": "paper"})])
def test_runs_on_a_compiled_model_equal_eager(env, setup, node, options):
    import comfy.sample
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    from torch._dynamo.utils import counters

    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    sigmas = sigmas_for(model, 3)
    with torch.inference_mode():
        patched = call_node(node, model=model, lora_set=load_set(names), **options)[0]
        want = run_custom(patched, "euler", sigmas, pos, neg, noise, latent)
        compiled = patched.clone()
        set_torch_compile_wrapper(compiled, backend="eager")
        for run in range(2):  # the second run replays what the first traced
            graphs = counters["stats"]["unique_graphs"]
            got = run_custom(compiled, "euler", sigmas, pos, neg, noise, latent)
            assert (got - want).abs().max().item() <= REL * want.abs().max().item(), (run, (got - want).abs().max())
        assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled in the second run
    import comfy.model_management as mm

    mm.unload_all_models()
    after = weights_snapshot(model.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
