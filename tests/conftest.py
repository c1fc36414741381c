"""Start a real ComfyUI once per test session and load the pack through ComfyUI's own loader."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `harness` package

from harness import comfy_env  # noqa: E402

ENV = comfy_env.start()

# The test models are tiny: one thread is as fast as two and immune to OpenMP spin-waits when the
# machine is busy (benchmarks in parallel made every small op ~10 ms with two threads).
import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_report_header(config):
    return [f"LoRA Composer tests against {ENV.describe()}"]


@pytest.fixture(scope="session")
def env() -> comfy_env.ComfyEnv:
    return ENV


@pytest.fixture(autouse=True)
def _clean_comfy_state():
    """Models stay 'loaded' between tests and clones share weights: start every test clean."""
    import comfy.model_management as mm

    yield
    mm.unload_all_models()
