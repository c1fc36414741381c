"""The web extension's metadata route (nodes/server_routes.py): what it answers, and what it refuses.

In-process on both ComfyUI versions (the route's function against the same ``folder_paths`` the nodes
use), and over HTTP on a real server (complete checkout), including the ``/api`` mirror.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from e2e_support import CORRUPT_LORA, OUTSIDE_FILE, PICKLE_LORA, TRUNCATED_LORA

GOOD = "character_lora.safetensors"  # written by the fixtures for the example workflows


@pytest.fixture(scope="module")
def routes(env):
    return env.engine("nodes.server_routes")


def test_info_from_the_header_equals_lora_set_info(env, routes, in_process_models):
    """The route's summary is exactly what LoraSetInfo computes from the fully loaded file."""
    info = routes.lora_info(GOOD)
    lora_files, lora_format, lora_keys = (env.engine(f"nodes.{m}") for m in ("lora_files", "lora_format", "lora_keys"))
    loaded = lora_files.read_lora_file(str(in_process_models / "loras" / GOOD))
    expected = lora_format.summarize(lora_keys.normalize_keys(loaded.tensors), loaded.metadata)
    assert info["summary"] == expected.describe()
    assert info["network_types"] == expected.network_types and info["modules"] == expected.module_count
    assert info["ranks"] == expected.ranks == [2, 4] and info["alphas"] == expected.alphas  # UNet rank 4, CLIP 2
    assert info["base_model"] == expected.base_model and info["text_encoder_modules"] > 0
    assert info["trigger_words"][0] == "character_lora style"
    assert info["metadata"]["ss_network_dim"] == "4"


def test_info_of_a_file_saved_all_in_fp8(env, routes, in_process_models):
    """Alphas saved as fp8 scalars too (a whole-file cast): read from the header like any other float scalar (the
    route failed on them: "Tensor.item() cannot be called on meta tensors"), the summary again LoraSetInfo's."""
    import torch
    from harness import lora_factory as lf
    from harness.tiny_models import build_unet

    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8_e4m3fn")
    sd = build_unet("sd15", seed=3).model.state_dict()
    lora = lf.make_lora(sd, lf.pick_targets(sd, ("attn",)), "kohya", rank=4, alpha=2.0, seed=1)
    lora.tensors = {k: v.to(torch.float8_e4m3fn) for k, v in lora.tensors.items()}
    lora.save(in_process_models / "loras" / "all_fp8.safetensors")
    info = routes.lora_info("all_fp8.safetensors")
    lora_files, lora_format, lora_keys = (env.engine(f"nodes.{m}") for m in ("lora_files", "lora_format", "lora_keys"))
    loaded = lora_files.read_lora_file(str(in_process_models / "loras" / "all_fp8.safetensors"))
    assert info["summary"] == lora_format.summarize(lora_keys.normalize_keys(loaded.tensors), loaded.metadata).describe()
    assert info["alphas"] == [2.0]


