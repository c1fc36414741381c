"""What every benchmark script shares: the SD1.5-shaped UNet layout, the LoRA target layers, and the
Linux counters the peak-memory children read.

Each ``bench_*.py`` runs as a script, so its folder is first on ``sys.path`` and ``import bench_common`` works.
"""
from __future__ import annotations

# SD1.5 layout (4 levels, 2 res blocks each, attention on the first 3 levels, conv proj_in/out), only narrower:
# comfy's UNetModel pops one transformer_depth entry per input res block and one transformer_depth_output entry
# per output block, exactly like the real SD1.5 config.
SD15_LAYOUT = {"channel_mult": [1, 2, 4, 4], "num_res_blocks": [2, 2, 2, 2],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
               "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
               "transformer_depth_middle": 1, "context_dim": 768, "image_size": 64}

# LoRA targets: every attention projection, proj_in/proj_out and the feed-forward layers.
TARGET_MARKERS = (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v.", ".attn1.to_out.0.",
                  ".attn2.to_q.", ".attn2.to_k.", ".attn2.to_v.", ".attn2.to_out.0.",
                  ".proj_in.", ".proj_out.", ".ff.net.0.proj.", ".ff.net.2.")


def proc_status(field: str) -> int:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), in bytes; KeyError if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM; ru_maxrss is not reset) where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
