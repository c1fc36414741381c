"""Run a real ComfyUI server (``main.py``) as a subprocess on a loopback port and talk to its HTTP API.

Used by tests/server. Only a complete ComfyUI checkout can start a server (the engine-only copy has no
``app/``); callers check ``ComfyEnv.complete`` first. Everything listens on 127.0.0.1 only.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A port that was free a moment ago on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def prepare_base_directory(base: Path, custom_nodes: dict[str, Path]) -> Path:
    """Create ``base/{custom_nodes,models/loras,input,output,temp,user}`` and a front-end root.

    ``custom_nodes`` maps a folder name under ``base/custom_nodes`` to the directory it links to.
    Returns the front-end root: a folder with a minimal ``index.html`` (no frontend package needed).
    """
    for sub in ("custom_nodes", "models/loras", "input", "output", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, source in custom_nodes.items():
        (base / "custom_nodes" / name).symlink_to(Path(source).resolve(), target_is_directory=True)
    front_end = base / "front_end"
    front_end.mkdir(exist_ok=True)
    (front_end / "index.html").write_text("<!doctype html><title>LoRA Composer tests</title>\n")
    return front_end


class ComfyServer:
    """``python main.py --cpu …`` in ``comfy_root``, its output in ``base/server.log``."""

    def __init__(self, comfy_root: Path, base: Path, front_end: Path):
        self.root, self.base, self.front_end = Path(comfy_root), Path(base), Path(front_end)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = self.base / "server.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
                "--base-directory", str(self.base), "--front-end-root", str(self.front_end),
                "--database-url", "sqlite:///:memory:", "--disable-api-nodes", "--dont-print-server"]

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Poll ``GET /object_info`` until it answers; raise with the log tail if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.process.returncode} during start-up.\n"
                                   f"--- server log (tail) ---\n{self.log_tail()}")
            try:
                self.get_json("/object_info", timeout=10)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer /object_info within {timeout:.0f} s.\n"
                           f"--- server log (tail) ---\n{self.log_tail()}")

    def serve(self, timeout: float):
        """Generator for a pytest fixture: start, wait until ready (a clear test failure with the log tail if it
        never is), yield the server, stop it at teardown."""
        import pytest

        self.start()
        try:
            self.wait_ready(timeout=timeout)
        except RuntimeError as e:
            self.stop()
            pytest.fail(str(e), pytrace=False)
        try:
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    # --- HTTP -----------------------------------------------------------------------------------

    def get_json(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post_json(self, path: str, body: dict, timeout: float = 30.0) -> tuple[int, dict]:
        """POST JSON; returns (HTTP status, decoded body) for 2xx and 4xx answers alike."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue_prompt(self, prompt: dict) -> str:
        status, answer = self.post_json("/prompt", {"prompt": prompt, "client_id": "lora-composer-tests"})
        assert status == 200, f"/prompt refused the graph ({status}): {json.dumps(answer, indent=1)}"
        return answer["prompt_id"]

    def wait_history(self, prompt_id: str, timeout: float = 60.0) -> dict:
        """Poll ``GET /history/<id>`` until the prompt has finished (successfully or not)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get_json(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status"):
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}.\n{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = 60.0) -> dict:
        return self.wait_history(self.queue_prompt(prompt), timeout)
