"""The hypernet file: one ``.safetensors`` in the ``lora_hypernets`` models folder.

Layout (format version 1)::

    tensors   net.<name>                      every parameter and persistent buffer of LidbHypernet (float32)
              optim.<param>.exp_avg           optional Adam moments, only in training checkpoints
              optim.<param>.exp_avg_sq        (so a run resumes exactly where it stopped)
              optim.<param>.step
    metadata  lora_hypernet_format   = "lora_composer/lora_hypernet"
              lora_hypernet_version  = "1"
              lora_hypernet_config   = JSON: variant ("image" | "pair"), feature_dim, feature_source
                                       (CLIP_VISION_OUTPUT field), model_dim, num_blocks, num_heads,
                                       iterations, base_model (ComfyUI model family, e.g. "SD15")
              lora_hypernet_lidb     = JSON: rank, down_dim, up_dim, init_law, layers [[key, in, out, seed]…],
                                       aux_fingerprint (SHA-256 of every regenerated aux matrix)
              lora_hypernet_training = JSON, optional: step, seed, settings, loss history, examples

Anything else is refused with a message that says what is wrong: pickle files (never unpickled),
files that are not safetensors, safetensors without this metadata (e.g. a LoRA), unknown versions,
malformed JSON, unknown or missing tensors, shapes that do not fit the config, NaN/Inf values.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..lora_files import PICKLE_SUFFIXES, check_finite
from .lidb import LidbSpec, aux_fingerprint
from .network import HypernetConfig, LidbHypernet

log = logging.getLogger("LoRA Composer")

LORA_HYPERNET_TYPE = "LORA_HYPERNET"
FOLDER_NAME = "lora_hypernets"
FORMAT_NAME = "lora_composer/lora_hypernet"
FORMAT_VERSION = 1
META_FORMAT = "lora_hypernet_format"
META_VERSION = "lora_hypernet_version"
META_CONFIG = "lora_hypernet_config"
META_LIDB = "lora_hypernet_lidb"
META_TRAINING = "lora_hypernet_training"
NET_PREFIX = "net."
OPTIM_PREFIX = "optim."
OPTIM_FIELDS = ("exp_avg", "exp_avg_sq", "step")


class HypernetFileError(ValueError):
    """A hypernet file could not be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class LoraHypernet:
    """The ``LORA_HYPERNET`` value: a ready network (CPU, fp32, eval mode) with its config and LiDB spec."""

    name: str
    config: HypernetConfig
    spec: LidbSpec
    network: LidbHypernet = field(repr=False, compare=False)
    training: dict = field(default_factory=dict, repr=False, compare=False)
    path: str | None = None
    aux_matches: bool = True  # this machine regenerates the aux matrices the file was trained with

    def describe(self) -> str:
        c, s = self.config, self.spec
        n_params = sum(p.numel() for p in self.network.parameters())
        text_layers = sum(l.is_text_encoder for l in s.layers)
        line = (f"{self.name}: {c.variant} hypernet for {c.base_model or 'any model'}, {len(s.layers)} LiDB layers "
                f"({text_layers} text encoder), rank {s.rank}, down {s.down_dim} / up {s.up_dim}, aux {s.init_law}; "
                f"decoder {c.num_blocks}×{c.model_dim} ({c.num_heads} heads), {c.iterations} refinement steps, "
                f"{n_params:,} parameters; image features {c.feature_source} (dim {c.feature_dim})")
        if self.training.get("step"):
            line += f"; trained {self.training['step']} steps"
        if not self.aux_matches:
            line += "; WARNING: aux matrices regenerate differently on this machine than where it was trained"
        return line


@dataclass
class HypernetFile:
    config: HypernetConfig
    spec: LidbSpec
    net_tensors: dict[str, torch.Tensor]
    optim_tensors: dict[str, torch.Tensor]
    training: dict
    fingerprint: str | None


def build_network(config: HypernetConfig, spec: LidbSpec, seed: int = 0) -> LidbHypernet:
    return LidbHypernet(config, spec, seed=seed)


def metadata_for(config: HypernetConfig, spec: LidbSpec, training: dict | None = None,
                 fingerprint: str | None = None) -> dict[str, str]:
    lidb = spec.to_json()
    lidb["aux_fingerprint"] = fingerprint or aux_fingerprint(spec)
    meta = {META_FORMAT: FORMAT_NAME, META_VERSION: str(FORMAT_VERSION),
            META_CONFIG: json.dumps(config.to_json()), META_LIDB: json.dumps(lidb)}
    if training:
        meta[META_TRAINING] = json.dumps(training)
    return meta


def save_hypernet(path: str, network: LidbHypernet, *, training: dict | None = None,
                  optim_tensors: dict[str, torch.Tensor] | None = None, fingerprint: str | None = None) -> str:
    """Write ``network`` (+ optional training state) to ``path`` atomically (temp file, then rename).

    A crash or interrupt while writing leaves the previous checkpoint intact.
    """
    tensors = {NET_PREFIX + k: v.detach().to("cpu", torch.float32).contiguous()
               for k, v in network.state_dict().items()}
    for k, v in (optim_tensors or {}).items():
        tensors[OPTIM_PREFIX + k] = v.detach().to("cpu", torch.float32).contiguous()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(handle)
    try:
        save_file(tensors, tmp, metadata=metadata_for(network.config, network.spec, training, fingerprint))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _json_field(metadata: dict[str, str], key: str, name: str, required: bool = True):
    raw = metadata.get(key)
    if raw is None:
        if required:
            raise HypernetFileError(f"{name}: metadata field {key!r} is missing.")
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError) as e:
        raise HypernetFileError(f"{name}: metadata field {key!r} is not valid JSON ({e}).") from e


