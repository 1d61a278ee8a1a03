"""The live-vLLM tier: a real vLLM OpenAI server (the CPU build in .venv-vllm) serving the
LLM converted from the reference fixture, started ONCE per pytest session.

Every test collected under tests/vllm/ is marked `vllm`, so `pytest -m "not vllm"` skips
the tier. Without .venv-vllm (`make vllm-env`) the tier is skipped, or fails when CI is set.
"""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from missing import unavailable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVE_SCRIPT = REPO / "scripts" / "vllm-serve.sh"
# about 35 s on 2 cores; more when the machine is busy with other tests
START_TIMEOUT = 300
# Eager mode: torch.compile's warm-up adds about 40 s to every start on CPU and these
# tests time nothing. Decoding is unchanged: the reference's greedy ids match either way.
VLLM_ARGS = ["--enforce-eager"]
STOP_TIMEOUT = 30


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.vllm)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """One vLLM server run by `scripts/vllm-serve.sh run` in a process group of its own,
    so that stopping it also ends the engine-core processes vLLM forks."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None):
        self.model_dir = model_dir
        self.log_path = log_path
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(SERVE_SCRIPT), "run", str(self.model_dir), str(self.port), "--", *VLLM_ARGS],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self.healthy():
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                pytest.fail(f"vLLM exited with status {code} before it became ready; "
                            f"the end of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"vLLM not ready after {START_TIMEOUT}s; the end of {self.log_path}:\n{self.log_tail()}")
            time.sleep(1)

    def stop(self) -> None:
        if self.process is None:
            return
        group = self.process.pid
        self._signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._signal_group(group, signal.SIGKILL)
            self.process.wait()
        # the API server's children can outlive it by a moment
        deadline = time.monotonic() + STOP_TIMEOUT
        while self._signal_group(group, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        self._signal_group(group, signal.SIGKILL)
        self.process = None

    @staticmethod
    def _signal_group(group: int, sig: int) -> bool:
        """Signal the process group; False when no process of it is left."""
        try:
            os.killpg(group, sig)
        except ProcessLookupError:
            return False
        return True


@pytest.fixture(scope="session")
def vllm_installed() -> Path:
    """The python of .venv-vllm, checked to have vLLM."""
    if not VLLM_PYTHON.exists():
        unavailable(f"{VLLM_PYTHON.parent.parent} not found: run `make vllm-env` (scripts/vllm-env.sh)")
    has_vllm = subprocess.run([str(VLLM_PYTHON), "-c", "import importlib.util, sys; "
                               "sys.exit(importlib.util.find_spec('vllm') is None)"])
    if has_vllm.returncode != 0:
        unavailable(f"vllm is not installed in {VLLM_PYTHON.parent.parent}: run `make vllm-env`")
    return VLLM_PYTHON


@pytest.fixture(scope="session")
def vllm_model_dir(fixture_dir: Path, tmp_path_factory) -> Path:
    """The reference fixture converted to a model folder (float32); vLLM serves its llm/."""
    from server.convert import convert

    clip_heads = json.loads((fixture_dir / "reference.json").read_text())["clip"]["heads"]
    out = tmp_path_factory.mktemp("vllm-model") / "onellm-ref-tiny"
    return convert(checkpoint=fixture_dir / "consolidated.00-of-01.pth", params=fixture_dir / "params.json",
                   tokenizer=fixture_dir / "tokenizer.model", out=out, clip_heads=clip_heads,
                   dtype="float32", name="onellm-ref-tiny")


@pytest.fixture(scope="session")
def start_vllm(vllm_installed, vllm_model_dir: Path, tmp_path_factory):
    """Starts vLLM servers on the converted fixture (`start_vllm()` -> a ready VLLMServer);
    every one still running is stopped when the session ends."""
    servers: list[VLLMServer] = []

    def start(port: int | None = None) -> VLLMServer:
        log_path = tmp_path_factory.mktemp("vllm-log") / "vllm.log"
        server = VLLMServer(vllm_model_dir, log_path, port)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def vllm_server(start_vllm) -> str:
    """The base URL of the session's shared vLLM server."""
    return start_vllm().url
