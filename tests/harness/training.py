"""Shared pieces of the LoraTrain tests: synthetic data, engine calls, evaluation, clean-up checks.

Evaluation goes through ``TrainingSession(model, None, [])`` — a session with no targets is a plain
forward of any MODEL (e.g. one patched by core ``LoraLoader``) on the same inputs as training.
"""
from __future__ import annotations

import torch

from .node_calls import call_node
from .tiny_models import weights_snapshot

PROMPT = "a photo of sks dog"
CLASS_PROMPT = "a photo of dog"
HELD_OUT = [0.12, 0.37, 0.63, 0.88]  # timestep fractions never drawn as such in training (continuous U(0,1))


def synthetic_latents(n: int = 3, seed: int = 0, size: int = 8) -> torch.Tensor:
    """A few smooth 'images' in raw latent space (std ≈ 1.5 like SD latents / scale)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        cx, cy = (torch.rand(2, generator=g) - 0.5).tolist()
        blob = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.3)
        out.append(5.0 * torch.randn(4, 1, 1, generator=g) * blob)
    return torch.stack(out)


def config(eng, **kw):
    base = dict(instance_prompt=PROMPT, steps=2, learning_rate=1e-2, rank=4, resolution=0)
    base.update(kw)
    return eng.train.TrainingConfig(**base)


def inputs(eng, model, clip, latents, **kw):
    return eng.train.TrainingInputs(model=model, clip=clip, latents={"samples": latents}, **kw)


def predictions(eng, model, clip, latents, prompt, seed=123) -> torch.Tensor:
    """x̂0 of ``model`` on noised ``latents`` at the held-out timesteps (fixed noise)."""
    with torch.no_grad():
        cond = eng.cond.encode_tokens(clip, clip.tokenize(prompt))
    with eng.session.TrainingSession(model, None, []) as ev, torch.no_grad():
        row = eng.cond.row_conds(ev.base_model, cond, tuple(latents.shape[1:]), ev.device)
        x0 = ev.base_model.process_latent_in(latents.clone())
        ms = ev.base_model.model_sampling
        g = torch.Generator().manual_seed(seed)
        out = []
        for p in HELD_OUT:
            sigma = eng.loop.sigmas_at(ms, [p] * x0.shape[0])
            noise = torch.randn(x0.shape, generator=g)
            out.append(eng.loop.predict_rows(ev, eng.loop.noised(ms, x0, noise, sigma), sigma, [row] * x0.shape[0]))
        return torch.stack(out)


def denoising_error(eng, model, clip, latents, prompt, seed=123) -> float:
    with torch.no_grad():
        cond = eng.cond.encode_tokens(clip, clip.tokenize(prompt))
    with eng.session.TrainingSession(model, None, []) as ev:
        row = eng.cond.row_conds(ev.base_model, cond, tuple(latents.shape[1:]), ev.device)
        x0 = ev.base_model.process_latent_in(latents.clone())
        return eng.loop.denoising_error(ev, x0, [row] * x0.shape[0], HELD_OUT, seed)


def assert_untouched(model_patcher, before: dict[str, torch.Tensor], grad_flags: dict[str, bool] | None = None):
    """Weights bit-identical, no hooks, wrappers or forward overrides left behind."""
    module = model_patcher.model
    after = weights_snapshot(module)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before), "base weights changed"
    for name, m in module.named_modules():
        assert not m._forward_hooks, f"hook left on {name}"
        assert "forward" not in m.__dict__, f"forward override left on {name}"
        assert not any(type(f).__name__ == "_FreshWeight" for f in getattr(m, "weight_function", [])), name
    if grad_flags is not None:
        assert {n: p.requires_grad for n, p in module.named_parameters()} == grad_flags


def save(lora_set, prefix) -> str:
    (name,) = call_node("LoraSetSave", lora_set=lora_set, filename_prefix=prefix, dtype="fp32")
    return name


def core_lora(model, clip, name, strength=1.0):
    import nodes as comfy_nodes

    return comfy_nodes.LoraLoader().load_lora(model, clip, name, strength, strength)
