"""`onellm serve` as a subprocess on a loopback port, with its own flags, environment, TMPDIR and
log file (the hardening and live-vLLM fault tests), and what tests read from /proc about it."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT = 240  # importing torch + transformers takes half a minute on a busy 2-core machine
STOP_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flags(settings: dict) -> list[str]:
    return [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


class GatewayProcess:
    """`onellm serve` in a subprocess; stderr and stdout go to `log_path`, temp files to `tmpdir`."""

    def __init__(self, model_dir: Path, workdir: Path, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        self.tmpdir = workdir / "tmp"
        self.tmpdir.mkdir()
        self.args = ["--model", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), *args]
        # uploaded files stay in the test's folder, and a restart with the same workdir finds them
        self.files_dir = workdir / "files"
        self.env = {"ONELLM_FILES_DIR": str(self.files_dir), **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, ready_headers: dict | None = None) -> "GatewayProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith("ONELLM_")}
        env.update(PYTHONUNBUFFERED="1", TMPDIR=str(self.tmpdir), **self.env)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *self.args], cwd=REPO,
                                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"onellm serve exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/ready", headers=ready_headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"onellm serve was not ready after {START_TIMEOUT} s:\n{self.log()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> int | None:
        """SIGTERM, as a process manager stops it; the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def open_fds(self) -> list[str]:
        fd_dir = Path(f"/proc/{self.pid}/fd")
        links = []
        for fd in fd_dir.iterdir():
            try:
                links.append(os.readlink(fd))
            except FileNotFoundError:  # closed while we looked
                pass
        return links

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))
