"""Repeat one model call's batch m times (one copy per mixture component) and fold the outputs back.

Everything batch-shaped is repeated component-major (rows [c0: B rows][c1: B rows]…): the latent,
sigmas, text conditioning, concat latents, ControlNet residuals and extra conds such as SDXL's ``y``;
``cond_or_uncond`` lists in ``transformer_options`` are repeated too, so attention patches that split the
batch by them keep seeing a consistent layout. ``uuids`` are repeated per component as ``option_uuids``: a cond's
uuid names its rows' own output, and per-uuid caches (core's EasyCache) would otherwise keep one LoRA's output for
another's rows.
"""
from __future__ import annotations

import uuid

import torch


def repeat_rows(value, batch: int, m: int):
    """Repeat every tensor whose first dim is ``batch`` (recursing into lists, tuples and dicts)."""
    if isinstance(value, torch.Tensor):
        if value.ndim > 0 and value.shape[0] == batch:
            return value.repeat(m, *([1] * (value.ndim - 1)))
        return value
    if isinstance(value, dict):
        return {k: repeat_rows(v, batch, m) for k, v in value.items()}
    if isinstance(value, list):
        return [repeat_rows(v, batch, m) for v in value]
    if isinstance(value, tuple):
        return tuple(repeat_rows(v, batch, m) for v in value)
    return value


def option_uuids(uuids, option):
    """The uuids a component's rows carry: their conds' own for the base model (``option`` None), else uuids derived
    from them and the option, the same at every step. EasyCache (core) caches one output per uuid and decides to
    skip a step by the first cond's uuid: with the conds' own uuids for every LoRA it served one LoRA's cached
    output to another (3-10 % off in Composite / AutoLoRA)."""
    if option is None or not isinstance(uuids, list):
        return uuids
    tag = repr(option)
    return [uuid.uuid5(uuid.NAMESPACE_OID, f"{u}/lora_composer/{tag}") for u in uuids]


def repeat_transformer_options(options: dict, batch: int, component_options: list) -> dict:
    out = dict(options)
    m = len(component_options)
    if isinstance(out.get("cond_or_uncond"), list):
        out["cond_or_uncond"] = out["cond_or_uncond"] * m
    if isinstance(out.get("uuids"), list):
        out["uuids"] = [u for option in component_options for u in option_uuids(options["uuids"], option)]
    if isinstance(out.get("sigmas"), torch.Tensor):
        out["sigmas"] = repeat_rows(out["sigmas"], batch, m)
    return out


def expand_call(args: tuple, kwargs: dict, component_options: list) -> tuple[tuple, dict]:
    """APPLY_MODEL arguments ``(x, t, c_concat, c_crossattn, control, transformer_options, **kw)``, once per
    component (``component_options``: each component's option, for its rows' uuids)."""
    x = args[0]
    batch = x.shape[0]
    m = len(component_options)
    expanded = []
    for index, value in enumerate(args):
        if index == 5 and isinstance(value, dict):
            expanded.append(repeat_transformer_options(value, batch, component_options))
        else:
            expanded.append(repeat_rows(value, batch, m))
    new_kwargs = {}
    for name, value in kwargs.items():
        if name == "transformer_options" and isinstance(value, dict):
            new_kwargs[name] = repeat_transformer_options(value, batch, component_options)
        else:
            new_kwargs[name] = repeat_rows(value, batch, m)
    return tuple(expanded), new_kwargs


def with_option_uuids(args: tuple, kwargs: dict, option) -> tuple[tuple, dict]:
    """APPLY_MODEL arguments whose ``transformer_options["uuids"]`` are ``option_uuids`` (a copy; the caller's dict
    is left alone)."""
    if option is None:
        return args, kwargs
    args, kwargs, options = transformer_options_copy(args, kwargs)
    if options is not None and isinstance(options.get("uuids"), list):
        options["uuids"] = option_uuids(options["uuids"], option)
    return args, kwargs


def cond_patches(transformer_options: dict | None, model_patches: dict | None) -> bool:
    """Whether this call carries ``transformer_options["patches"]`` that its conds added (core's GLIGEN puts a
    ``middle_patch`` made for the call's batch there), i.e. any patch function the model's own options lack: such a
    closure holds batch-sized tensors that repeating the call's arguments cannot reach."""
    patches = (transformer_options or {}).get("patches") or {}
    own = {id(f) for fs in (model_patches or {}).values() for f in fs}
    return any(id(f) not in own for fs in patches.values() for f in fs)


def transformer_options_of(args: tuple, kwargs: dict) -> dict | None:
    """The call's ``transformer_options`` (not a copy), or None."""
    if len(args) > 5 and isinstance(args[5], dict):
        return args[5]
    options = kwargs.get("transformer_options")
    return options if isinstance(options, dict) else None


def transformer_options_copy(args: tuple, kwargs: dict) -> tuple[tuple, dict, dict | None]:
    """APPLY_MODEL arguments with their ``transformer_options`` replaced by a shallow copy (returned third, None
    when the call has none), so a wrapper can change what the network sees without touching the caller's dict."""
    if len(args) > 5 and isinstance(args[5], dict):
        options = dict(args[5])
        return args[:5] + (options,) + args[6:], kwargs, options
    if isinstance(kwargs.get("transformer_options"), dict):
        options = dict(kwargs["transformer_options"])
        return args, {**kwargs, "transformer_options": options}, options
    return args, kwargs, None


def with_fresh_control(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """APPLY_MODEL arguments whose ControlNet residuals sit in new lists (the same tensors).

    The UNet consumes ``control["input"|"middle"|"output"]`` with ``list.pop()``, so a second evaluation of the
    same call's arguments would run without ControlNet; every sequential evaluation gets its own lists.
    """
    if len(args) > 4 and isinstance(args[4], dict):
        args = args[:4] + (_fresh(args[4]),) + args[5:]
    if isinstance(kwargs.get("control"), dict):
        kwargs = {**kwargs, "control": _fresh(kwargs["control"])}
    return args, kwargs


def _fresh(value):
    if isinstance(value, dict):
        return {k: _fresh(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    return value


def fold(output: torch.Tensor, coefficients: list[float]) -> torch.Tensor:
    """Σ_c coefficient_c · output[c-th block of rows]."""
    m = len(coefficients)
    blocks = output.reshape(m, output.shape[0] // m, *output.shape[1:])
    acc = None
    for c, block in zip(coefficients, blocks):
        term = block if c == 1.0 else block * c
        acc = term if acc is None else acc + term
    return acc
