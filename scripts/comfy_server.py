"""The real ComfyUI server as a subprocess, in a throwaway base directory (tests and `make demo`).

`--base-directory` points the server's models, custom_nodes, input, output, temp and user
folders at a temporary tree, so the run sees only this pack (linked into custom_nodes/),
the random test checkpoint (linked into models/checkpoints/) and its own outputs, and
nothing of a developer's ComfyUI set-up leaks in or out (the server's database is kept in
memory for the same reason). Every wait is bounded.

(Named comfy_server, not server: this folder is on sys.path ahead of the ComfyUI tree,
whose own top-level `server` module must stay importable.)
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"                  # the shipped example workflows
ARTIFACTS = REPO / "out" / "test-artifacts"     # what the server and browser tests leave to look at
HOST = Path(os.environ.get("FMN_COMFYUI", REPO / ".host" / "ComfyUI"))
PACK_DIR_NAME = "comfyui-forget-me-not"
PATCH_FOLDER = "forget_patches"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
POLL_S = 0.5
REQUEST_TIMEOUT_S = 30.0


class ServerError(RuntimeError):
    """The server failed to start, refused a prompt, or a prompt failed or timed out."""


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def patches_dir(self) -> Path:
        return self.models_dir / PATCH_FOLDER

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        return json.loads(self.get_bytes(path))

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=REQUEST_TIMEOUT_S) as response:
            return response.read()

    def post(self, path: str, payload: dict) -> Any:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                body = response.read()
                return json.loads(body) if body else None  # /interrupt answers with an empty 200
        except urllib.error.HTTPError as e:
            raise ServerError(f"POST {path} -> {e.code}: {e.read().decode(errors='replace')[:4000]}") from None

    def run_prompt(self, prompt: dict, timeout_s: float) -> dict:
        """Queue an API prompt and wait for its history entry; raise with the server's error
        message (and the log tail) unless it finished successfully."""
        queued = self.post("/prompt", {"prompt": prompt, "client_id": "fmn-tests"})
        prompt_id = queued["prompt_id"]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                if entry["status"].get("status_str") != "success":
                    raise ServerError(f"prompt failed: {_error_message(entry)}\n--- server log tail ---\n{self._tail()}")
                return entry
            time.sleep(POLL_S)
        raise ServerError(f"prompt {prompt_id} did not finish within {timeout_s:.0f} s\n--- server log tail ---\n{self._tail()}")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise ServerError(f"server exited with {self.process.returncode}\n--- server log tail ---\n{self._tail()}")

    def _tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]


def _error_message(entry: dict) -> str:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return (f"{data.get('node_type')} (node {data.get('node_id')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n{''.join(data.get('traceback', []))}")
    return json.dumps(entry.get("status"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path, checkpoint: Path | None) -> None:
    """The server's whole world: this pack, at most one checkpoint, an empty patch folder."""
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    (base / "models" / "checkpoints").mkdir(parents=True)
    if checkpoint is not None:
        (base / "models" / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    (base / "models" / PATCH_FOLDER).mkdir()
    for folder in ("input", "output", "temp", "user"):
        (base / folder).mkdir()


def _wait_until_up(server: ComfyServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        server._check_alive()
        try:
            server.get("/system_stats")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(POLL_S)
    raise ServerError(f"server not up within {START_TIMEOUT_S:.0f} s\n--- server log tail ---\n{server._tail()}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("ComfyUI server %d ignored SIGTERM; killing it", process.pid)
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_server(base: Path, checkpoint: Path | None = None, extra_args: tuple[str, ...] = ()) -> Iterator[ComfyServer]:
    """Start `main.py --cpu` (plus `extra_args`) on a free local port in `base`; always stop it on exit."""
    prepare_base(base, checkpoint)
    port = free_port()
    log_path = base / "server.log"
    command = [sys.executable, str(HOST / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch", *extra_args]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, cwd=HOST, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, log_path, process)
    log.info("started ComfyUI server pid %d on port %d (log %s)", process.pid, port, log_path)
    try:
        _wait_until_up(server)
        yield server
    finally:
        _stop(process)
