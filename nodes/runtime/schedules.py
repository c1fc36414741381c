"""Which LoRA is active at a denoising step, for LoRA Switch (Zhong et al. 2024; algorithms.md §1.3)."""
from __future__ import annotations

import math

SWITCH_SCHEDULES = ("paper", "reference-code")


def switch_index(step: int, count: int, every: int, schedule: str = "paper") -> int:
    """Index of the active LoRA at sampler step ``step`` (0-based).

    paper:          ⌊step/τ⌋ mod k — every segment is τ steps.
    reference-code: max(0, ⌈step/τ⌉ − 1) mod k — the official code switches in a callback after step
                    τ, 2τ, …, so the first LoRA runs τ+1 steps (0..τ) and later segments τ steps.
    """
    if count < 1:
        raise ValueError("lora_set is empty: Switch needs at least one LoRA.")
    if every < 1:
        raise ValueError(f"switch_every must be ≥ 1, got {every}.")
    if schedule == "paper":
        return (step // every) % count
    if schedule == "reference-code":
        return max(0, math.ceil(step / every) - 1) % count
    raise ValueError(f"schedule must be one of {SWITCH_SCHEDULES}, got {schedule!r}.")
