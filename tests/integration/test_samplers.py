"""Every sampler this ComfyUI offers, through LoRA Switch and LoRA Composite: both strategies agree and the base
weights come back bit-identical. The per-step oracles (``test_switch.py``) pin down which LoRA acts at which step for
the samplers whose structure they can reproduce; this covers the rest of the list — adaptive, SDE, CFG++ and
multi-evaluation samplers, and whatever a newer ComfyUI adds — for crashes and strategy disagreements."""
from __future__ import annotations

import pytest
import torch

from harness import lora_factory as lf
from harness.node_calls import call_node, load_set
from harness.sampling import cat_conds, run_custom, sigmas_for
from harness.tiny_models import build_unet, weights_snapshot

REL = 1e-4  # merged vs unmerged: float summation order only (1e-7 measured); SDE / adaptive samplers amplify it


@pytest.fixture(scope="module")
def setup(env):
    model = build_unet("sd15", seed=51)
    sd = model.model.state_dict()
    names = lf.save_strong_loras(sd, lf.pick_targets(sd, ("attn", "proj")), env.models_dir / "loras", "smp",
                                 seeds=(90, 91), ranks=(2, 2))
    return (model, names, *cat_conds())


def test_every_sampler_runs_switch_and_composite_in_both_strategies(env, setup):
    """One test over ``comfy.samplers.SAMPLER_NAMES`` as this ComfyUI lists them (read at run time, so a newer
    ComfyUI's samplers are covered too); every failing sampler is named in one message."""
    import comfy.sample
    import comfy.samplers

    model, names, pos, neg = setup
    before = weights_snapshot(model.model)
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    sigmas = sigmas_for(model, 4)
    problems = []
    for sampler_name in comfy.samplers.SAMPLER_NAMES:
        for node, inputs in (("LoraSetSwitch", {"switch_every": 1, "schedule": "paper"}), ("LoraSetComposite", {})):
            out = {}
            try:
                for strategy in ("merged", "unmerged"):
                    patched = call_node(node, model=model, lora_set=load_set(names), strategy=strategy, **inputs)[0]
                    out[strategy] = run_custom(patched, sampler_name, sigmas, pos, neg, noise, latent).detach()
            except Exception as e:  # noqa: BLE001 - collected, reported together below
                problems.append(f"{sampler_name} / {node}: {type(e).__name__}: {e}")
                continue
            merged, unmerged = out["merged"], out["unmerged"]
            rel = float((merged - unmerged).norm() / merged.norm())
            if not merged.isfinite().all() or not rel < REL:
                problems.append(f"{sampler_name} / {node}: merged vs unmerged {rel:.1e}")
    assert not problems, "\n".join(problems)
    assert len(comfy.samplers.SAMPLER_NAMES) >= 30
    assert all(torch.equal(before[k], v) for k, v in weights_snapshot(model.model).items())
