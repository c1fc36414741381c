"""Block selection and per-block weights, by block *name* (not positional vectors).

A block is a module-path prefix of the diffusion model, e.g. ``input_blocks.4``, ``middle_block``,
``output_blocks.0.1`` (SDXL's B-LoRA content block). A filter maps prefixes to weights; the most
specific (longest) matching prefix wins, and a default weight covers everything else.
Filters act on the diffusion model only; text-encoder parts follow ``strength_clip``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DIFFUSION_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class BlockFilter:
    rules: tuple[tuple[str, float], ...]
    default: float
    label: str = "custom"

    def weight_for(self, model_key: str) -> float:
        """Weight for one model state-dict key (``diffusion_model.…``); non-UNet keys get 1.0."""
        if not model_key.startswith(DIFFUSION_PREFIX):
            return 1.0
        path = model_key[len(DIFFUSION_PREFIX):]
        best_len, best = -1, self.default
        for prefix, weight in self.rules:
            if (path == prefix or path.startswith(prefix + ".")) and len(prefix) > best_len:
                best_len, best = len(prefix), weight
        return best

    @property
    def changes_nothing(self) -> bool:
        """Every block at weight 1 (the 'all' preset, or rules such as '*=1'): the entry is the plain LoRA."""
        return self.default == 1.0 and all(weight == 1.0 for _, weight in self.rules)

    def describe(self) -> str:
        rules = ", ".join(f"{p}={w:g}" for p, w in self.rules)
        return f"{self.label}: {rules}; other blocks={self.default:g}"


# SD1.x and SDXL share the ldm/sgm module layout, so one set of presets serves both.
PRESETS: dict[str, BlockFilter] = {
    "all": BlockFilter(rules=(), default=1.0, label="all"),
    "input": BlockFilter(rules=(("input_blocks", 1.0),), default=0.0, label="input"),
    "middle": BlockFilter(rules=(("middle_block", 1.0),), default=0.0, label="middle"),
    "output": BlockFilter(rules=(("output_blocks", 1.0),), default=0.0, label="output"),
    "B-LoRA content (SDXL output_blocks.0.1)": BlockFilter(
        rules=(("output_blocks.0.1", 1.0),), default=0.0, label="B-LoRA content"),
    "B-LoRA style (SDXL output_blocks.1.1)": BlockFilter(
        rules=(("output_blocks.1.1", 1.0),), default=0.0, label="B-LoRA style"),
    "B-LoRA content+style": BlockFilter(
        rules=(("output_blocks.0.1", 1.0), ("output_blocks.1.1", 1.0)), default=0.0, label="B-LoRA content+style"),
}

_RULE = re.compile(r"^\s*([A-Za-z_*][\w.*]*)\s*[=:]\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")


def parse_block_weights(text: str, base: BlockFilter) -> BlockFilter:
    """Apply ``"block=weight"`` rules (comma- or newline-separated; ``*`` sets the default) to a preset."""
    rules = dict(base.rules)
    default = base.default
    for raw in re.split(r"[,\n;]", text):
        if not raw.strip() or raw.strip().startswith("#"):
            continue
        m = _RULE.match(raw)
        if not m:
            raise ValueError(f"block_weights: cannot read {raw.strip()!r}; write rules as 'output_blocks.0.1=0.8', "
                             "separated by commas or new lines ('*=0' sets every other block).")
        name, weight = m.group(1), float(m.group(2))
        if name == "*":
            default = weight
        else:
            rules[name.removeprefix(DIFFUSION_PREFIX).rstrip(".")] = weight
    label = base.label if not text.strip() else f"{base.label} + custom"
    return BlockFilter(rules=tuple(rules.items()), default=default, label=label)


def _example_sub_block(paths: list[str]) -> str:
    """A sub-module path of this model to show in a message (a UNet's 'output_blocks.0.1', a DiT's
    'double_blocks.0.img_attn'), from its own keys."""
    for path in paths:
        parts = path.split(".")
        if len(parts) >= 4 and parts[1].isdigit():
            return ".".join(parts[:3])
    return "output_blocks.0.1"


def model_blocks(model_keys) -> list[str]:
    """Top-level block names of a diffusion model: ``input_blocks.0``, ``middle_block``, ``out`` …"""
    names: set[str] = set()
    for key in model_keys:
        if not key.startswith(DIFFUSION_PREFIX):
            continue
        parts = key[len(DIFFUSION_PREFIX):].split(".")
        names.add(".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0])
    return sorted(names, key=lambda n: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", n)])


def check_blocks_exist(block_filter: BlockFilter, model_keys, entry_name: str) -> None:
    """Every named block must match at least one weight of the connected model."""
    paths = [k[len(DIFFUSION_PREFIX):] for k in model_keys if k.startswith(DIFFUSION_PREFIX)]
    missing = [p for p, _ in block_filter.rules
               if not any(path == p or path.startswith(p + ".") for path in paths)]
    if missing:
        raise ValueError(
            f"LoraSetBlocks ({entry_name}): block(s) {', '.join(missing)} do not exist in the connected model. "
            f"Its blocks are: {', '.join(model_blocks(model_keys))} (a block's sub-modules, such as "
            f"'{_example_sub_block(paths)}', work too)."
        )