def test_no_weight_is_read(env, routes, in_process_models, monkeypatch):
    """Only the header and the scalar alphas: safetensors' loaders are never called."""
    import safetensors.torch

    def refuse(*args, **kwargs):
        raise AssertionError("the route loaded tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(env.engine("nodes.lora_files"), "load_file", refuse)
    monkeypatch.setattr(env.engine("nodes.lora_files"), "safe_open", refuse)
    entries = routes.read_header(str(in_process_models / "loras" / GOOD))[0]
    tensors = routes.header_tensors(str(in_process_models / "loras" / GOOD), entries)
    assert all(t.device.type == "meta" for k, t in tensors.items() if not k.endswith(".alpha"))
    assert routes.lora_info(GOOD)["modules"] > 0


@pytest.mark.parametrize("name", ["../" + OUTSIDE_FILE, "/etc/passwd", "loras/../../" + OUTSIDE_FILE,
                                  "..\\" + OUTSIDE_FILE, "C:\\Windows\\win.ini", "x\x00.safetensors"])
def test_paths_outside_the_models_folders_are_refused_before_any_io(routes, in_process_models, name, monkeypatch):
    def no_io(*args, **kwargs):
        raise AssertionError(f"{name!r} reached the file system")

    monkeypatch.setattr(routes, "read_header", no_io)
    monkeypatch.setattr(routes.os.path, "isfile", no_io)
    with pytest.raises(routes.LoraInfoError) as refused:
        routes.lora_info(name)
    assert refused.value.status == 403


@pytest.mark.parametrize("name, status, words", [
    ("", 400, "missing"),
    ("not_there.safetensors", 404, "not in the loras folders"),
    (CORRUPT_LORA, 422, "header length"),
    (TRUNCATED_LORA, 422, "not a readable safetensors file"),
    (PICKLE_LORA, 415, "pickle"),
])
def test_bad_requests_get_a_clear_4xx(routes, in_process_models, name, status, words):
    with pytest.raises(routes.LoraInfoError) as refused:
        routes.lora_info(name)
    assert refused.value.status == status and words in refused.value.message, refused.value.message


def test_no_route_without_a_server(env, routes):
    """In-process (no PromptServer instance) registering is a no-op, never an import of ComfyUI's server."""
    import sys

    had_server = "server" in sys.modules
    assert routes.register_routes() is (had_server and getattr(sys.modules["server"].PromptServer, "instance", None)
                                        is not None)
    assert ("server" in sys.modules) == had_server


def _get(server, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(server.url + path, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_route_over_http(e2e_server):
    status, info = _get(e2e_server, "/lora_composer/lora_info?name=" + urllib.parse.quote(GOOD))
    assert status == 200, info
    assert info["ranks"] == [2, 4] and sum(info["network_types"].values()) == info["modules"]
    status_api, info_api = _get(e2e_server, "/api/lora_composer/lora_info?name=" + urllib.parse.quote(GOOD))
    assert (status_api, info_api) == (status, info)


@pytest.mark.parametrize("name, status", [
    ("../" + OUTSIDE_FILE, 403), ("/etc/passwd", 403), ("..%2F" + OUTSIDE_FILE, 403),
    ("not_there.safetensors", 404), (CORRUPT_LORA, 422), (TRUNCATED_LORA, 422), (PICKLE_LORA, 415), ("", 400),
])
def test_route_refusals_over_http(e2e_server, name, status):
    query = name if "%" in name else urllib.parse.quote(name)
    got, body = _get(e2e_server, "/api/lora_composer/lora_info?name=" + query)
    assert got == status, body
    assert body.get("error"), body
    assert e2e_server.process.poll() is None


@pytest.fixture
def scratch_loras(in_process_models):
    """Write files into the loras folder for one test; they are gone afterwards (other tests list that folder)."""
    written = []

    def write(name: str, data: bytes):
        path = in_process_models / "loras" / name
        path.write_bytes(data)
        written.append(path)

    yield write
    for path in written:
        path.unlink(missing_ok=True)


def _odd_header(header: dict | str, data: bytes = b"\0" * 64) -> bytes:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    return len(raw).to_bytes(8, "little") + raw + data


ODD_HEADERS = {  # name → (header, what the 422 says); each made a plain-text 500 (or invalid JSON) before
    "odd_deep.safetensors": ("[" * 100000 + "]" * 100000, "header is not JSON"),
    "odd_inf_offset.safetensors": ('{"a.lora_down.weight": {"dtype": "F32", "shape": [1], '
                                   '"data_offsets": [0, 1e999]}}', "is malformed"),
    "odd_inf_shape.safetensors": ('{"a.lora_down.weight": {"dtype": "F32", "shape": [1e999], '
                                  '"data_offsets": [0, 4]}}', "is malformed"),
    "odd_big_shape.safetensors": ({"a.lora_down.weight": {"dtype": "F32", "shape": [2**62, 2**62],
                                                          "data_offsets": [0, 4]}}, "more than the file holds"),
    "odd_dtype.safetensors": ({"a.lora_down.weight": {"dtype": ["F16"], "shape": [1], "data_offsets": [0, 2]}},
                              "has no dtype name"),
    "odd_nan_alpha.safetensors": ({"a.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                                   "a.lora_down.weight": {"dtype": "F32", "shape": [1, 1], "data_offsets": [4, 8]}},
                                  "a.alpha is NaN or infinite"),
}


@pytest.mark.parametrize("name", sorted(ODD_HEADERS))
def test_odd_headers_get_a_clear_422(routes, scratch_loras, name):
    header, words = ODD_HEADERS[name]
    data = b"\0\0\xc0\x7f" + b"\0" * 60 if "nan_alpha" in name else b"\0" * 64  # a float32 NaN first
    scratch_loras(name, _odd_header(header, data))
    with pytest.raises(routes.LoraInfoError) as refused:
        routes.lora_info(name)
    assert refused.value.status == 422 and words in refused.value.message, refused.value.message


def test_odd_but_readable_files_are_summarised(routes, scratch_loras):
    """A 0-d 'down' factor and tag counts of NaN / 1e999 (JSON allows both) broke the summary (IndexError,
    ValueError); now they are summarised, the bad parts left out."""
    header = {"a.lora_down.weight": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
              "a.lora_up.weight": {"dtype": "F32", "shape": [4, 1], "data_offsets": [4, 20]},
              "__metadata__": {"ss_tag_frequency": '{"1_x": {"good tag": 3, "nan tag": NaN, "big tag": 1e999}}'}}
    scratch_loras("odd_readable.safetensors", _odd_header(header))
    info = routes.lora_info("odd_readable.safetensors")
    assert info["ranks"] == [] and info["trigger_words"] == ["good tag"]


def test_names_with_a_colon_are_names(routes, in_process_models, scratch_loras):
    """':' is part of a file name on Linux / macOS (ComfyUI lists such a file, LoraSetLoad loads it); only 'C:…'
    reads as a drive and is refused."""
    good = (in_process_models / "loras" / GOOD).read_bytes()
    scratch_loras("style:v2.safetensors", good)
    assert routes.lora_info("style:v2.safetensors")["modules"] > 0
    with pytest.raises(routes.LoraInfoError) as refused:
        routes.lora_info("C:style.safetensors")
    assert refused.value.status == 403


def test_an_unforeseen_failure_is_a_json_422(routes, monkeypatch):
    """Whatever a header does that no check foresaw, the answer is JSON (the web panel parses it), never a bare 500;
    and the summary runs off the event loop (a large header took seconds and stalled the server)."""
    import asyncio
    import threading

    from aiohttp.test_utils import make_mocked_request

    seen = {}

    def explode(name):
        seen["thread"] = threading.current_thread() is not threading.main_thread()
        raise RuntimeError("Storage size calculation overflowed")

    monkeypatch.setattr(routes, "lora_info", explode)
    response = asyncio.run(routes.handle_lora_info(make_mocked_request("GET", "/lora_composer/lora_info?name=x")))
    assert response.status == 422 and seen["thread"]
    body = json.loads(response.body)
    assert "could not be summarised (RuntimeError: Storage size calculation overflowed)" in body["error"]
