"""A real vLLM OpenAI server (the CPU build in .venv-vllm) started by scripts/vllm-serve.sh, for
the tiers that run one or more (tests/vllm/, tests/scale/)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from gateway_process import free_port

REPO = Path(__file__).resolve().parents[1]
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
SERVE_SCRIPT = REPO / "scripts" / "vllm-serve.sh"
# about 35 s on 2 cores; more when the machine is busy with other tests
START_TIMEOUT = 300
# Eager mode: torch.compile's warm-up adds about 40 s to every start on CPU and these
# tests time nothing. Decoding is unchanged: the reference's greedy ids match either way.
VLLM_ARGS = ["--enforce-eager"]
STOP_TIMEOUT = 30


class VLLMServer:
    """One vLLM server run by `scripts/vllm-serve.sh run` in a process group of its own,
    so that stopping it also ends the engine-core processes vLLM forks."""

    def __init__(self, model_dir: Path, log_path: Path, port: int | None = None, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None):
        """`args`: vLLM options besides VLLM_ARGS; `env`: variables added to its environment."""
        self.model_dir = model_dir
        self.args = args
        self.env = env or {}
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
                [str(SERVE_SCRIPT), "run", str(self.model_dir), str(self.port), "--", *VLLM_ARGS, *self.args],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, **self.env})
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
