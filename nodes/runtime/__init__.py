"""Adapter runtime: LoRAs attached to a MODEL unmerged (per-row routing) or merged (swapped per step)."""