def read_hypernet_file(path: str) -> HypernetFile:
    """Read and validate a hypernet file (see the module docstring); tensors are not yet in a network."""
    name = os.path.basename(path)
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise HypernetFileError(f"{name}: pickle-based files ({', '.join(PICKLE_SUFFIXES)}) are never loaded, because "
                                "unpickling can run arbitrary code. Hypernets are .safetensors files.")
    if not name.lower().endswith(".safetensors"):
        raise HypernetFileError(f"{name}: hypernet files are .safetensors; this file has another extension.")
    if not os.path.isfile(path):
        raise HypernetFileError(f"{name}: file not found at {path}.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise HypernetFileError(f"{name}: not a readable safetensors file ({e}).") from e
    if metadata.get(META_FORMAT) != FORMAT_NAME:
        hint = (" It looks like a LoRA: load it with 'Load LoRA (set)'." if any("lora" in k.lower() for k in metadata)
                or "ss_network_module" in metadata else "")
        raise HypernetFileError(f"{name}: not a LoRA Composer hypernet (metadata {META_FORMAT!r} is "
                                f"{metadata.get(META_FORMAT)!r}, expected {FORMAT_NAME!r}).{hint}")
    version = metadata.get(META_VERSION)
    if version != str(FORMAT_VERSION):
        raise HypernetFileError(f"{name}: hypernet format version {version!r} is not supported (this LoRA Composer "
                                f"reads version {FORMAT_VERSION}); it may come from a newer release.")
    try:
        config = HypernetConfig.from_json(_json_field(metadata, META_CONFIG, name))
        lidb = _json_field(metadata, META_LIDB, name)
        spec = LidbSpec.from_json(lidb)
    except HypernetFileError:
        raise
    except (TypeError, ValueError) as e:
        raise HypernetFileError(f"{name}: bad hypernet metadata: {e}") from e
    training = _json_field(metadata, META_TRAINING, name, required=False) or {}
    if not isinstance(training, dict):
        raise HypernetFileError(f"{name}: metadata field {META_TRAINING!r} must be a JSON object.")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise HypernetFileError(f"{name}: corrupt or truncated safetensors file ({e}).") from e
    try:
        check_finite(tensors, name)
    except ValueError as e:
        raise HypernetFileError(str(e)) from e
    net = {k[len(NET_PREFIX):]: v for k, v in tensors.items() if k.startswith(NET_PREFIX)}
    optim = {k[len(OPTIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(OPTIM_PREFIX)}
    unknown = sorted(k for k in tensors if not k.startswith((NET_PREFIX, OPTIM_PREFIX)))
    if unknown:
        raise HypernetFileError(f"{name}: unexpected tensors {unknown[:5]}; a hypernet file holds only "
                                f"'{NET_PREFIX}*' and '{OPTIM_PREFIX}*' tensors.")
    bad_dtype = sorted(k for k, v in tensors.items() if not v.is_floating_point())
    if bad_dtype:
        raise HypernetFileError(f"{name}: tensors {bad_dtype[:5]} are not floating point.")
    fingerprint = lidb.get("aux_fingerprint") if isinstance(lidb, dict) else None
    return HypernetFile(config, spec, net, optim, training, fingerprint if isinstance(fingerprint, str) else None)


def network_from_file(data: HypernetFile, name: str) -> LidbHypernet:
    """Build the network the config describes and load the file's weights into it (strictly)."""
    network = build_network(data.config, data.spec)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(data.net_tensors))
    unexpected = sorted(set(data.net_tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(data.net_tensors)
                   if tuple(expected[k].shape) != tuple(data.net_tensors[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shapes (e.g. {k}: {tuple(data.net_tensors[k].shape)} in the file, "
                         f"{tuple(expected[k].shape)} from its config)")
        raise HypernetFileError(f"{name}: the weights do not match the network its metadata describes: "
                                + "; ".join(parts) + ".")
    params = {n for n, _ in network.named_parameters()}
    for key in data.optim_tensors:
        param, _, field_name = key.rpartition(".")
        if param not in params or field_name not in OPTIM_FIELDS:
            raise HypernetFileError(f"{name}: optimizer tensor {OPTIM_PREFIX}{key} names no parameter of the network.")
    network.load_state_dict({k: v.float() for k, v in data.net_tensors.items()})
    return network.eval().requires_grad_(False)


def load_hypernet(path: str, name: str | None = None) -> LoraHypernet:
    """Read, validate and build a ``LORA_HYPERNET`` from a file."""
    name = name or os.path.basename(path)
    data = read_hypernet_file(path)
    network = network_from_file(data, name)
    regenerated = aux_fingerprint(data.spec)
    matches = data.fingerprint is None or data.fingerprint == regenerated
    if not matches:
        log.warning("[LoRA Composer] %s: the LiDB aux matrices regenerated here differ from the ones it was trained "
                    "with (different torch build or CPU math); generated LoRAs may differ slightly.", name)
    return LoraHypernet(name=os.path.splitext(name)[0], config=data.config, spec=data.spec, network=network,
                        training=data.training, path=path, aux_matches=matches)
