"""Test-only ComfyUI pack for tests/server, tests/e2e and make demo: weight-free model loaders and a latent stats output.

tests/server/test_server.py links this folder into the test server's ``custom_nodes`` as
``lora_composer_testing``. The models come from tests/harness/tiny_models.py (imported by path, so the
same seeded weights and state-dict keys as the in-process tests), which needs no downloaded file.
"""
import hashlib
import importlib.util
from pathlib import Path

_TINY_MODELS = Path(__file__).resolve().parents[2] / "harness" / "tiny_models.py"


def _tiny_models():
    spec = importlib.util.spec_from_file_location("lora_composer_testing_tiny_models", _TINY_MODELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinySD15:
    """A tiny SD1.5-shaped UNet (seed 0) and a tiny SD1 CLIP (seed 1), built in memory."""

    DESCRIPTION = "Tiny SD1.5 UNet and CLIP with deterministic weights (tests only)."
    CATEGORY = "_for_testing/lora_composer"
    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        tiny = _tiny_models()
        return (tiny.build_unet("sd15", seed=0), tiny.build_sd15_clip(seed=1))


class StubVAE:
    """Stands in for a VAE where none can be built (the engine-only ComfyUI has no VAE code).

    decode: the first three latent channels through a sigmoid, upsampled ×8 (an IMAGE in [0, 1]);
    encode: the reverse shape (8×8 average pooling). Deterministic, no weights; tests only.
    """

    downscale_ratio = 8
    latent_channels = 4

    def decode(self, samples):
        import torch

        x = torch.sigmoid(samples[:, :3].float())
        x = torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")
        return x.permute(0, 2, 3, 1).contiguous()

    def encode(self, pixels):
        import torch

        x = pixels[..., :3].permute(0, 3, 1, 2).float()
        x = torch.nn.functional.avg_pool2d(x, 8)
        x = torch.logit(x.clamp(1e-3, 1 - 1e-3))
        return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)


class TinyCheckpoint:
    """What tests substitute for CheckpointLoaderSimple: tiny UNet + CLIP of a family, and a stub VAE."""

    DESCRIPTION = ("Tiny SD1.5 or SDXL UNet and CLIP with deterministic weights, and a weight-free stub VAE "
                   "(tests and make demo only; stands in for 'Load Checkpoint').")
    CATEGORY = "_for_testing/lora_composer"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (["sd15", "sdxl"], {"default": "sd15"})}}

    def load(self, family):
        tiny = _tiny_models()
        if family == "sdxl":
            unet = tiny.build_unet("sdxl", seed=0, config_overrides=tiny.SDXL_SAMPLING_OVERRIDES)
            return (unet, tiny.build_sdxl_clip(seed=2), StubVAE())
        return (tiny.build_unet("sd15", seed=0), tiny.build_sd15_clip(seed=1), StubVAE())


class TinyClipVision:
    """What tests substitute for CLIPVisionLoader: ComfyUI's ClipVisionModel with a tiny config (hidden 32,
    32 px images, 17 tokens; tests/harness/hypernet_synthetic.py), seeded weights."""

    DESCRIPTION = "Tiny CLIP vision model with deterministic weights (tests and make demo only)."
    CATEGORY = "_for_testing/lora_composer"
    RETURN_TYPES = ("CLIP_VISION",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        import tempfile

        path = Path(__file__).resolve().parents[2] / "harness" / "hypernet_synthetic.py"
        spec = importlib.util.spec_from_file_location("lora_composer_testing_hypernet_synthetic", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with tempfile.TemporaryDirectory(prefix="tiny-clip-vision-") as folder:
            return (module.build_clip_vision(Path(folder), seed=0),)


class LatentStats:
    """Output node: mean, std, min, max and a SHA-256 of the latent's float32 bytes (for bitwise checks)."""

    DESCRIPTION = "Reports statistics of a LATENT in the prompt's history (tests only)."
    CATEGORY = "_for_testing/lora_composer"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "stats"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",)}}

    def stats(self, samples):
        x = samples["samples"].float().contiguous()
        digest = hashlib.sha256(x.cpu().numpy().tobytes()).hexdigest()
        stats = {"mean": x.mean().item(), "std": x.std().item(), "min": x.min().item(), "max": x.max().item(),
                 "shape": list(x.shape), "sha256": digest}
        return {"ui": {"stats": [stats]}}


NODE_CLASS_MAPPINGS = {"LoraComposerTest_TinySD15": TinySD15, "LoraComposerTest_LatentStats": LatentStats,
                       "LoraComposerTest_TinyCheckpoint": TinyCheckpoint,
                       "LoraComposerTest_TinyClipVision": TinyClipVision}
NODE_DISPLAY_NAME_MAPPINGS = {"LoraComposerTest_TinySD15": "Tiny SD1.5 (test)",
                              "LoraComposerTest_LatentStats": "Latent stats (test)",
                              "LoraComposerTest_TinyCheckpoint": "Tiny checkpoint + stub VAE (test)",
                              "LoraComposerTest_TinyClipVision": "Tiny CLIP vision (test)"}
